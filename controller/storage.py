"""Checkpoint checks the controller makes before a stage consumes a checkpoint.

Stage 2 must never start from a checkpoint that is incomplete or corrupted, and the controller
should not need a full local copy of a multi-gigabyte checkpoint to know: S3 objects are hashed
while they stream (nothing written to disk) and compared with the manifest the trainer wrote
last (``services/checkpoints.py``). A prefix without a manifest is an upload that has not
finished (or was torn) and is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from p2r.services.checkpoints import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    local_path,
    s3_client,
    s3_errors,
    split_s3,
    verify_checkpoint_dir,
    verify_manifest,
)


def verify_checkpoint(uri: str) -> dict[str, Any]:
    """Verify the checkpoint at ``uri`` by the one definition of completeness
    (``p2r.services.checkpoints.verify_manifest``: manifest required and non-empty, nothing
    unlisted, every listed file present with its sha256); returns ``{"uri", "files", "bytes",
    "step"}``. CheckpointError says what is wrong."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        verify_checkpoint_dir(path)  # require_manifest: a stage consumes only bound checkpoints
        manifest = json.loads((path / MANIFEST).read_text())
        size = sum((path / n).stat().st_size for n in manifest["files"])
        return {"uri": uri, "files": len(manifest["files"]), "bytes": size, "step": manifest.get("step")}

    bucket, prefix = split_s3(uri)
    base = f"{prefix}/"
    client = s3_client()
    total = 0

    def streamed_digest(name: str, _expected: str) -> str:
        nonlocal total
        digest = hashlib.sha256()
        response = client.get_object(bucket, base + name)
        try:
            for block in response.stream(1 << 20):
                digest.update(block)
                total += len(block)
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()

    with s3_errors(uri):
        present = [o.object_name[len(base):] for o in client.list_objects(bucket, prefix=base, recursive=True)]
        manifest_text = None
        if MANIFEST in present:
            response = client.get_object(bucket, base + MANIFEST)
            try:
                manifest_text = response.read(MAX_MANIFEST_BYTES + 1)
            finally:
                response.close()
                response.release_conn()
        manifest = verify_manifest(uri, manifest_text, present, streamed_digest)
    return {"uri": uri, "files": len(manifest["files"]), "bytes": total, "step": manifest.get("step")}


def read_json(uri: str) -> Any:
    """A JSON document from a path, ``file://`` or ``s3://`` URI (the eval summary)."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri}: no such file")
        return json.loads(path.read_text())
    from minio.error import S3Error

    bucket, key = split_s3(uri)
    try:
        with s3_errors(uri, missing_ok=("NoSuchKey", "NoSuchBucket")):
            response = s3_client().get_object(bucket, key)
            try:
                return json.loads(response.read())
            finally:
                response.close()
                response.release_conn()
    except S3Error:  # NoSuchKey, NoSuchBucket
        raise FileNotFoundError(f"{uri}: no such object") from None


def _waiting_reason(uri: str) -> str | None:
    """None when ``uri`` can be read now, else what is missing (one line)."""
    from minio.error import S3Error

    from p2r.services.checkpoints import StorageUnavailable

    bucket, prefix = split_s3(uri)
    try:
        client = s3_client()
        with s3_errors(uri, missing_ok=("NoSuchBucket", "NoSuchKey", "AccessDenied")):
            if not prefix:
                return None if client.bucket_exists(bucket) else f"no bucket {bucket} yet"
            client.stat_object(bucket, f"{prefix.rstrip('/')}/{MANIFEST}")
            return None
    except S3Error as e:
        return {"NoSuchBucket": f"no bucket {bucket} yet", "NoSuchKey": f"no {MANIFEST} yet"}.get(
            e.code, f"{e.code}: {e.message}")
    except StorageUnavailable as e:
        return str(e)


def wait_for(uri: str, poll_s: float = 10.0, timeout_s: float = 0.0,
             say: Any = print, sleep: Any = None) -> bool:
    """Wait until ``uri`` is there: ``s3://BUCKET`` exists, or ``s3://BUCKET/PREFIX`` has its
    manifest (written last, so the whole set is there). Says ``waiting for model URI: REASON``
    whenever the reason changes. hf:// and local paths are not waited for. False on timeout."""
    import time

    if not uri.startswith("s3://"):
        return True
    sleep = sleep or time.sleep
    deadline = time.monotonic() + timeout_s if timeout_s else None
    said = None
    while True:
        reason = _waiting_reason(uri)
        if reason is None:
            return True
        if reason != said:
            say(f"waiting for model {uri}: {reason}")
            said = reason
        if deadline is not None and time.monotonic() >= deadline:
            say(f"gave up waiting for {uri} after {timeout_s:g}s: {reason}")
            return False
        sleep(poll_s)


def fetch_data(uri: str, dest: Any) -> int:
    """Copy the set at ``s3://BUCKET/PREFIX`` (``p2r data upload``: files, manifest last) into
    directory ``dest``, each file checked against the manifest's sha256 while it streams; a file
    already in ``dest`` with the right digest is kept. Returns the number of files."""
    from pathlib import Path

    from p2r.services.checkpoints import _fetch, _get_bytes, destination, sha256_file

    bucket, prefix = split_s3(uri)
    base = f"{prefix.rstrip('/')}/"
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    with s3_errors(uri):
        present = [o.object_name[len(base):] for o in client.list_objects(bucket, prefix=base, recursive=True)]
        text = _get_bytes(client, bucket, base + MANIFEST, MAX_MANIFEST_BYTES) if MANIFEST in present else None

        def digest_of(name: str, expected: str) -> str:
            local = destination(target, name, uri)
            if local.is_file() and sha256_file(local) == expected:
                return expected
            return str(_fetch(client, bucket, base + name, local, expected, None))

        manifest = verify_manifest(uri, text, present, digest_of, model=False)
    return len(manifest["files"])

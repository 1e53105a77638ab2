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
    CheckpointError,
    local_path,
    s3_client,
    split_s3,
    verify_checkpoint_dir,
)


def _check_manifest_files(uri: str, files: dict[str, str]) -> None:
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        raise CheckpointError(f"{uri}: the manifest lists no config.json or no *.safetensors weights")


def verify_checkpoint(uri: str) -> dict[str, Any]:
    """Verify every file of the checkpoint at ``uri`` against its manifest; returns
    ``{"uri", "files", "bytes", "step"}``. CheckpointError says what is wrong."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"{uri}: no {MANIFEST} (incomplete upload?)")
        verify_checkpoint_dir(path)
        manifest = json.loads((path / MANIFEST).read_text())
        _check_manifest_files(uri, manifest.get("files", {}))
        size = sum((path / n).stat().st_size for n in manifest["files"])
        return {"uri": uri, "files": len(manifest["files"]), "bytes": size, "step": manifest.get("step")}

    from minio.error import S3Error

    bucket, prefix = split_s3(uri)
    try:
        manifest = read_json(f"s3://{bucket}/{prefix}/{MANIFEST}")
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {MANIFEST} (incomplete upload?)") from None
    client = s3_client()
    files: dict[str, str] = manifest.get("files", {})
    _check_manifest_files(uri, files)
    total = 0
    for name, expected in files.items():
        digest = hashlib.sha256()
        try:
            response = client.get_object(bucket, f"{prefix}/{name}")
            try:
                for block in response.stream(1 << 20):
                    digest.update(block)
                    total += len(block)
            finally:
                response.close()
                response.release_conn()
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise CheckpointError(f"{uri}: {name} is listed in the manifest but missing") from None
            raise CheckpointError(f"{uri}: {name}: {e.code}: {e.message}") from None
        if digest.hexdigest() != expected:
            raise CheckpointError(f"{uri}: {name} does not match the manifest (sha256)")
    return {"uri": uri, "files": len(files), "bytes": total, "step": manifest.get("step")}


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
        response = s3_client().get_object(bucket, key)
        try:
            return json.loads(response.read())
        finally:
            response.close()
            response.release_conn()
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket"):
            raise FileNotFoundError(f"{uri}: no such object") from None
        raise CheckpointError(f"{uri}: {e.code}: {e.message}") from None

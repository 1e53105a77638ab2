"""Checkpoint URIs: a local directory, ``file://`` or ``s3://bucket/prefix`` (MinIO or any S3).

S3 credentials and endpoint come from the environment only (``P2R_S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``P2R_S3_SECURE``), never from config files.
When a checkpoint carries ``manifest.json`` (``{"files": {name: sha256}}``, written last by the
trainer) every listed file is verified, so a half-uploaded checkpoint is refused, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

MANIFEST = "manifest.json"
DEFAULT_CACHE = Path.home() / ".cache" / "p2r" / "checkpoints"
"""Where ``s3://`` checkpoints are mirrored unless ``P2R_CHECKPOINT_CACHE`` says otherwise."""


class CheckpointError(ValueError):
    """A checkpoint URI that cannot be used; the message says why."""


STEP_PREFIX = "step-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint_dir(path: Path) -> Path:
    """Check a local Hugging Face checkpoint directory (and its manifest, if any)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path}: no config.json")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path}: no *.safetensors weights")
    manifest = path / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        for name, digest in files.items():
            f = path / name
            if not f.is_file() or sha256_file(f) != digest:
                raise CheckpointError(f"checkpoint {path}: {name} is missing or does not match the manifest")
    return path


def s3_client():  # type: ignore[no-untyped-def]
    """A minio client from the environment."""
    from minio import Minio

    endpoint = os.environ.get("P2R_S3_ENDPOINT")
    if not endpoint:
        raise CheckpointError("s3:// URIs need P2R_S3_ENDPOINT (host:port of the S3/MinIO server)")
    endpoint = endpoint.removeprefix("http://").removeprefix("https://")
    return Minio(
        endpoint,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        secure=os.environ.get("P2R_S3_SECURE", "false").lower() in ("1", "true", "yes"),
    )


def download_s3(uri: str, cache_dir: Path) -> Path:
    """Mirror ``s3://bucket/prefix/`` into ``cache_dir``; requires the manifest (an S3 prefix
    without one may still be uploading)."""
    from minio.error import S3Error

    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/").rstrip("/") + "/"
    if not bucket or prefix == "/":
        raise CheckpointError(f"{uri}: expected s3://BUCKET/PREFIX/")
    client = s3_client()
    target = cache_dir / bucket / prefix.rstrip("/")
    try:
        names = [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
        if prefix + MANIFEST not in names:
            raise CheckpointError(f"{uri}: no {MANIFEST} (incomplete upload?)")
        for name in names:
            client.fget_object(bucket, name, str(target / name[len(prefix):]))
    except S3Error as e:
        raise CheckpointError(f"{uri}: {e.code}: {e.message}") from None
    return verify_checkpoint_dir(target)


def download_prefix(uri: str, target: Path) -> list[Path]:
    """Mirror every object under ``s3://bucket/prefix`` into ``target`` (data sets, eval outputs:
    no manifest involved); returns the local files. A missing bucket or prefix gives []."""
    from minio.error import S3Error

    bucket, prefix = split_s3(uri)
    base = f"{prefix}/" if prefix else ""
    client = s3_client()
    files: list[Path] = []
    try:
        for obj in client.list_objects(bucket, prefix=base, recursive=True):
            local = target / obj.object_name[len(base):]
            client.fget_object(bucket, obj.object_name, str(local))
            files.append(local)
    except S3Error as e:
        if e.code == "NoSuchBucket":
            return []
        raise CheckpointError(f"{uri}: {e.code}: {e.message}") from None
    return files


def resolve_checkpoint(uri: str, cache_dir: Path) -> Path:
    """A verified local directory for ``uri``."""
    if uri.startswith("s3://"):
        return download_s3(uri, cache_dir)
    if "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"{uri}: unsupported scheme (use a path, file:// or s3://)")
    return verify_checkpoint_dir(local_path(uri))


# ------------------------------------------------------------------------------------ writing


def write_manifest(checkpoint_dir: Path, extra_files: dict[str, str] | None = None, **meta: object) -> Path:
    """Hash every file of a finished local checkpoint into ``manifest.json`` (written last).

    ``extra_files`` are ``relative/path -> sha256`` of files this process did not write itself
    (other ranks' training-state shards, uploaded by those ranks); files in sub-directories are
    listed by their relative POSIX path."""
    files = {p.relative_to(checkpoint_dir).as_posix(): sha256_file(p) for p in sorted(checkpoint_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    files.update(extra_files or {})
    manifest = checkpoint_dir / MANIFEST
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": dict(sorted(files.items())), **meta}, indent=1))
    tmp.replace(manifest)
    return manifest


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> ``(BUCKET, PREFIX)`` (no slashes at either end of the prefix)."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise CheckpointError(f"{uri}: expected s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


def local_path(uri: str) -> Path:
    """A plain path or a ``file://`` URI as a local path."""
    return Path(urlparse(uri).path if uri.startswith("file://") else uri)


def upload_checkpoint(local_dir: Path, uri: str) -> str:
    """Copy a local checkpoint (with its manifest) to ``file://...`` or ``s3://...``.

    The manifest goes last, so a reader that finds it finds every file it lists; an upload
    interrupted before that point leaves a prefix without a manifest, which is never loaded.
    """
    manifest = local_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{local_dir}: write the manifest before uploading")
    names = [n for n in json.loads(manifest.read_text())["files"]] + [MANIFEST]
    return put_files(local_dir, names, uri)


def put_files(local_dir: Path, names: list[str], uri: str) -> str:
    """Copy ``names`` (in order) from ``local_dir`` to ``file://...``, a path or ``s3://...``;
    large files go up as parallel multipart uploads. Each local copy lands whole (rename)."""
    if uri.startswith("s3://"):
        from minio.error import S3Error

        bucket, prefix = split_s3(uri)
        client = s3_client()
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            for name in names:
                client.fput_object(bucket, f"{prefix}/{name}", str(local_dir / name),
                                   part_size=64 * 1024 * 1024, num_parallel_uploads=4)
        except S3Error as e:
            raise CheckpointError(f"{uri}: {e.code}: {e.message}") from None
        return uri
    target = local_path(uri)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        final = target / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.partial"
        shutil.copyfile(local_dir / name, tmp)
        tmp.replace(final)
    return uri


def complete_checkpoints(root_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every ``step-N`` checkpoint under ``root_uri`` that has its manifest,
    oldest first. Files are verified against the manifest when a checkpoint is resolved."""
    found: list[tuple[int, str]] = []
    if root_uri.startswith("s3://"):
        from minio.error import S3Error

        bucket, prefix = split_s3(root_uri)
        base = f"{prefix}/" if prefix else ""
        try:
            names = [o.object_name for o in s3_client().list_objects(bucket, prefix=base, recursive=True)]
        except S3Error as e:
            if e.code == "NoSuchBucket":
                return []
            raise CheckpointError(f"{root_uri}: {e.code}: {e.message}") from None
        for name in names:
            parts = name[len(base):].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith(STEP_PREFIX):
                step = parts[0][len(STEP_PREFIX):]
                if step.isdigit():
                    found.append((int(step), f"s3://{bucket}/{base}{parts[0]}/"))
    else:
        root = local_path(root_uri)
        if root.is_dir():
            for d in root.iterdir():
                step = d.name[len(STEP_PREFIX):]
                if d.name.startswith(STEP_PREFIX) and step.isdigit() and (d / MANIFEST).is_file():
                    found.append((int(step), str(d)))
    return sorted(found)


def latest_checkpoint(root_uri: str) -> str | None:
    """The newest complete checkpoint under ``root_uri`` (``--resume auto``), or None."""
    found = complete_checkpoints(root_uri)
    return found[-1][1] if found else None


LATEST_PREFIX = "latest:"


def resolve_latest(uri: str) -> str:
    """``latest:ROOT`` -> the newest complete ``step-N`` checkpoint under ROOT (how a static
    manifest names "the stage-1 checkpoint" before its step is known); other URIs unchanged."""
    if not uri.startswith(LATEST_PREFIX):
        return uri
    root = uri[len(LATEST_PREFIX):]
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{uri}: no complete checkpoint (step-N with its manifest) under {root}")
    return found

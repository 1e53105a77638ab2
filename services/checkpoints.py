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
from pathlib import Path
from urllib.parse import urlparse

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint URI that cannot be used; the message says why."""


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


def resolve_checkpoint(uri: str, cache_dir: Path) -> Path:
    """A verified local directory for ``uri``."""
    if uri.startswith("s3://"):
        return download_s3(uri, cache_dir)
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    elif "://" in uri:
        raise CheckpointError(f"{uri}: unsupported scheme (use a path, file:// or s3://)")
    return verify_checkpoint_dir(Path(uri))

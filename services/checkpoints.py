"""Checkpoint URIs: a local directory, ``file://``, ``s3://bucket/prefix`` (MinIO or any S3)
or ``hf://ORG/NAME[@revision]`` (the Hugging Face Hub or a mirror).

S3 credentials and endpoint come from the environment only (``P2R_S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``P2R_S3_SECURE``; timeouts
``P2R_S3_CONNECT_TIMEOUT_S`` / ``P2R_S3_READ_TIMEOUT_S``), never from config files; the Hub's
from ``HF_TOKEN`` and ``HF_ENDPOINT``.

**What makes a checkpoint complete** is defined once, in ``verify_manifest``: a
``manifest.json`` (``{"files": {name: sha256}}``, written last by whoever writes the
checkpoint) that parses, lists ``config.json`` and at least one ``*.safetensors``, names only
safe relative paths, and matches every listed file by sha256 - and no file outside the list
(a checkpoint loads exactly what its manifest lists: an unlisted ``zz-extra.safetensors`` would
otherwise be live). The server, the trainer, evaluation and the controller all apply it. A
local directory without a manifest loads only where the caller allows it explicitly
(``p2r serve``'s ``allow_unverified_local``, off unless set).

Object keys are turned into local paths by ``destination`` only: an absolute key, ``..`` or an
empty segment is refused (naming the key) and nothing is written outside the target directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from p2r.core.errors import UserError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""A manifest lists file names and digests; anything larger is not one (and is not read)."""
DEFAULT_CACHE = Path.home() / ".cache" / "p2r" / "checkpoints"
"""Where remote checkpoints are mirrored unless ``P2R_CHECKPOINT_CACHE`` says otherwise."""
HF_SCHEME = "hf://"
REMOTE_SCHEMES = ("s3://", HF_SCHEME)
"""URIs ``resolve_checkpoint`` downloads into the cache; anything else is a local path."""
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""What vLLM reads from a Hub repository (config, weights, tokenizer, chat template); duplicate
``*.bin`` / ONNX / GGUF weights a repository may also carry are not downloaded."""

S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 60.0
"""Per socket operation: a store that accepts a connection and never answers fails the call
after this long (times the retries), instead of holding a thread (and a reload) forever."""
S3_RETRIES = 2
"""urllib3 retries of one S3 request (connection errors, read timeouts, 5xx), with backoff."""


class CheckpointError(UserError):
    """A checkpoint URI that cannot be used; the message says why (FAILED_PRECONDITION)."""


class StorageUnavailable(CheckpointError):
    """The object store (or the Hub) could not be reached; the message names the endpoint.

    A CheckpointError, so FAILED_PRECONDITION (``services/errors.py``): the server itself is
    healthy, its store is not. UNAVAILABLE would tell a round-robin client to retry the same
    reload on another replica, which reaches the same store."""


class DownloadCancelled(CheckpointError):
    """The caller gave up on a download (its RPC was cancelled); its partial files are gone."""


STEP_PREFIX = "step-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------ paths and manifests

_SHA256 = re.compile(r"[0-9a-f]{64}")


MAX_SEGMENT_BYTES = 200
"""The longest path segment a key may have: local file systems stop at 255 bytes (``NAME_MAX``),
and a download's partial file adds about 35 to the name (``_fetch``). A longer S3 key failed
with ENAMETOOLONG mid-download (INTERNAL); it is refused by name before anything is fetched."""


def safe_relative(key: str, where: str) -> str:
    """``key`` if it is a relative POSIX path that stays where it is put and can be a local file
    name: no leading ``/``, no ``.`` / ``..`` or empty segment, no backslash or NUL, no segment
    over ``MAX_SEGMENT_BYTES``. Else CheckpointError naming it."""
    parts = key.split("/")
    if (not key or key.startswith("/") or "\\" in key or "\x00" in key
            or any(p in ("", ".", "..") for p in parts)):
        raise CheckpointError(f"{where}: key {key!r} is not a safe relative path "
                              "(absolute, '..', '.' or empty segment); refused, nothing read or written")
    if any(len(p.encode()) > MAX_SEGMENT_BYTES for p in parts):
        raise CheckpointError(f"{where}: key {key!r} has a path segment over {MAX_SEGMENT_BYTES} bytes "
                              "(longer than a local file name may be); refused, nothing read or written")
    return key


def destination(root: Path, key: str, where: str) -> Path:
    """The local path for object ``key`` under ``root``, resolved (symlinks included) and
    required to stay inside ``root``."""
    safe_relative(key, where)
    base = root.resolve()
    path = (base / key).resolve()
    if not path.is_relative_to(base) or path == base:
        raise CheckpointError(f"{where}: key {key!r} resolves outside {root}; refused, nothing read or written")
    return path


def _hidden(name: str) -> bool:
    """Dot-files and dot-directories (partial downloads, tool caches) are not checkpoint files."""
    return any(part.startswith(".") for part in name.split("/"))


def parse_manifest(text: bytes | str, where: str, model: bool = True) -> dict[str, Any]:
    """The manifest's JSON, checked: an object whose ``files`` is a non-empty map of safe
    relative names to sha256 hex digests, with a model's config.json and weights unless
    ``model=False`` (a data set). CheckpointError names ``where``'s manifest."""
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: {MANIFEST} is not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: {MANIFEST} lists no files (a manifest must list every file it binds)")
    for name, digest in files.items():
        safe_relative(name, f"{where}: {MANIFEST}")
        if name == MANIFEST or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CheckpointError(f"{where}: {MANIFEST}: {name!r} has no sha256 digest")
        parents = name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            if (parent := "/".join(parents[:depth])) in files:
                raise CheckpointError(f"{where}: {MANIFEST} lists both {parent!r} and {name!r}: "
                                      f"{parent!r} cannot be a file and a directory; refused")
    if model and ("config.json" not in files or not any(n.endswith(".safetensors") for n in files)):
        raise CheckpointError(f"{where}: the manifest lists no config.json or no *.safetensors weights")
    return manifest


TRAIN_STATE_DIR = "train_state"
"""A checkpoint's fp32 model and optimiser shards (``torch.distributed.checkpoint``): read only by
a trainer resuming that run, about 12x the size of the model files everyone else loads."""


def model_file(name: str) -> bool:
    """Whether a checkpoint file is part of the model a server, an evaluation or a new training
    stage loads (everything but ``train_state/``)."""
    return not name.startswith(f"{TRAIN_STATE_DIR}/")


def verify_manifest(where: str, manifest_text: bytes | str | None, present: Iterable[str],
                    digest_of: Callable[[str, str], str],
                    wanted: Callable[[str], bool] | None = None, model: bool = True) -> dict[str, Any]:
    """**The** definition of a complete checkpoint, shared by every reader (local directories,
    S3 mirrors, the controller's streamed check): the manifest exists and parses
    (``parse_manifest``), no file outside it is present (dot-files aside), and every listed file
    is present with its sha256. ``present`` are the relative names found; ``digest_of(name,
    expected)`` returns a listed file's sha256 (an S3 reader downloads or streams it then).
    ``wanted`` limits the presence and digest checks to the files a reader will load (a model
    reader skips ``train_state/``); an unlisted file is refused all the same. Returns the manifest."""
    if manifest_text is None:
        raise CheckpointError(f"{where}: no {MANIFEST} (incomplete upload?)")
    manifest = parse_manifest(manifest_text, where, model)
    files: dict[str, str] = manifest["files"]
    present = set(present)
    unlisted = sorted(n for n in present if n not in files and n != MANIFEST and not _hidden(n))
    if unlisted:
        raise CheckpointError(f"{where}: {unlisted[0]} is not listed in the manifest "
                              "(a checkpoint loads exactly the files its manifest lists)")
    for name, expected in files.items():
        if wanted is not None and not wanted(name):
            continue
        if name not in present:
            raise CheckpointError(f"{where}: {name} is listed in the manifest but missing")
        if digest_of(name, expected) != expected:
            raise CheckpointError(f"{where}: {name} does not match the manifest (sha256)")
    return manifest


def local_files(path: Path) -> list[str]:
    """Relative POSIX names of the regular files under ``path``."""
    return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]


def verify_checkpoint_dir(path: Path, require_manifest: bool = True, with_train_state: bool = False) -> Path:
    """Check a local Hugging Face checkpoint directory against its manifest (``verify_manifest``).

    ``require_manifest=False`` (``allow_unverified_local``, a developer's own directory) accepts
    a directory without one; a manifest that is there is always enforced."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path}: no config.json")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path}: no *.safetensors weights")
    manifest = path / MANIFEST
    if not manifest.is_file():
        if require_manifest:
            raise CheckpointError(
                f"checkpoint {path}: no {MANIFEST} (incomplete upload? a local directory without one "
                "loads only with allow_unverified_local / P2R_ALLOW_UNVERIFIED_LOCAL=true)")
        return path
    verify_manifest(f"checkpoint {path}", _read_manifest_file(manifest, f"checkpoint {path}"),
                    local_files(path), lambda name, _expected: sha256_file(path / name),
                    None if with_train_state else model_file)
    return path


def _read_manifest_file(manifest: Path, where: str) -> bytes:
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{where}: {MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
    return manifest.read_bytes()


def weight_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files a reload reads: exactly those the manifest lists (all of the
    directory's for an unverified local directory, which has none)."""
    manifest = path / MANIFEST
    if manifest.is_file():
        files = parse_manifest(_read_manifest_file(manifest, f"checkpoint {path}"), f"checkpoint {path}")["files"]
        return [path / n for n in sorted(files) if n.endswith(".safetensors") and "/" not in n]
    return sorted(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------- S3


def s3_endpoint() -> str:
    endpoint = os.environ.get("P2R_S3_ENDPOINT")
    if not endpoint:
        raise CheckpointError("s3:// URIs need P2R_S3_ENDPOINT (host:port of the S3/MinIO server)")
    return endpoint.removeprefix("http://").removeprefix("https://")


def s3_client():  # type: ignore[no-untyped-def]
    """A minio client from the environment, with bounded connect / read timeouts and retries."""
    import certifi
    import urllib3
    from minio import Minio

    endpoint = s3_endpoint()
    secure = os.environ.get("P2R_S3_SECURE", "false").lower() in ("1", "true", "yes")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=float(os.environ.get("P2R_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S)),
                                read=float(os.environ.get("P2R_S3_READ_TIMEOUT_S", S3_READ_TIMEOUT_S))),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=S3_RETRIES, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        endpoint,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        secure=secure,
        http_client=http,
    )


@contextmanager
def s3_errors(uri: str, missing_ok: tuple[str, ...] = ()) -> Iterator[None]:
    """S3 failures as CheckpointError naming ``uri``; a store that cannot be reached (refused,
    reset, timed out) as StorageUnavailable naming the endpoint. ``missing_ok`` S3 codes pass
    through as the original ``S3Error`` for the caller to handle."""
    import urllib3
    from minio.error import S3Error

    try:
        yield
    except S3Error as e:
        if e.code in missing_ok:
            raise
        raise CheckpointError(f"{uri}: {e.code}: {e.message}") from None
    except urllib3.exceptions.HTTPError as e:
        raise StorageUnavailable(
            f"{uri}: object store {os.environ.get('P2R_S3_ENDPOINT')} unreachable ({type(e).__name__}: {e})"
        ) from None


def _get_bytes(client: Any, bucket: str, key: str, limit: int) -> bytes | None:
    """A small object's bytes (None when it does not exist); refuses one over ``limit``."""
    from minio.error import S3Error

    try:
        response = client.get_object(bucket, key)
    except S3Error as e:
        if e.code == "NoSuchKey":
            return None
        raise
    try:
        data = response.read(limit + 1)
    finally:
        response.close()
        response.release_conn()
    if len(data) > limit:
        raise CheckpointError(f"s3://{bucket}/{key}: over {limit} bytes")
    return data


def _fetch(client: Any, bucket: str, key: str, dest: Path, expected: str, cancel: threading.Event | None) -> str:
    """Stream one object into ``dest`` through a private partial file, hashing as it comes;
    ``dest`` is replaced only when the digest is ``expected``. Returns the digest. The partial
    file never outlives the call (cancelled, failed or done)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.{os.getpid()}-{threading.get_ident()}.partial"
    digest = hashlib.sha256()
    try:
        response = client.get_object(bucket, key)
        try:
            with partial.open("wb") as f:
                for block in response.stream(1 << 20):
                    if cancel is not None and cancel.is_set():
                        raise DownloadCancelled(f"s3://{bucket}/{key}: download cancelled")
                    f.write(block)
                    digest.update(block)
        finally:
            response.close()
            response.release_conn()
        if digest.hexdigest() == expected:
            partial.replace(dest)
        return digest.hexdigest()
    finally:
        partial.unlink(missing_ok=True)


def download_s3(uri: str, cache_dir: Path, cancel: threading.Event | None = None,
                with_train_state: bool = False) -> Path:
    """Mirror the checkpoint ``s3://bucket/prefix/`` into ``cache_dir/s3/bucket/prefix``.

    Only the files its manifest lists are downloaded, each verified as it streams; a cached copy
    whose sha256 already matches is kept (a restart reads from the cache, not the store). A
    prefix without a manifest (an upload still running), an unlisted or unsafe object key, or a
    digest mismatch is refused. Files of an earlier version of the prefix that the manifest no
    longer lists are removed before anything is fetched (``_clear_stale``); a key the cache
    cannot hold is a CheckpointError naming it. ``cancel`` set (the RPC gave up) stops between blocks. Without
    ``with_train_state`` only the model's files are fetched (``model_file``)."""
    bucket, prefix = split_s3(uri)
    if not prefix:
        raise CheckpointError(f"{uri}: expected s3://BUCKET/PREFIX/")
    safe_relative(bucket, uri)
    safe_relative(prefix, uri)
    client = s3_client()
    target = cache_dir / "s3" / bucket / prefix
    base = f"{prefix}/"
    with s3_errors(uri):
        objects = [o.object_name for o in client.list_objects(bucket, prefix=base, recursive=True)]
        present = []
        for name in objects:
            safe_relative(name[len(base):], uri)  # names the whole relative key: abs//etc/x
            present.append(name[len(base):])
        manifest_text = _get_bytes(client, bucket, base + MANIFEST, MAX_MANIFEST_BYTES) \
            if MANIFEST in present else None
        if manifest_text is not None:
            _clear_stale(target, parse_manifest(manifest_text, uri)["files"], uri)

        def digest_of(name: str, expected: str) -> str:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"{uri}: download cancelled")
            dest = destination(target, name, uri)
            try:
                if dest.is_file() and sha256_file(dest) == expected:
                    return expected
                return _fetch(client, bucket, base + name, dest, expected, cancel)
            except OSError as e:  # the local cache, not the store (urllib3 wraps socket errors)
                raise CheckpointError(f"{uri}: key {name!r} cannot be stored in the cache {target}: "
                                      f"{e.strerror or e}") from None

        verify_manifest(uri, manifest_text, present, digest_of, None if with_train_state else model_file)
    assert manifest_text is not None
    _write_atomic(target / MANIFEST, manifest_text)
    return target


def _clear_stale(target: Path, files: dict[str, str], uri: str) -> None:
    """Make ``target`` (a mirror of ``uri``) hold nothing its new manifest does not list, before
    anything is fetched: an earlier version's files and its manifest go, and so does a directory
    where a listed file now belongs (``a/`` of an earlier ``a/b`` when ``a`` is now a file) - else
    that download failed (IsADirectoryError, or FileExistsError the other way round) on every
    reload until someone cleared the cache."""
    target.mkdir(parents=True, exist_ok=True)
    for name in local_files(target):
        if name not in files and not _hidden(name):
            (target / name).unlink()
    for name in files:
        path = destination(target, name, uri)
        if path.is_dir():
            shutil.rmtree(path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial"
    tmp.write_bytes(data)
    tmp.replace(path)


def download_prefix(uri: str, target: Path) -> list[Path]:
    """Mirror every object under ``s3://bucket/prefix`` into ``target`` (data sets, eval outputs:
    no manifest involved); returns the local files. A missing bucket or prefix gives []. Every
    key is checked (``destination``) before anything is written."""
    from minio.error import S3Error

    bucket, prefix = split_s3(uri)
    base = f"{prefix}/" if prefix else ""
    client = s3_client()
    files: list[Path] = []
    try:
        with s3_errors(uri, missing_ok=("NoSuchBucket",)):
            names = [o.object_name for o in client.list_objects(bucket, prefix=base, recursive=True)]
            target.mkdir(parents=True, exist_ok=True)
            locals_ = [destination(target, name[len(base):], uri) for name in names]
            for name, local in zip(names, locals_, strict=True):
                local.parent.mkdir(parents=True, exist_ok=True)
                client.fget_object(bucket, name, str(local))
                files.append(local)
    except S3Error:  # NoSuchBucket
        return []
    return files


# ---------------------------------------------------------------------------- Hugging Face

_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_hf(uri: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME[@revision]`` -> ``(ORG/NAME, revision or None)``."""
    repo, _, revision = uri[len(HF_SCHEME):].partition("@")
    if not _HF_REPO.fullmatch(repo) or ".." in repo:
        raise CheckpointError(f"{uri}: expected hf://ORG/NAME[@revision]")
    return repo, revision or None


def download_hf(uri: str, cache_dir: Path) -> Path:
    """The snapshot of a Hub repository in ``cache_dir/hf`` (Hugging Face's own cache layout,
    ``models--ORG--NAME/snapshots/<commit>/``), downloaded if it is not there.

    ``HF_TOKEN`` (a Secret) authenticates gated or private repositories; ``HF_ENDPOINT`` points
    at a mirror; ``HF_HUB_OFFLINE=1`` serves only what the cache holds. The Hub addresses files
    by content (pin ``@<commit>`` for an immutable model), so no p2r manifest is involved."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = split_hf(uri)
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        path = snapshot_download(repo_id=repo, revision=revision, cache_dir=cache_dir / "hf", endpoint=endpoint,
                                 token=os.environ.get("HF_TOKEN") or None, allow_patterns=HF_ALLOW_PATTERNS)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{uri}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        raise StorageUnavailable(f"{uri}: not in the model cache ({cache_dir / 'hf'}) and the Hub {endpoint} cannot "
                                 "be reached (HF_HUB_OFFLINE, or no network)") from None
    except (HfHubHTTPError, OSError) as e:
        raise StorageUnavailable(f"{uri}: Hub {endpoint}: {type(e).__name__}: {e}") from None
    return verify_checkpoint_dir(Path(path), require_manifest=False)


def resolve_checkpoint(uri: str, cache_dir: Path, allow_unverified_local: bool = False,
                       cancel: threading.Event | None = None, with_train_state: bool = False) -> Path:
    """A verified local directory for ``uri`` (remote ones mirrored under ``cache_dir``): the
    model's files only, unless ``with_train_state`` (a trainer resuming the run that wrote it)."""
    if uri.startswith("s3://"):
        return download_s3(uri, cache_dir, cancel, with_train_state)
    if uri.startswith(HF_SCHEME):
        return download_hf(uri, cache_dir)
    if "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"{uri}: unsupported scheme (use a path, file://, s3:// or hf://)")
    return verify_checkpoint_dir(local_path(uri), require_manifest=not allow_unverified_local,
                                 with_train_state=with_train_state)


# ------------------------------------------------------------------------------------ writing


def manifest_files(checkpoint_dir: Path, skip: set[str] | None = None) -> dict[str, str]:
    """``relative/path -> sha256`` of every file of a finished local checkpoint (dot-files,
    ``*.tmp`` and the manifest itself aside), sub-directories by their relative POSIX path."""
    skip = skip or set()
    return {name: sha256_file(p) for p in sorted(checkpoint_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
            and not _hidden(name := p.relative_to(checkpoint_dir).as_posix()) and name not in skip}


def manifest_json(files: dict[str, str], **meta: object) -> str:
    return json.dumps({"files": dict(sorted(files.items())), **meta}, indent=1)


def write_manifest(checkpoint_dir: Path, extra_files: dict[str, str] | None = None, **meta: object) -> Path:
    """Hash every file of a finished local checkpoint into ``manifest.json`` (written last).

    ``extra_files`` are ``relative/path -> sha256`` of files this process did not write itself
    (other ranks' training-state shards, uploaded by those ranks, and this rank's own, already
    hashed for the gather): those are not hashed again."""
    extra = extra_files or {}
    files = {**manifest_files(checkpoint_dir, skip=set(extra)), **extra}
    manifest = checkpoint_dir / MANIFEST
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(manifest_json(files, **meta))
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
    names = [*json.loads(manifest.read_text())["files"], MANIFEST]
    return put_files(local_dir, names, uri)


def put_files(local_dir: Path, names: list[str], uri: str) -> str:
    """Copy ``names`` (in order) from ``local_dir`` to ``file://...``, a path or ``s3://...``;
    large files go up as parallel multipart uploads. Each local copy lands whole (rename)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        client = s3_client()
        with s3_errors(uri):
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            for name in names:
                client.fput_object(bucket, f"{prefix}/{name}" if prefix else name, str(local_dir / name),
                                   part_size=64 * 1024 * 1024, num_parallel_uploads=4)
        return uri
    target = local_path(uri)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        final = destination(target, name, uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.partial"
        shutil.copyfile(local_dir / name, tmp)
        tmp.replace(final)
    return uri


def _remote_manifest_files(uri: str, model: bool = True) -> tuple[dict[str, str], set[str]]:
    """(files of the manifest already at ``uri``, names of the objects there); ({}, set()) when
    there is none. A manifest that does not parse counts as none (it is replaced)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        base = f"{prefix}/"
        client = s3_client()
        from minio.error import S3Error

        with s3_errors(uri, missing_ok=("NoSuchBucket",)):
            try:
                present = {o.object_name[len(base):] for o in client.list_objects(bucket, prefix=base, recursive=True)}
            except S3Error as e:
                if e.code == "NoSuchBucket":  # nothing there yet: put_files creates it
                    return {}, set()
                raise
            text = _get_bytes(client, bucket, base + MANIFEST, MAX_MANIFEST_BYTES) if MANIFEST in present else None
    else:
        target = local_path(uri)
        present = set(local_files(target)) if target.is_dir() else set()
        text = (target / MANIFEST).read_bytes() if MANIFEST in present else None
    if text is None:
        return {}, present
    try:
        return dict(parse_manifest(text, uri, model)["files"]), present
    except CheckpointError:
        return {}, present


def _delete_object(uri: str, name: str) -> None:
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        with s3_errors(uri):
            s3_client().remove_object(bucket, f"{prefix}/{name}")
    else:
        (local_path(uri) / name).unlink(missing_ok=True)


def upload_model(src: Path, uri: str, model: bool = True) -> dict[str, int]:
    """Copy the model directory ``src`` and its manifest to ``s3://BUCKET/PREFIX`` (or a path):
    how a team seeds object storage from a volume (``p2r models upload``). A manifest in ``src``
    is verified and uploaded as it is; without one the manifest is computed here (``src`` may be
    read-only) and written last, so readers never see a half-uploaded model.

    A file whose entry in the manifest already at ``uri`` has the same sha256 (and whose object
    is there) is not uploaded again, and when every entry matches nothing is written at all: a
    seed Job that runs on every upgrade re-uploads nothing. When something changes, the old
    manifest is removed first, so no reader pairs it with the new files. ``model=False`` takes
    any directory (a data set: ``p2r data upload``) instead of a Hugging Face checkpoint.
    Returns ``{"files", "bytes", "uploaded", "skipped"}``."""
    import tempfile

    if not uri.startswith("s3://") and "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"{uri}: the destination must be s3://BUCKET/PREFIX, file:// or a path")
    if uri.startswith("s3://") and not split_s3(uri)[1]:
        raise CheckpointError(f"{uri}: expected s3://BUCKET/PREFIX (a prefix to hold the model)")
    if model:
        verify_checkpoint_dir(src, require_manifest=False)
    elif not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    if (src / MANIFEST).is_file():
        files = parse_manifest((src / MANIFEST).read_bytes(), str(src), model)["files"]
        manifest_dir = src
    else:
        files = manifest_files(src)
        manifest_dir = Path(tempfile.mkdtemp(prefix="p2r-manifest-"))
        (manifest_dir / MANIFEST).write_text(manifest_json(files))
    try:
        remote, present = _remote_manifest_files(uri, model)
        changed = sorted(n for n, digest in files.items() if remote.get(n) != digest or n not in present)
        if changed or remote.keys() != files.keys() or MANIFEST not in present:
            if MANIFEST in present:
                _delete_object(uri, MANIFEST)
            put_files(src, changed, uri)
            put_files(manifest_dir, [MANIFEST], uri)
    finally:
        if manifest_dir != src:
            shutil.rmtree(manifest_dir, ignore_errors=True)
    return {"files": len(files), "bytes": sum((src / n).stat().st_size for n in files), "uploaded": len(changed),
            "skipped": len(files) - len(changed)}


def complete_checkpoints(root_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every ``step-N`` checkpoint under ``root_uri`` that has its manifest,
    oldest first. Files are verified against the manifest when a checkpoint is resolved."""
    found: list[tuple[int, str]] = []
    if root_uri.startswith("s3://"):
        from minio.error import S3Error

        bucket, prefix = split_s3(root_uri)
        base = f"{prefix}/" if prefix else ""
        try:
            with s3_errors(root_uri, missing_ok=("NoSuchBucket",)):
                names = [o.object_name for o in s3_client().list_objects(bucket, prefix=base, recursive=True)]
        except S3Error:  # NoSuchBucket
            return []
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

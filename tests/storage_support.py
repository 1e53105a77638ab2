"""Storage stand-ins for tests: ``S3Relay``, ``hf_cache`` and ``s3_checkpoint_with_keys``.

``S3Relay`` is a loopback TCP relay in front of the test S3 server, standing in for the network between a
server and its object store: it forwards bytes unchanged (``forward``), or accepts connections
and never answers (``hang``: a store that is up but stuck), or drops them at once (``reset``:
a store that cannot be reached), or relays answers at a trickle (``slow``: 64 KiB every
20 ms, so a download is still running when a test cancels it). It also counts the HTTP
requests it relays by method and path, so a test can show that a cached checkpoint is not
fetched again. ``hf_cache`` lays a local model out as a Hugging Face cache (no hub is
reachable here; servers then run with ``HF_HUB_OFFLINE=1``). ``s3_checkpoint_with_keys`` puts a
checkpoint with extra objects of any key in the store, with a manifest that binds them all (what
someone with write access to the bucket can do)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Literal

Mode = Literal["forward", "hang", "reset", "slow"]
_REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.1\r\n")


class S3Relay:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.mode: Mode = "forward"
        self.requests: Counter[tuple[str, str]] = Counter()
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def gets(self, path_part: str) -> int:
        """How many GETs of a path containing ``path_part`` were relayed."""
        with self._lock:
            return sum(n for (method, path), n in self.requests.items() if method == "GET" and path_part in path)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if self.mode == "hang":
                self._held.append(client)  # read nothing, answer nothing, keep it open
            elif self.mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
            else:
                threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        for method, path in _REQUEST_LINE.findall(data):
                            self.requests[(method.decode(), path.decode())] += 1
                if not count and self.mode == "slow":
                    for i in range(0, len(data), 1 << 16):
                        dst.sendall(data[i:i + (1 << 16)])
                        time.sleep(0.02)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for s in self._held:
            s.close()


def hf_cache(model_dir: Path, cache: Path, repo: str, revision: str) -> Path:
    """Hugging Face's cache layout for ``repo`` at commit ``revision``, built from a local model
    the way ``huggingface_hub`` writes it: content in ``blobs/``, the snapshot as symlinks to
    them, ``refs/main`` naming the commit. Returns the snapshot directory."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


def s3_checkpoint_with_keys(local_dir: Path, uri: str, extra: dict[str, bytes]) -> None:
    """Upload the checkpoint ``local_dir`` to ``uri`` plus an object per ``extra`` key, and a
    manifest listing every file with its true sha256 (so only the keys themselves are wrong).
    The S3 environment (``P2R_S3_ENDPOINT``, keys) must be set."""
    from p2r.services.checkpoints import MANIFEST, manifest_files, manifest_json, put_files, s3_client, split_s3

    files = manifest_files(local_dir)
    put_files(local_dir, sorted(files), uri)
    bucket, prefix = split_s3(uri)
    client = s3_client()
    for key, data in extra.items():
        client.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))
        files[key] = hashlib.sha256(data).hexdigest()
    manifest = manifest_json(files).encode()
    client.put_object(bucket, f"{prefix}/{MANIFEST}", io.BytesIO(manifest), len(manifest))

"""Shared fixtures: the tiny model and the synthetic set are built once per test session, and
one real vLLM engine on the tiny model serves every engine test (engines take ~30 s to start)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Many tests run in-process gRPC asyncio servers and channels, each under its own event loop. gRPC
# shuts its asyncio layer down when the last aio object is freed, joining its poller thread; if that
# object is freed by the cyclic GC while a call of a finished loop is still on the completion queue,
# the join never returns and the whole session hangs (seen once, in an unrelated test's import). One
# reference held for the session keeps the layer up, so no test's garbage can trigger that join.
from grpc._cython import cygrpc

cygrpc.init_grpc_aio()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2r.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def pretrained_base() -> tuple[Path, dict[str, Any]]:
    """The tiny model pretrained on the dot task and its record, with the config the README's
    pipeline uses (examples/pipeline-local.yaml ``prepare.pretrain: {}``). Built once per config
    digest into ``$P2R_CACHE`` (default ~/.cache/p2r) and kept across sessions, so the pipeline
    test's prepare step and the signal tests share one build of a few minutes instead of paying it
    each run; a changed recipe changes the digest and builds afresh."""
    from p2r.models.pretrain import PretrainConfig
    from p2r.models.pretrain import pretrained_base as build

    return build(PretrainConfig(), progress=False)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2r.data.dataset import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, 6)
    return out


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[object]:
    from p2r.services.engine import EngineLimits, OfflineEngine

    # 12,288: the reasoner's reference max_model_len (a 2,097,152-pixel image + 3 crops fits).
    eng = OfflineEngine(str(tiny_model_dir), EngineLimits(max_model_len=12288, max_num_seqs=8))
    yield eng
    del eng


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-protocol server (moto) on loopback, in its own process; yields the env a client
    needs. (In-process, moto would import Flask, whose context proxies break vLLM's module scan
    when a test later starts an in-process engine.)"""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    yield {"P2R_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as ``tiny_model_dir``, other weights: for checkpoint reloads."""
    from p2r.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model-1"), seed=1)


SERVE_CONFIG = """\
max_in_flight: 64
max_image_bytes: 2000000
max_image_pixels: 20000000
max_pixels: 262144
perceive_max_tokens: 64
reason_max_tokens: 64
grace_period_s: 60
limits:
  max_model_len: 8192
  max_num_seqs: 16
"""


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(SERVE_CONFIG)
    return path


@pytest.fixture(scope="session")
def role_server(tiny_model_dir: Path, serve_config: Path, s3_server: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real server hosting every role on one engine over the tiny model."""
    from p2r.services.launch import start_server

    cache = tmp_path_factory.mktemp("ckpt-cache")
    server = start_server(
        ["perceiver", "reasoner", "verifier", "gateway", "--model", str(tiny_model_dir), "--http-port", "0"],
        env={**s3_server, "P2R_CHECKPOINT_CACHE": str(cache)}, config=serve_config,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA and, signed by it, a server certificate for 127.0.0.1 / localhost and a
    client certificate, in the file names a cert-manager Secret mounts (ca.crt, tls.crt,
    tls.key; client.crt, client.key). Generated per session with ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("p2r test CA")).issuer_name(name("p2r test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, usage: x509.ObjectIdentifier, cert: str, key: str, sans: list[x509.GeneralName]) -> None:
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        (out / cert).write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        write_key(leaf_key, out / key)

    leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, "tls.crt", "tls.key",
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaf("p2r test client", ExtendedKeyUsageOID.CLIENT_AUTH, "client.crt", "client.key", [])
    return out

"""services/security.py and services/wire.py without an engine: the constant-time key check,
bearer parsing, the UTF-8 field locator, the admin/TLS rules of ServeConfig and the chart's
wiring of Secrets (TLS, API keys, admin token). The real servers are in tests/test_abuse.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.services.config import ServeConfig
from p2r.services.security import bearer, read_keys, token_ok
from p2r.services.wire import Undecodable, invalid_utf8_field, safe_deserializer
from p2r.v1 import p2r_pb2 as pb


def test_token_check() -> None:
    assert token_ok("k2", ["k1", "k2"])
    assert not token_ok("k", ["k1", "k2"]) and not token_ok(None, ["k1"]) and not token_ok("", ["k1"])
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer") is None and bearer(None) is None


def test_keys_from_file_and_inline(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("a\n\n b \n")
    assert read_keys("c, d", tmp_path / "keys") == ("a", "b", "c", "d")


def test_invalid_utf8_is_located_in_nested_and_repeated_fields() -> None:
    marker, bad = b"MARK", b"\xff\xfeRK"
    batch = pb.ReasonBatchRequest(requests=[
        pb.ReasonRequest(question="fine"),
        pb.ReasonRequest(question="fine", regions=[pb.Region(label="ok"), pb.Region(label="MARK")])])
    data = batch.SerializeToString().replace(marker, bad)
    assert invalid_utf8_field(pb.ReasonBatchRequest.DESCRIPTOR, data) == "requests[1].regions[1].label"
    loaded = safe_deserializer(pb.ReasonBatchRequest.FromString)(data)
    assert isinstance(loaded, Undecodable) and loaded.message.startswith("requests[1].regions[1].label: ")
    good = safe_deserializer(pb.ReasonBatchRequest.FromString)(batch.SerializeToString())
    assert good == batch


def test_admin_rules() -> None:
    assert ServeConfig(roles=["reasoner"], model="m").admin_enabled
    gateway = {"roles": ["gateway"], "perceiver_endpoint": "p:1", "reasoner_endpoint": "r:1"}
    assert not ServeConfig(**gateway).admin_enabled
    assert ServeConfig(**gateway, admin=True).admin_enabled
    with pytest.raises(ValueError, match="admin on a non-loopback host needs admin_token"):
        ServeConfig(roles=["reasoner"], model="m", host="0.0.0.0")
    ServeConfig(roles=["reasoner"], model="m", host="0.0.0.0", admin_token="t")
    ServeConfig(**gateway, host="0.0.0.0")  # no admin port, nothing to guard
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        ServeConfig(**gateway, tls={"cert_file": "/x"})


def test_receive_limit_follows_the_image_limit_and_batch_size() -> None:
    small = ServeConfig(roles=["reasoner"], model="m", max_image_bytes=1_000_000, max_batch_items=8)
    assert 8_000_000 < small.max_receive_bytes < 11_000_000
    assert ServeConfig(roles=["reasoner"], model="m").max_receive_bytes <= 2**31 - 1


def _serve_yaml(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    from tests.k8s_support import one

    return yaml.safe_load(one(docs, "ConfigMap", f"p2r-{role}")["data"]["serve.yaml"])


def test_chart_wires_secrets(tmp_path: Path) -> None:
    from p2r.services.config import load_config
    from tests.k8s_support import find, one, render

    # Every role deployed: the verifier runs only when asked or with the controller (issue 24 #7).
    docs = render({"security": {"tls": {"secretName": "p2r-tls"}, "apiKeys": {"secretName": "keys"}},
                   "roles": {"verifier": {"enabled": True}}})
    for role in ("perceiver", "reasoner", "verifier", "gateway"):
        cfg = _serve_yaml(docs, role)
        path = tmp_path / f"{role}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        loaded = load_config(path)  # what p2r serve accepts, host 0.0.0.0 included
        assert loaded.tls.enabled and str(loaded.tls.ca_file) == "/etc/p2r/tls/ca.crt"
        pod = one(docs, "Deployment", f"p2r-{role}")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "p2r-tls"
        container = pod["containers"][0]
        assert "exec" in container["readinessProbe"]  # kubelet's grpc probe cannot do TLS
        ports = {p["name"] for p in container["ports"]}
        if role == "gateway":
            assert not loaded.admin_enabled and "admin" not in ports
            assert str(loaded.api_keys_file) == "/etc/p2r/api-keys/keys"
            assert volumes["api-keys"]["secret"]["secretName"] == "keys"
        else:
            assert loaded.admin_enabled and loaded.admin_port == 50052 and "admin" in ports
            assert str(loaded.admin_token_file) == "/etc/p2r/admin/token"
            assert volumes["admin-token"]["secret"]["secretName"] == "p2r-admin-token"
            assert loaded.api_keys_file is None
    assert find(docs, "Secret", "p2r-admin-token")
    # Without security values (the default release, which runs no verifier): plaintext, kubelet grpc
    # probes, still an admin token.
    plain = render({})
    assert not find(plain, "ConfigMap", "p2r-verifier") and not find(plain, "Deployment", "p2r-verifier")
    pod = one(plain, "Deployment", "p2r-reasoner")["spec"]["template"]["spec"]
    assert "grpc" in pod["containers"][0]["readinessProbe"]
    assert _serve_yaml(plain, "reasoner")["admin_token_file"] == "/etc/p2r/admin/token"


def test_engine_less_gateway_tls_api_key_and_admin_token(tls_certs: Path) -> None:
    """In-process server without an engine: TLS, the API-key interceptor, the asyncio client's
    metadata interceptor (what a gateway uses towards remote roles) and the admin token."""
    import asyncio

    import grpc

    from p2r.services.security import ClientCredentials, secure_aio_channel
    from p2r.services.server import Server
    from p2r.v1 import p2r_pb2_grpc as pb_grpc

    config = ServeConfig(roles=["gateway"], perceiver_endpoint="127.0.0.1:1", reasoner_endpoint="127.0.0.1:1",
                         port=0, metrics_port=None, api_key="k1,k2", admin=True, admin_port=0, admin_token="adm",
                         tls={"cert_file": tls_certs / "tls.crt", "key_file": tls_certs / "tls.key"})

    async def code(target: str, creds: ClientCredentials, metadata: tuple[tuple[str, str], ...] = ()) -> str:
        async with secure_aio_channel(target, creds, []) as channel:
            try:
                await pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=30, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                return e.code().name
        return "OK"

    async def run() -> list[str]:
        server = Server(config)
        await server.start()
        try:
            public, admin = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.admin_port}"
            ca = tls_certs / "ca.crt"
            return [
                await code(public, ClientCredentials(ca_file=ca, api_key="k2")),
                await code(public, ClientCredentials(ca_file=ca)),
                await code(public, ClientCredentials(ca_file=ca, api_key="k3")),
                await code(public, ClientCredentials(api_key="k1")),  # plaintext to a TLS port
                await code(admin, ClientCredentials(ca_file=ca), (("authorization", "Bearer adm"),)),
                await code(admin, ClientCredentials(ca_file=ca, api_key="k1")),
            ]
        finally:
            await server.stop(0)

    assert asyncio.run(run()) == ["OK", "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAVAILABLE", "OK",
                                  "UNAUTHENTICATED"]


def _tls_gateway_config(tmp_path: Path, tls_certs: Path, require_client_cert: bool) -> Path:
    """serve.yaml of an engine-less gateway (remote roles it never calls) with TLS from a
    cert-manager-style Secret layout: ca.crt always mounted, client certificates only as asked."""
    config = {"roles": ["gateway"], "perceiver_endpoint": "127.0.0.1:1", "reasoner_endpoint": "127.0.0.1:1",
              "http_port": 0,
              "tls": {"cert_file": str(tls_certs / "tls.crt"), "key_file": str(tls_certs / "tls.key"),
                      "ca_file": str(tls_certs / "ca.crt"), "require_client_cert": require_client_cert}}
    path = tmp_path / f"serve-{require_client_cert}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_client_certificate_required_only_where_require_client_cert_says(
        tmp_path: Path, tls_certs: Path, require_client_cert: bool) -> None:
    """A real `p2r serve` with TLS and a mounted CA: a client without a certificate is accepted on
    every public port (metrics, HTTP facade, gRPC) when require_client_cert is false and refused
    when it is true; a client presenting the CA-signed certificate is accepted either way."""
    import ssl
    import urllib.error
    import urllib.request

    import grpc

    from p2r.services.client import Client
    from p2r.services.launch import start_server
    from p2r.services.security import ClientCredentials

    server = start_server(["gateway"], config=_tls_gateway_config(tmp_path, tls_certs, require_client_cert),
                          timeout=120)
    try:
        assert server.metrics_port and server.http_port

        def https_status(port: int, path: str, with_cert: bool) -> int | str:
            context = ssl.create_default_context(cafile=str(tls_certs / "ca.crt"))
            if with_cert:
                context.load_cert_chain(tls_certs / "client.crt", tls_certs / "client.key")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=30) as r:
                    return int(r.status)
            except (ssl.SSLError, urllib.error.URLError, ConnectionError) as e:
                return f"refused: {e}"

        def grpc_code(with_cert: bool) -> str:
            creds = ClientCredentials(ca_file=tls_certs / "ca.crt",
                                      cert_file=tls_certs / "client.crt" if with_cert else None,
                                      key_file=tls_certs / "client.key" if with_cert else None)
            with Client(server.target, timeout_s=20, credentials=creds) as c:
                try:
                    c.status()
                except grpc.RpcError as e:
                    return str(e.code().name)
            return "OK"

        without = {"metrics": https_status(server.metrics_port, "/metrics", False),
                   "http": https_status(server.http_port, "/healthz", False), "grpc": grpc_code(False)}
        with_cert = {"metrics": https_status(server.metrics_port, "/metrics", True),
                     "http": https_status(server.http_port, "/healthz", True), "grpc": grpc_code(True)}
    finally:
        server.stop(timeout=30)
    assert with_cert == {"metrics": 200, "http": 200, "grpc": "OK"}, with_cert
    if require_client_cert:
        assert isinstance(without["metrics"], str) and isinstance(without["http"], str), without
        assert without["grpc"] == "UNAVAILABLE", without
    else:
        assert without == {"metrics": 200, "http": 200, "grpc": "OK"}, without

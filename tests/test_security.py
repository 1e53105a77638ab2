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

    docs = render({"security": {"tls": {"secretName": "p2r-tls"}, "apiKeys": {"secretName": "keys"}}})
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
    # Without security values: plaintext, kubelet grpc probes, still an admin token.
    plain = render({})
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

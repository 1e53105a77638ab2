"""Transport security and authentication of ``p2r serve`` and its clients, in one place.

- **TLS** for every port (gRPC, admin gRPC, HTTP facade, metrics): certificate and key are read
  from files, in the layout a cert-manager ``Certificate`` (or any ``kubernetes.io/tls`` Secret)
  mounts: ``tls.crt``, ``tls.key`` and, for mutual TLS, ``ca.crt``.
- **API keys** on the public ports (gRPC metadata / HTTP header ``authorization: Bearer KEY``),
  as vLLM's ``--api-key`` does: a missing or wrong key is UNAUTHENTICATED (HTTP 401). Keys are
  compared with ``hmac.compare_digest`` so the comparison time does not leak the key.
- **The admin port** (``Admin.LoadCheckpoint`` swaps the served weights) is guarded by its own
  bearer token, or by client certificates (mTLS) when its CA is configured.
- **Client certificates** on the public ports (gRPC, HTTP facade, metrics) only with
  ``require_client_cert``: a mounted ``ca.crt`` alone does not demand them.

Health and reflection stay open: kubelet gRPC probes carry no credentials, and neither reveals
or changes anything.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from p2r.services.errors import ERRORS, Unauthenticated

AUTH_HEADER = "authorization"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method prefixes that never need a credential (probes, service discovery)."""


def read_secret(value: str | None, file: Path | str | None) -> str | None:
    """A secret given inline or as a file (a mounted Secret key); file wins, whitespace trimmed."""
    if file:
        text = Path(file).read_text().strip()
        if not text:
            raise ValueError(f"{file}: the secret file is empty")
        return text
    return value or None


def read_keys(value: str | None, file: Path | str | None) -> tuple[str, ...]:
    """API keys: one per line in ``file`` and/or comma-separated in ``value`` (several keys let
    a deployment rotate them without downtime)."""
    keys: list[str] = []
    if file:
        keys += [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
    if value:
        keys += [k.strip() for k in value.split(",") if k.strip()]
    return tuple(keys)


def bearer(header: str | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` value (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_ok(presented: str | None, accepted: Sequence[str]) -> bool:
    """Constant-time check of ``presented`` against every accepted key (all are compared, so the
    time does not tell which key, or how much of one, matched)."""
    if presented is None:
        return False
    given = presented.encode()
    ok = False
    for key in accepted:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


# ------------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one server: ``cert`` (tls.crt), ``key`` (tls.key), ``ca`` (ca.crt: the CA
    client certificates must chain to) and ``require_client_cert`` (mutual TLS on the public
    ports: gRPC, HTTP facade, metrics).

    A mounted CA alone turns client authentication on nowhere but the admin port (and there only
    without an admin token, ``server.py``): a cert-manager Secret always carries ``ca.crt``, and
    demanding client certificates from every peer because of it would shut out Prometheus, kubelet
    probes and plain clients that ``security.tls.requireClientCert: false`` promised to admit."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs a CA (ca.crt) to check client certificates against")

    def server_credentials(self, require_client_cert: bool | None = None) -> grpc.ServerCredentials:
        """gRPC credentials; ``require_client_cert`` overrides the files' own setting (the admin
        port's token-or-mTLS rule)."""
        require = self.require_client_cert if require_client_cert is None else require_client_cert
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes() if self.ca is not None else None,
            require_client_auth=require,
        )

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """uvicorn's TLS settings for the HTTP facade (client certificates only when required)."""
        import ssl

        kwargs: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.require_client_cert:
            kwargs |= {"ssl_ca_certs": str(self.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return kwargs

    def metrics_kwargs(self) -> dict[str, Any]:
        """``prometheus_client.start_http_server`` TLS settings: HTTPS always, client
        certificates only when required (the ServiceMonitor then presents the release's own)."""
        kwargs: dict[str, Any] = {"certfile": str(self.cert), "keyfile": str(self.key)}
        if self.require_client_cert:
            kwargs |= {"client_cafile": str(self.ca), "client_auth_required": True}
        return kwargs


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses with ``Unauthenticated``'s code (the one table,
    ``services/errors.py``) without reading the request.

    A unary-request handler makes gRPC receive and parse the whole message (up to the server's
    receive limit, which fits a full batch) before it runs, so an unauthenticated caller could
    make the server buffer gigabytes. A request-streaming handler runs as soon as the call's
    metadata arrived; it aborts without asking for a message, so HTTP/2 flow control stops the
    peer after one window (64 KiB to a few MiB). The client's unary call is the same on the wire:
    it sees UNAUTHENTICATED either way."""
    code, _http = ERRORS[Unauthenticated]

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None or handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer KEY`` (one of ``keys``) on every method except health
    and reflection; ``what`` names the credential in the refusal ("API key", "admin token")."""

    def __init__(self, keys: Iterable[str], what: str) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError(f"{what}: no key configured")
        self.what = what

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        header = next((v for k, v in (details.invocation_metadata or ()) if k == AUTH_HEADER), None)
        if token_ok(bearer(header if isinstance(header, str) else None), self.keys):
            return handler
        from p2r.services import metrics

        metrics.REQUESTS.labels(details.method.rsplit("/", 1)[-1], ERRORS[Unauthenticated][0].name).inc()
        reason = "missing" if header is None else "invalid"
        return _deny(handler, f"{self.what} {reason}: send metadata 'authorization: Bearer <{self.what}>'")


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]") or host.startswith("127.")


# ------------------------------------------------------------------------------- client side


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents: TLS trust root (and its own certificate for mTLS), the API key
    of the inference ports and the admin token of the admin port.

    ``from_env`` reads what a pod gets from Secrets: ``P2R_CLIENT_CA_FILE`` (ca.crt),
    ``P2R_CLIENT_CERT_FILE`` / ``P2R_CLIENT_KEY_FILE`` (mTLS), ``P2R_CLIENT_API_KEY[_FILE]`` and
    ``P2R_CLIENT_ADMIN_TOKEN[_FILE]``; the trainer, controller and evaluation build their clients
    with it, so a deployment only mounts the Secrets and sets these variables.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    api_key: str | None = None
    admin_token: str | None = None
    server_name: str | None = None
    """Override of the name checked against the server certificate (tests on 127.0.0.1)."""

    @classmethod
    def from_env(cls) -> ClientCredentials:
        def path(name: str) -> Path | None:
            value = _env(name)
            return Path(value) if value else None

        return cls(
            ca_file=path("P2R_CLIENT_CA_FILE"), cert_file=path("P2R_CLIENT_CERT_FILE"),
            key_file=path("P2R_CLIENT_KEY_FILE"),
            api_key=read_secret(_env("P2R_CLIENT_API_KEY"), _env("P2R_CLIENT_API_KEY_FILE")),
            admin_token=read_secret(_env("P2R_CLIENT_ADMIN_TOKEN"), _env("P2R_CLIENT_ADMIN_TOKEN_FILE")),
            server_name=_env("P2R_CLIENT_TLS_SERVER_NAME"),
        )

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.ca_file is None:
            raise ValueError("TLS needs a CA certificate (P2R_CLIENT_CA_FILE)")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def metadata(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        token = self.admin_token if admin else self.api_key
        return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, metadata: Sequence[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = [*(base.metadata or ()), *metadata]
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.extra = tuple(metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, self.extra), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, self.extra), request)


class AioMetadataInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of an asyncio channel (a gateway calling remote roles)."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.extra = tuple(metadata)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *self.extra))

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def secure_channel(target: str, credentials: ClientCredentials, options: list[tuple[str, Any]],
                   admin: bool = False) -> tuple[grpc.Channel, grpc.Channel]:
    """A blocking channel to ``target`` with ``credentials``: (raw channel, channel to call on).
    The raw one is for readiness and closing; the other adds the bearer token."""
    options = [*options, *credentials.channel_options()]
    raw = (grpc.secure_channel(target, credentials.channel_credentials(), options=options)
           if credentials.tls else grpc.insecure_channel(target, options=options))
    metadata = credentials.metadata(admin)
    return raw, (grpc.intercept_channel(raw, MetadataInterceptor(metadata)) if metadata else raw)


def secure_aio_channel(target: str, credentials: ClientCredentials, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    options = [*options, *credentials.channel_options()]
    metadata = credentials.metadata()
    interceptors = [AioMetadataInterceptor(metadata)] if metadata else None
    if credentials.tls:
        return grpc.aio.secure_channel(target, credentials.channel_credentials(), options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

"""The ASGI layer in front of every HTTP route of the gateway (the OpenAI routes included):
authentication and the request-body bound, applied before any route reads a byte of the body.

Kept apart from the routes (``services/http.py``) because it is transport policy, not API: what
a connection may cost the server before it has proved who it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from p2r.services import metrics, openai_api
from p2r.services.errors import TooLarge, Unauthenticated, status_of
from p2r.services.security import bearer, read_keys, token_ok

if TYPE_CHECKING:
    from p2r.services.server import Server


class Guard:
    """ASGI middleware in front of every route (the OpenAI routes included):

    - API keys (``authorization: Bearer KEY``) on ``/v1/...`` when the server has keys, 401
      otherwise, compared in constant time (``security.token_ok``), as vLLM's ``--api-key``;
      the probes and the page stay open;
    - the request body limit (``ServeConfig.max_http_body_bytes``): a larger ``Content-Length``
      is refused with 413 before anything is read, and a body that grows past the limit while
      streaming (chunked, or a lying length) is cut off with 413 at that point - never
      spooled to disk first.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.limit = server.config.max_http_body_bytes
        config = server.config
        self.keys = read_keys(config.api_key.get_secret_value() if config.api_key else None, config.api_keys_file)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.keys and path.startswith("/v1/") and not token_ok(bearer(headers.get("authorization")), self.keys):
            await self._refuse(send, path, Unauthenticated(
                "API key missing or invalid: send 'Authorization: Bearer <API key>'"),
                [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, path, TooLarge(
                f"request body: {length} bytes, over the limit of {self.limit} bytes"))
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    status = status_of(TooLarge(f"request body: over the limit of {self.limit} bytes"), "http")
                    raise HTTPException(status.http, status.message)
            return message

        await self.app(scope, limited, send)

    @staticmethod
    async def _refuse(send: Callable[[dict[str, Any]], Awaitable[None]], path: str, exc: Exception,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer ``exc`` before the route runs, mapped by the one table (``services/errors.py``)
        and counted under its code: an OpenAI error object on the OpenAI routes, else
        ``{"detail": ...}`` as FastAPI's own errors."""
        method = openai_api.METHOD if path.startswith("/v1/chat/") else "http"  # as the route counts it
        status = status_of(exc, method)
        metrics.REQUESTS.labels(method, status.code.name).inc()
        if path.startswith(openai_api.PATHS):
            content = openai_api.from_status(status, "request_too_large" if isinstance(exc, TooLarge) else None).body()
        else:
            content = {"detail": status.message}
        body = JSONResponse(content).body
        await send({"type": "http.response.start", "status": status.http,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(extra or [])]})
        await send({"type": "http.response.body", "body": body})

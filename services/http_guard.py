"""The ASGI layer in front of every HTTP route of the gateway (the OpenAI routes included):
authentication, the request-body bound and the body budget, applied before any route reads a
byte of the body. (What a connection may hold before it has sent a request at all - head and
body deadlines, header bounds, the connection bound - is ``services/http_transport.py``.)

Kept apart from the routes (``services/http.py``) because it is transport policy, not API: what
a connection may cost the server before it has proved who it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from p2r.services import metrics, openai_api
from p2r.services.errors import Overloaded, TooLarge, Unauthenticated, status_of
from p2r.services.security import bearer, read_keys, token_ok

if TYPE_CHECKING:
    from p2r.services.server import Server


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
"""FastAPI's generated API documentation (its default URLs, which ``create_app`` keeps): it
describes the API, so it is behind the API key like the API itself."""


class BodyBudget:
    """Bytes of request bodies the requests in progress may hold together
    (``ServeConfig.http_body_budget_bytes``). Each request reserves its ``Content-Length`` (a
    chunked one the per-request limit) before its body is read, and returns it when its answer
    has been sent - the parsed body and decoded image live that long. A request that does not
    fit now is refused 429 (retry later), so many concurrent maximal bodies cannot add up past
    the budget the memory margin was sized for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self, n: int) -> bool:
        if self.in_use + n > self.limit:
            return False
        self.in_use += n
        return True

    def give(self, n: int) -> None:
        self.in_use -= n


class Guard:
    """ASGI middleware in front of every route (the OpenAI routes included):

    - API keys (``authorization: Bearer KEY``) on ``/v1/...`` and the API documentation
      (``DOCS_PATHS``) when the server has keys, 401 otherwise, compared in constant time
      (``security.token_ok``), as vLLM's ``--api-key``; the probes and the page stay open;
    - the request body limit (``ServeConfig.max_http_body_bytes``): a larger ``Content-Length``
      is refused with 413 before anything is read, and a body that grows past the limit while
      streaming (chunked, or a lying length) is cut off with 413 at that point - never
      spooled to disk first;
    - the body budget shared by all requests in progress (``BodyBudget``): 429 past it.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.limit = server.config.max_http_body_bytes
        config = server.config
        self.keys = read_keys(config.api_key.get_secret_value() if config.api_key else None, config.api_keys_file)
        self.budget = BodyBudget(config.http_body_budget_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        guarded = path.startswith("/v1/") or path in DOCS_PATHS
        if self.keys and guarded and not token_ok(bearer(headers.get("authorization")), self.keys):
            await self._refuse(send, path, Unauthenticated(
                "API key missing or invalid: send 'Authorization: Bearer <API key>'"),
                [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, path, TooLarge(
                f"request body: {length} bytes, over the limit of {self.limit} bytes"))
            return
        cost = int(length) if length is not None and length.isdigit() else \
            self.limit if "transfer-encoding" in headers else 0
        if not self.budget.take(cost):
            await self._refuse(send, path, Overloaded(
                f"request body: {cost} bytes would pass the body budget of requests in progress "
                f"(http_body_budget_bytes={self.budget.limit}, {self.budget.in_use} in use); retry with backoff"))
            return
        try:
            await self._forward(scope, receive, send)
        finally:
            self.budget.give(cost)

    async def _forward(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """The route, with its body cut off at the per-request limit."""
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    status = status_of(TooLarge(f"request body: over the limit of {self.limit} bytes"),
                                       method_of(scope.get("path", "")))
                    raise HTTPException(status.http, status.message)
            return message

        await self.app(scope, limited, send)

    @staticmethod
    async def _refuse(send: Callable[[dict[str, Any]], Awaitable[None]], path: str, exc: Exception,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer ``exc`` before the route runs (``refusal``)."""
        status, body = refusal(path, exc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(extra or [])]})
        await send({"type": "http.response.body", "body": body})


ANSWER_METHOD = "http_answer"
"""The ``method`` label of ``POST /v1/answer`` in ``p2r_requests_total``."""


def method_of(path: str) -> str:
    """The ``method`` label a request to ``path`` is counted under, by the route and by every
    refusal in front of it alike: one series per route."""
    if path.startswith("/v1/chat/"):
        return openai_api.METHOD
    return ANSWER_METHOD if path.rstrip("/") == "/v1/answer" else "http"


def refusal(path: str | None, exc: Exception) -> tuple[int, bytes]:
    """HTTP status and JSON body of a request refused before its route ran, mapped by the one
    table (``services/errors.py``) and counted under its code: an OpenAI error object on the
    OpenAI routes, else ``{"detail": ...}`` as FastAPI's own errors (also when the path is not
    known: a request head that never parsed)."""
    path = path or ""
    method = method_of(path)
    status = status_of(exc, method)
    metrics.REQUESTS.labels(method, status.code.name).inc()
    if path.startswith(openai_api.PATHS):
        content = openai_api.from_status(status, "request_too_large" if isinstance(exc, TooLarge) else None).body()
    else:
        content = {"detail": status.message}
    return status.http, JSONResponse(content).body

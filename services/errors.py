"""The one mapping from an exception to what a client is told: gRPC code, HTTP status, message.

Every transport - the gRPC ``Server.call``, the HTTP facade, the OpenAI-compatible routes -
maps a failure through ``status_of``, so one failure has one meaning everywhere: the same code
in ``p2r_requests_total``, the same status family for a gRPC and an HTTP client.

To add an error kind, define the exception (here, or anywhere) and add one row to ``ERRORS``;
lookup walks the exception's MRO, so the most specific row wins and a subclass of a listed
type inherits its row. A type not in the table is a bug: ``INTERNAL``/500, logged with its
traceback - never reported as success and never disguised as the client's fault.

FAILED_PRECONDITION is HTTP 409 (Conflict), not 412: 412 is about HTTP conditional headers
(If-Match), while here the server's state (a checkpoint that is incomplete or missing) is what
refuses the request - the same choice as Google's AIP-193 / ``google.rpc.Code`` mapping.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import grpc

from p2r.services.checkpoints import CheckpointError

log = logging.getLogger("p2r.serve")


class InvalidArgument(ValueError):
    """A request field that is wrong; the message starts with the field's path."""


class UnsupportedMediaType(InvalidArgument):
    """A request body in a format the route does not take (HTTP 415; INVALID_ARGUMENT on gRPC)."""


class Overloaded(Exception):
    """More work than the admission limit; the client should retry with backoff."""


class FailedPrecondition(Exception):
    """The server's state refuses the request (e.g. a checkpoint that cannot be loaded)."""


class Unauthenticated(Exception):
    """No or wrong credentials."""


class PermissionDenied(Exception):
    """Valid credentials that may not do this (e.g. admin calls with a user key)."""


class NotFound(Exception):
    """The named thing (checkpoint, route, model) does not exist."""


class TooLarge(Exception):
    """A request over a size limit (HTTP body, image): RESOURCE_EXHAUSTED as gRPC itself reports
    an over-limit message, and HTTP 413 - not 429, since retrying the same request cannot help."""


class HeadersTooLarge(TooLarge):
    """Request header fields over their bound (bytes or count): HTTP 431, which names the part
    of the request that is too large; RESOURCE_EXHAUSTED as any other size limit."""


class Unavailable(Exception):
    """The server cannot serve now (starting, draining, engine gone); retry elsewhere or later."""


ERRORS: dict[type[BaseException], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    UnsupportedMediaType: (grpc.StatusCode.INVALID_ARGUMENT, 415),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, 403),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    CheckpointError: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    HeadersTooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 431),
    asyncio.CancelledError: (grpc.StatusCode.CANCELLED, 499),  # nginx's "client closed request"
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    TimeoutError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}
"""Exception type -> (gRPC code, HTTP status). The message is ``str(exc)``."""

UPSTREAM_HTTP = 502
"""A remote role (another gRPC server) failed: its gRPC code passes through, HTTP says 502."""


BUG_LOG_INTERVAL_S = 10.0
"""A bug's traceback is logged once per this interval per (method, exception type); the repeats
in between are counted and reported with the next traceback. A client that can trigger a bug in
a loop must not be able to fill the disk with tracebacks (40 MB in 150 s, issue 25)."""

_bug_log_lock = threading.Lock()
_bug_log: dict[tuple[str, str], tuple[float, int]] = {}
"""(method, exception type) -> (when its traceback was last logged, repeats not logged since)."""


def _log_bug(method: str, exc: BaseException) -> None:
    """Log ``exc``'s traceback, rate-limited per (method, type) by ``BUG_LOG_INTERVAL_S``."""
    key = (method, type(exc).__qualname__)
    now = time.monotonic()
    with _bug_log_lock:
        last, skipped = _bug_log.get(key, (-BUG_LOG_INTERVAL_S, 0))
        if now - last < BUG_LOG_INTERVAL_S:
            _bug_log[key] = (last, skipped + 1)
            return
        _bug_log[key] = (now, 0)
    if skipped:
        log.error("%s failed (%d more %s not logged in the last %.0f s)", method, skipped, key[1],
                  now - last, exc_info=exc)
    else:
        log.error("%s failed", method, exc_info=exc)


@dataclass(frozen=True)
class Status:
    """What a client is told about a failed call."""

    code: grpc.StatusCode
    http: int
    message: str
    fatal: bool = False
    """The engine is dead: the process must report NOT_SERVING and exit so it is restarted."""


def status_of(exc: BaseException, method: str, engine_dead: bool = False) -> Status:
    """Map ``exc``, raised while serving ``method``, to its status.

    ``engine_dead`` is whether the serving engine has errored: then an unexpected exception is
    the engine's death (UNAVAILABLE/503, fatal), not a bug of this request.
    """
    if isinstance(exc, grpc.aio.AioRpcError):  # a remote role failed: pass its status through
        return Status(exc.code(), UPSTREAM_HTTP, f"upstream: {exc.details()}")
    for klass in type(exc).__mro__:
        if klass in ERRORS:
            code, http = ERRORS[klass]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Status(code, http, f"{method}: deadline exceeded; engine request aborted")
            return Status(code, http, str(exc))
    _log_bug(method, exc)
    message = f"{type(exc).__name__}: {exc}"
    if engine_dead:
        return Status(grpc.StatusCode.UNAVAILABLE, 503, message, fatal=True)
    return Status(grpc.StatusCode.INTERNAL, 500, message)

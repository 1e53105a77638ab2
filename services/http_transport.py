"""The HTTP port's connection layer: what a peer may hold before it has sent a request.

uvicorn on its own bounds none of it: its default parser (httptools) takes headers of any size,
and a connection that never completes a request head is kept forever (its keep-alive timer
starts only after a first response, and any byte re-arms nothing). ``GuardedH11Protocol`` is
uvicorn's h11 protocol with the missing bounds (``ServeConfig`` ``http_*`` fields):

- **head deadline**: a connection must send a complete request head within
  ``http_header_timeout_s`` of opening, or of its first byte after a response (idle keep-alive
  connections are closed after ``http_keep_alive_s`` by uvicorn);
- **body deadline**: the whole body within ``http_body_timeout_s`` of the head;
- **header bounds**: ``http_max_header_bytes`` (h11's incomplete-event limit: the request line and
  every field) and ``http_max_headers`` fields; past either the answer is 431 and the
  connection closes;
- **connection bound**: past ``http_max_connections`` the oldest idle connection (no request in
  progress: a slow or silent head, or keep-alive) is closed for the new one; when every
  connection is busy the new one is served only for the probes (``/healthz``, ``/readyz``), others
  get 503, and past ``PROBE_RESERVE`` more it is closed at once. So a flood of silent connections
  never locks a probe (or a real client) out, and the fds stay bounded.

TLS handshakes run in asyncio before any of this; ``configure_tls_handshake`` bounds them with the
same head deadline. Where buffering cannot be avoided: the request head (up to
``http_max_header_bytes``) is read before the API key can be checked, since the key is a header;
body bytes are read only when a route asks (uvicorn pauses the socket past 64 KiB unread).

Repeated failures (a flood of bad connections) log once per window, not once each
(``RateLimitFilter``).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from p2r.services.errors import HeadersTooLarge, InvalidArgument, Unavailable
from p2r.services.http_guard import refusal

if TYPE_CHECKING:
    from p2r.services.config import ServeConfig

log = logging.getLogger("p2r.http")

PROBE_PATHS = (b"/healthz", b"/readyz")
PROBE_RESERVE = 64
"""Connections past ``http_max_connections`` that may still ask a probe when none can be evicted."""


@dataclass(frozen=True)
class ConnectionPolicy:
    """The bounds of one HTTP port, from ``ServeConfig``."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_headers: int

    @classmethod
    def of(cls, config: ServeConfig) -> ConnectionPolicy:
        return cls(config.http_max_connections, config.http_header_timeout_s, config.http_body_timeout_s,
                   config.http_max_header_bytes, config.http_max_headers)


class _Connection(h11.Connection):
    """h11's connection that tells its protocol when a request head and its end arrive, bounds
    the header count, and keeps the last protocol error (for its status hint: 431 vs 400)."""

    def __init__(self, owner: GuardedH11Protocol, max_header_bytes: int, max_headers: int) -> None:
        super().__init__(h11.SERVER, max_header_bytes)
        self.owner = owner
        self.max_headers = max_headers
        self.last_error: h11.RemoteProtocolError | None = None
        self.last_path: str | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self.last_path = event.target.partition(b"?")[0].decode("latin-1")
                self._check_head(event)
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise
        if isinstance(event, h11.Request):
            self.owner.head_received(event)
        elif isinstance(event, h11.EndOfMessage):
            self.owner.body_received()
        return event

    def _check_head(self, event: h11.Request) -> None:
        """h11 checks its size bound only while a head is incomplete, so a head that arrived in
        one read (up to 256 KiB) passes it: its size is checked here again, with the count."""
        if len(event.headers) > self.max_headers:
            raise h11.RemoteProtocolError(
                f"request header fields: {len(event.headers)}, over the limit http_max_headers={self.max_headers}",
                error_status_hint=431)
        size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
        limit = self._max_incomplete_event_size
        if size > limit:
            raise h11.RemoteProtocolError(
                f"request header fields: {size} bytes, over the limit http_max_header_bytes={limit}",
                error_status_hint=431)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines and a connection bound (see the module docstring).
    ``bound`` makes the subclass of one server: its policy and its registry of connections."""

    policy: ConnectionPolicy
    registry: dict[GuardedH11Protocol, None]
    closing: bool = False
    """Set when the server drains: a connection made from then on (accepted from the kernel's
    queue as the port closed) is draining from the start."""

    @classmethod
    def bound(cls, policy: ConnectionPolicy) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {"policy": policy, "registry": {}})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(self, self.policy.max_header_bytes, self.policy.max_headers)
        self._deadline: asyncio.TimerHandle | None = None
        self.probe_only = False
        self.requests = 0
        """Request heads read on this connection."""
        self.draining = False

    # ------------------------------------------------------------------- connection lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.registry[self] = None
        self.draining = type(self).closing
        self._arm(self.policy.header_timeout_s, "no complete request head")
        open_ = [p for p in self.registry if not p.transport.is_closing()]
        if len(open_) <= self.policy.max_connections:
            return
        victim = next((p for p in open_ if p is not self and p.idle and not p.request_waiting()), None)
        if victim is not None:
            _closed("connection limit: closed the oldest idle connection", victim)
            victim.transport.close()
        elif len(open_) > self.policy.max_connections + PROBE_RESERVE:
            _closed("connection limit: every connection busy, refused a new one", self)
            transport.close()
        else:
            self.probe_only = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.registry.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.idle:  # the first byte of a new request on a kept-alive connection
            self._arm(self.policy.header_timeout_s, "no complete request head")
        super().data_received(data)

    def shutdown(self) -> None:
        """The drain (uvicorn's shutdown, on SIGTERM). uvicorn closes every connection with no
        request in progress at once, which drops a request the peer has already sent on a
        connection just accepted but not yet read: the client sees its request cut with no
        answer. Such a new connection (no request read yet) gets the head deadline to send its
        head, as Go's ``http.Server.Shutdown`` gives new connections; its request is answered and
        the connection then closes. A kept-alive one that has served requests closes at once, as
        before (a client reusing it retries, the usual keep-alive race)."""
        if self.requests == 0 and self.cycle is None and not self.transport.is_closing():
            self.draining = True
            return
        super().shutdown()

    def handle_events(self) -> None:
        super().handle_events()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # one request, then the connection closes

    def request_waiting(self) -> bool:
        """Bytes have arrived that the loop has not read yet: under a burst of new connections,
        a client's request sits in the socket while the loop is busy accepting. Such a connection
        is not evicted for a newcomer (that would reset a request already sent); a silent one is."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
        except OSError:
            return False

    @property
    def idle(self) -> bool:
        """No request in progress: waiting for a head, or kept alive after a response."""
        return self.cycle is None or self.cycle.response_complete

    # ------------------------------------------------------------------- request events

    def head_received(self, event: h11.Request) -> None:
        self.requests += 1
        self._arm(self.policy.body_timeout_s, "request body incomplete")
        if self.probe_only and event.target.partition(b"?")[0] not in PROBE_PATHS:
            self.app = _unavailable

    def body_received(self) -> None:
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refuses, with h11's status (431 for header fields
        over the bounds, else 400) and a JSON error (``http_guard.refusal``: the one table,
        an OpenAI error object on the OpenAI routes)."""
        self._disarm()
        error = self.conn.last_error
        if error is not None and error.error_status_hint == 431:
            detail = str(error) if "fields:" in str(error) else \
                f"request header fields: over the limit http_max_header_bytes={self.policy.max_header_bytes}"
            status, body = refusal(self.conn.last_path, HeadersTooLarge(detail))
        else:
            status, body = refusal(self.conn.last_path,
                                   InvalidArgument(f"request: not valid HTTP/1.1: {error or msg}"))
        log.warning("refused a request from %s: %d %s", _peer(self), status, body.decode(errors="replace"))
        try:
            for event in (h11.Response(status_code=status, reason=STATUS_PHRASES[status], headers=[
                              (b"content-type", b"application/json"), (b"connection", b"close"),
                              (b"content-length", str(len(body)).encode())]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started: nothing more to say
            pass
        self.transport.close()

    # ------------------------------------------------------------------- deadlines

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, seconds, why)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, seconds: float, why: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            _closed(f"{why} within {seconds:g} s: closed", self)
            self.transport.close()


async def _unavailable(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The answer on a connection past the bound when it asks anything but a probe."""
    status, body = refusal(scope.get("path"), Unavailable(
        "too many connections: only /healthz and /readyz are served on this one; retry with backoff"))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _peer(protocol: H11Protocol) -> str:
    return f"{protocol.client[0]}:{protocol.client[1]}" if protocol.client else "?"


def _closed(why: str, protocol: H11Protocol) -> None:
    log.warning("%s (%s)", why, _peer(protocol))


# ------------------------------------------------------------------------------- logging


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records of one kind (logger and message template) per ``window_s``
    seconds; the next one let through says how many were dropped. A flood of bad connections
    then costs a few lines a minute, not 187 MB of log in 45 s."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # key -> (window start, passed, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        start, passed, dropped = self._seen.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            start, passed = now, 0
        if passed >= self.burst:
            self._seen[key] = (start, passed, dropped + 1)
            return False
        if dropped:
            record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
        self._seen[key] = (start, passed + 1, 0)
        if len(self._seen) > 1024:  # many distinct messages: forget the oldest kinds
            for old in list(self._seen)[:512]:
                del self._seen[old]
        return True


def rate_limit_logs(*names: str) -> None:
    """Put one ``RateLimitFilter`` on each named logger (once)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter())


# ------------------------------------------------------------------------------- uvicorn


def close_listeners(server: Any) -> None:
    """Stop accepting on the HTTP port without dropping what the kernel has already accepted.

    Closing a listening socket resets every connection still in its accept queue: connections
    whose handshake the kernel completed, and whose clients have sent their requests, but that
    the event loop had not yet taken (under a burst of new connections, tens of them; seen in
    bench/soak.py's SIGTERM phase). So the queue is emptied first, through asyncio's own accept
    path, and the sockets are closed in the same step, leaving no window for more. The
    connections taken this way are draining from the start (``GuardedH11Protocol.shutdown``):
    their request is answered, then they close. Uses asyncio's ``Server`` internals (Python 3.11
    ``base_events.Server`` and the selector loop's ``_accept_connection``); where they differ,
    the port is just closed, as uvicorn would."""
    loop = asyncio.get_running_loop()
    protocol_class = server.config.http_protocol_class
    if isinstance(protocol_class, type) and issubclass(protocol_class, GuardedH11Protocol):
        protocol_class.closing = True
    accept = getattr(loop, "_accept_connection", None)
    for listener in server.servers:
        for sock in listener._sockets or ():
            if accept is not None:
                try:
                    accept(listener._protocol_factory, sock, listener._ssl_context, None, listener._backlog,
                           listener._ssl_handshake_timeout)
                except OSError as e:  # out of fds: what is queued stays queued, and is reset below
                    log.warning("draining: could not empty the accept queue: %s", e)
        listener.close()


def configure_tls_handshake(timeout_s: float) -> None:
    """asyncio runs a TLS handshake before the protocol exists, bounded by a process-wide
    default (60 s) that uvicorn does not expose; this process serves, so its handshakes get
    the head deadline instead. (gRPC's ports use ``grpc_handshake_timeout_s``.)"""
    import asyncio.constants

    asyncio.constants.SSL_HANDSHAKE_TIMEOUT = timeout_s


def uvicorn_config(app: Any, config: ServeConfig, tls_kwargs: dict[str, Any]) -> Any:
    """The ``uvicorn.Config`` of the HTTP port, with the bounds above."""
    import uvicorn

    policy = ConnectionPolicy.of(config)
    rate_limit_logs("uvicorn.error", "p2r.http")
    if tls_kwargs:
        configure_tls_handshake(config.http_header_timeout_s)
    return uvicorn.Config(
        app, host=config.host, port=config.http_port or 0, log_level="warning", lifespan="off",
        http=GuardedH11Protocol.bound(policy), h11_max_incomplete_event_size=config.http_max_header_bytes,
        timeout_keep_alive=config.http_keep_alive_s, **tls_kwargs)

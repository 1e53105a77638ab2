"""``p2r serve``: the gRPC server (role services, P2R gateway, admin, health, reflection),
the Prometheus endpoint and, on the gateway, the HTTP facade - one process, one event loop.

Every RPC goes through ``Server.call``: admission control (work items beyond
``max_in_flight`` are refused with RESOURCE_EXHAUSTED at once), the client's deadline (the
engine request is aborted when it passes), error-to-status mapping and metrics. SIGTERM flips
health to NOT_SERVING, stops accepting on every port (gRPC, admin, HTTP) and drains the
in-flight work of gRPC and HTTP together (unary answers, and streams to their end) for
``grace_period_s``; only then is the engine stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from p2r.services import metrics
from p2r.services.allocator import return_large_frees_to_os
from p2r.services.checkpoints import resolve_checkpoint
from p2r.services.client import aio_channel
from p2r.services.config import ServeConfig, connection_age_options, connection_options
from p2r.services.engine import AsyncEngine, EngineLimits, TensorLayout, check_layout, checkpoint_layout
from p2r.services.errors import FailedPrecondition, InvalidArgument, Overloaded, PermissionDenied, Status, status_of
from p2r.services.handlers import Handlers, RoleBackend, answer, answer_events, validate_answer
from p2r.services.protocol import ADMIN_SERVICE, MAX_MESSAGE_BYTES, SERVICE_NAMES
from p2r.services.security import BearerAuthInterceptor, TLSFiles, read_keys, read_secret
from p2r.services.streaming import relay
from p2r.services.wire import DecodeErrorInterceptor
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc

log = logging.getLogger("p2r.serve")

class Admission:
    """Counts admitted work items; refuses, instead of queueing, beyond the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        metrics.MAX_IN_FLIGHT.set(limit)

    def can_ever_run(self, items: int) -> None:
        """More than the whole capacity can never run, idle or not: the client's mistake, and
        INVALID_ARGUMENT is never retried (RESOURCE_EXHAUSTED would be, in vain)."""
        if items > self.limit:
            raise InvalidArgument(
                f"requests: {items} completions (items x sampling.n) in one call, over the server's "
                f"admission capacity max_in_flight={self.limit}; split the batch")

    @contextlib.contextmanager
    def admit(self, items: int):  # type: ignore[no-untyped-def]
        self.can_ever_run(items)
        if self.in_flight + items > self.limit:
            metrics.REJECTED.inc(items)
            raise Overloaded(
                f"server is at capacity: {self.in_flight} work items in flight, {items} more requested, "
                f"limit {self.limit}; retry with backoff"
            )
        self.in_flight += items
        metrics.IN_FLIGHT.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= items
            metrics.IN_FLIGHT.set(self.in_flight)


class RemoteRole:
    """A perceiver or reasoner on another server, for a gateway that does not host it."""

    def __init__(self, target: str) -> None:
        # Credentials for the role servers come from the gateway pod's Secrets (env), as for
        # every other client (services/security.py ClientCredentials.from_env).
        self.channel = aio_channel(target)
        self.perceiver = pb_grpc.PerceiverStub(self.channel)
        self.reasoner = pb_grpc.ReasonerStub(self.channel)

    async def perceive(self, req: pb.PerceiveRequest) -> pb.PerceiveResult:
        return await self.perceiver.Perceive(req, timeout=_remaining())

    async def reason(self, req: pb.ReasonRequest) -> pb.ReasonResult:
        return await self.reasoner.Reason(req, timeout=_remaining())

    async def reason_stream(self, req: pb.ReasonRequest) -> AsyncIterator[str | pb.ReasonResult]:
        """The Reasoner service has no streaming RPC: a remote reasoner's reply arrives whole,
        as one delta, then its result (a gateway streams token by token when it hosts the
        reasoner itself)."""
        result = await self.reason(req)
        yield result.completions[0].text
        yield result


# The deadline of the RPC being served, so calls to remote roles inherit what is left of it.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("p2r_deadline", default=None)


def _remaining() -> float | None:
    deadline = _deadline.get()
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class Server:
    """All services of one ``p2r serve`` process."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.handlers: Handlers | None = None
        self.admission = Admission(config.max_in_flight)
        self.grpc: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.checkpoint = ""
        self.ready = False
        """Health and /readyz: SERVING between start-up and SIGTERM (load balancers take the pod
        out of rotation as soon as it drains)."""
        self.serving = False
        """Requests that reach a route are served: from start-up until the drain has ended. A
        request read during the drain (its connection was accepted before SIGTERM) is answered,
        not refused: the engine is up until then."""
        self.failed = False
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.admin_port: int | None = None
        self._admin_grpc: grpc.aio.Server | None = None
        self._reloading: str | None = None  # the URI being reloaded
        self._layout: TensorLayout = {}
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._backends: tuple[RoleBackend, RoleBackend] | None = None
        self._stopped = asyncio.Event()

    # ----------------------------------------------------------------------------- lifecycle

    def load_engine(self) -> None:
        if self.config.model is None:
            self.handlers = Handlers(self.config, None)
            return
        path = resolve_checkpoint(self.config.model, self.config.model_cache, self.config.allow_unverified_local)
        # What a reload is checked against: the tensors the engine was built from.
        self._layout = checkpoint_layout(path)
        limits = EngineLimits(**self.config.limits.model_dump())
        self.engine = AsyncEngine(str(path), limits, seed=self.config.seed)
        self.handlers = Handlers(self.config, self.engine)
        self.checkpoint = self.config.model
        metrics.CHECKPOINT.info({"uri": self.checkpoint})

    def backends(self) -> tuple[RoleBackend, RoleBackend]:
        """The gateway's perceiver and reasoner: this process's handlers, or remote servers."""
        assert self.handlers is not None
        if self._backends is None:

            def pick(endpoint: str) -> RoleBackend:
                return self.handlers if endpoint == "local" else RemoteRole(endpoint)  # type: ignore[return-value]

            self._backends = (pick(self.config.perceiver_endpoint), pick(self.config.reasoner_endpoint))
        return self._backends

    async def start(self) -> None:
        """Load the model, then open the ports; health turns SERVING only when all is ready."""
        tls = self._tls()
        if self.config.metrics_port is not None:
            self.metrics_port = metrics.serve_metrics(self.config.metrics_port, self.config.host,
                                                      **(tls.metrics_kwargs() if tls else {}))
        self.load_engine()
        # The server-wide receive limit fits a full batch, so a larger message is refused by gRPC
        # itself (RESOURCE_EXHAUSTED); single-item methods are held to one item's worth on the
        # serialized length (wire.py), and a caller without the API key is refused before its
        # message is read at all (security.py _deny).
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", self.config.max_receive_bytes),
                   *connection_age_options(self.config), *connection_options(self.config)]
        keys = read_keys(self.config.api_key.get_secret_value() if self.config.api_key else None,
                         self.config.api_keys_file)
        self.grpc = grpc.aio.server(
            options=options,
            interceptors=[DecodeErrorInterceptor(self.config.max_unary_receive_bytes),
                          *([BearerAuthInterceptor(keys, "API key")] if keys else [])])
        names = [SERVICE_NAMES[r] for r in self.config.roles]
        servicers = _Servicers(self)
        if "perceiver" in self.config.roles:
            pb_grpc.add_PerceiverServicer_to_server(servicers.perceiver, self.grpc)
        if "reasoner" in self.config.roles:
            pb_grpc.add_ReasonerServicer_to_server(servicers.reasoner, self.grpc)
        if "verifier" in self.config.roles:
            pb_grpc.add_VerifierServicer_to_server(servicers.verifier, self.grpc)
        if "gateway" in self.config.roles:
            pb_grpc.add_P2RServicer_to_server(servicers.gateway, self.grpc)
        # Admin on the public port answers Status only (read-only: the trainer checks its batch
        # size against it); LoadCheckpoint is served on the admin port alone.
        pb_grpc.add_AdminServicer_to_server(_PublicAdmin(self), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*names, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.grpc)
        address = f"{self.config.host}:{self.config.port}"
        self.port = (self.grpc.add_secure_port(address, tls.server_credentials(self.config.tls.require_client_cert))
                     if tls else self.grpc.add_insecure_port(address))
        await self.grpc.start()
        if self.config.admin_enabled:
            await self._start_admin(servicers.admin, options, tls)
        if "gateway" in self.config.roles and self.config.http_port is not None:
            await self._start_http()
        for name in ["", *names, ADMIN_SERVICE]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = self.serving = True
        log.info("p2r serve: %s on %s:%d ready", ",".join(self.config.roles), self.config.host, self.port)

    def _tls(self) -> TLSFiles | None:
        t = self.config.tls
        if t.cert_file is None or t.key_file is None:
            return None
        return TLSFiles(t.cert_file, t.key_file, t.ca_file, t.require_client_cert)

    async def _start_admin(self, admin: Any, options: list[tuple[str, Any]], tls: TLSFiles | None) -> None:
        """The admin port: Admin (LoadCheckpoint swaps the served model) and health, behind the
        admin token and/or client certificates (mTLS whenever a CA is configured)."""
        token = read_secret(self.config.admin_token.get_secret_value() if self.config.admin_token else None,
                            self.config.admin_token_file)
        self._admin_grpc = grpc.aio.server(
            options=options,
            interceptors=[DecodeErrorInterceptor(self.config.max_unary_receive_bytes),
                          *([BearerAuthInterceptor([token], "admin token")] if token else [])])
        pb_grpc.add_AdminServicer_to_server(admin, self._admin_grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._admin_grpc)
        address = f"{self.config.host}:{self.config.admin_port}"
        # Token or mTLS: without a token, a configured CA makes client certificates required.
        self.admin_port = (self._admin_grpc.add_secure_port(address, tls.server_credentials(
                               require_client_cert=token is None and tls.ca is not None))
                           if tls else self._admin_grpc.add_insecure_port(address))
        await self._admin_grpc.start()

    async def _start_http(self) -> None:
        import uvicorn

        from p2r.services.http import create_app
        from p2r.services.http_transport import uvicorn_config

        tls = self._tls()
        self._http = uvicorn.Server(uvicorn_config(create_app(self), self.config, tls.uvicorn_kwargs() if tls else {}))
        self._http.install_signal_handlers = lambda: None  # SIGTERM is ours
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises why it did not start
                raise RuntimeError("the HTTP port did not start")
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting on every port at once, drain gRPC and HTTP in-flight work together for
        the grace period, then release the engine (which in-flight work still needs until then)."""
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s if grace is None else grace
        log.info("p2r serve: draining (grace %.1f s, %d items in flight)", grace, self.admission.in_flight)
        drains = []
        if self._admin_grpc is not None:
            drains.append(self._admin_grpc.stop(0))
        if self.grpc is not None:
            drains.append(self.grpc.stop(grace))
        if self._http is not None:
            drains.append(self._drain_http(grace))
        await asyncio.gather(*drains)
        self.serving = False
        if self.engine is not None:
            self.engine.shutdown()
        self._stopped.set()

    async def _drain_http(self, grace: float) -> None:
        """uvicorn's own shutdown: it closes the listening socket and idle connections at once,
        lets each request in progress finish its response (a stream to its ``[DONE]``) and closes
        its connection after it, for at most ``grace`` seconds; then it cancels what is left."""
        assert self._http is not None and self._http_task is not None
        from p2r.services.http_transport import close_listeners

        close_listeners(self._http)
        self._http.config.timeout_graceful_shutdown = grace
        self._http.should_exit = True
        try:
            await self._http_task
        except Exception:  # a failed HTTP port must not keep the rest from stopping
            log.exception("p2r serve: the HTTP port failed while draining")

    async def wait(self) -> None:
        await self._stopped.wait()

    # ----------------------------------------------------------------------------- calls

    async def call(
        self, method: str, context: grpc.aio.ServicerContext, items: int, work: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run one RPC: admission, deadline, status mapping, metrics."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        remaining = context.time_remaining()
        token = _deadline.set(None if remaining is None else time.monotonic() + remaining)
        try:
            with self.admission.admit(items):
                if remaining is None:
                    return await work()
                return await asyncio.wait_for(work(), timeout=remaining)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            status = self.status_of(method, e)
            code, message = status.code, status.message
        finally:
            _deadline.reset(token)
            metrics.REQUESTS.labels(method, code.name).inc()
            metrics.LATENCY.labels(method).observe(time.perf_counter() - started)
        await context.abort(code, message)

    def status_of(self, method: str, exc: Exception) -> Status:
        """``errors.status_of`` for this process, for every transport: a dead engine does not come
        back, so it turns the process NOT_SERVING and makes it exit non-zero (the orchestrator
        restarts it)."""
        status = status_of(exc, method, engine_dead=self.engine is not None and self.engine.llm.errored)
        if status.fatal and not self.failed:
            self.failed = True
            asyncio.get_running_loop().create_task(self.stop(grace=0))
        return status

    async def refuse(self, method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """End an RPC that failed before ``call`` admitted it (a batch over the limits), mapped and
        counted like a failure inside it."""
        status = self.status_of(method, exc)
        metrics.REQUESTS.labels(method, status.code.name).inc()
        await context.abort(status.code, status.message)

    async def reload(self, uri: str) -> float:
        """Load a checkpoint into the running engine, one reload at a time.

        A reload while another runs is refused at once ("reload in progress"), never queued:
        queued reloads behind a hanging object store used to pin threads until no reload could
        run at all. The download and the checks run on a thread of their own; when the caller
        gives up (deadline, cancel) the download is told to stop (its partial files are removed)
        and the slot is free at once - an abandoned download can never reach the engine. Every
        tensor's name, shape and dtype is checked against the running model *before* the engine
        is touched, so a refused checkpoint changes nothing and the old weights keep serving.
        Once the swap itself has started it runs to the end (a half-swapped model is worse than
        a late answer); the slot frees when it is done.
        """
        if self.engine is None:
            raise InvalidArgument("uri: this server has no engine to load a checkpoint into")
        if self._reloading is not None:
            raise FailedPrecondition(f"uri: reload in progress ({self._reloading}); retry when it is done")
        self._reloading = uri
        started = time.perf_counter()
        cancel = threading.Event()
        try:
            path = await _in_thread(self._prepare_reload, uri, cancel)
        except BaseException:
            cancel.set()
            self._reloading = None
            metrics.RELOADS.labels("failed").inc()
            raise
        swap = asyncio.ensure_future(self._swap(uri, path, started))
        swap.add_done_callback(self._reload_done)
        return await asyncio.shield(swap)

    def _prepare_reload(self, uri: str, cancel: threading.Event) -> Path:
        """Resolve (download, verify) ``uri`` and check its tensors against the running model."""
        path = resolve_checkpoint(uri, self.config.model_cache, self.config.allow_unverified_local, cancel)
        check_layout(checkpoint_layout(path), self._layout, uri)
        return path

    async def _swap(self, uri: str, path: Path, started: float) -> float:
        assert self.engine is not None
        try:
            await self.engine.reload_weights(str(path))
        except Exception:
            metrics.RELOADS.labels("failed").inc()
            raise
        metrics.RELOADS.labels("ok").inc()
        self.checkpoint = uri
        metrics.CHECKPOINT.info({"uri": uri})
        return time.perf_counter() - started

    def _reload_done(self, task: asyncio.Future[float]) -> None:
        self._reloading = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("reload failed: %s", task.exception())


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a new daemon thread. Unlike ``asyncio.to_thread`` it takes no slot of
    the shared default executor, so abandoned calls (an object store that never answers) can
    never exhaust it; cancelling the await abandons the thread, which must stop on its own."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="p2r-reload", daemon=True).start()
    return await future


class _Servicers:
    """Thin gRPC adapters: each method is one ``Server.call`` around a handler."""

    def __init__(self, server: Server) -> None:
        self.perceiver = _Perceiver(server)
        self.reasoner = _Reasoner(server)
        self.verifier = _Verifier(server)
        self.gateway = _Gateway(server)
        self.admin = _Admin(server)


def _batch_size(requests: Any, limit: int, max_n: int) -> int:
    """Admission cost of a batch: its completions (items x sampling.n), so one request asking
    for many samples is counted as the work it is."""
    if not requests:
        raise InvalidArgument("requests: the batch is empty")
    if len(requests) > limit:
        raise InvalidArgument(f"requests: {len(requests)} items, over the batch limit max_batch_items={limit}")
    return sum(completions(r, max_n, f"requests[{i}].") for i, r in enumerate(requests))


def completions(request: Any, max_n: int, field: str = "") -> int:
    """Completions a request asks for (``sampling.n``, default 1; a verify request has one),
    checked against ``max_n`` before admission so the refusal names the field."""
    sampling = getattr(request, "sampling", None)
    n = max(1, sampling.n) if sampling is not None and sampling.HasField("n") else 1
    if n > max_n:
        raise InvalidArgument(f"{field}sampling.n: {n} completions, over the limit max_n={max_n}")
    return n


class _Base:
    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def h(self) -> Handlers:
        assert self.server.handlers is not None
        return self.server.handlers

    # Every request is validated before admission (cheap: no decoding): a bad one is
    # INVALID_ARGUMENT naming its field under any load - never RESOURCE_EXHAUSTED, which the
    # clients would retry in vain.

    async def _batch(self, method: str, context: Any, requests: Any, prepare: Any, run: Any) -> list[Any]:
        items = list(requests)
        try:
            n = _batch_size(items, self.server.config.max_batch_items, self.server.config.max_n)
            self.server.admission.can_ever_run(n)
            builders = self.h.plan(items, prepare)
        except Exception as e:
            await self.server.refuse(method, context, e)
        return await self.server.call(method, context, n, lambda: self.h.run_planned(items, builders, run))

    async def _single(self, method: str, context: Any, request: Any, prepare: Any, run: Any) -> Any:
        try:
            n = completions(request, self.server.config.max_n)
            builders = self.h.plan([request], prepare, single=True)
        except Exception as e:
            await self.server.refuse(method, context, e)

        async def work() -> Any:
            [result] = await self.h.run_planned([request], builders, run, single=True)
            return result

        return await self.server.call(method, context, n, work)

    async def _checked(self, method: str, context: Any, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception as e:
            await self.server.refuse(method, context, e)


class _Perceiver(_Base, pb_grpc.PerceiverServicer):
    async def Perceive(self, request: pb.PerceiveRequest, context: Any) -> pb.PerceiveResult:
        return await self._single("Perceive", context, request, self.h.prepare_perceive, self.h.run_perceive)

    async def PerceiveBatch(self, request: pb.PerceiveBatchRequest, context: Any) -> pb.PerceiveBatchResponse:
        results = await self._batch("PerceiveBatch", context, request.requests, self.h.prepare_perceive,
                                    self.h.run_perceive)
        return pb.PerceiveBatchResponse(results=results)


class _Reasoner(_Base, pb_grpc.ReasonerServicer):
    async def Reason(self, request: pb.ReasonRequest, context: Any) -> pb.ReasonResult:
        return await self._single("Reason", context, request, self.h.prepare_reason, self.h.run_reason)

    async def ReasonBatch(self, request: pb.ReasonBatchRequest, context: Any) -> pb.ReasonBatchResponse:
        results = await self._batch("ReasonBatch", context, request.requests,
                                    self.h.reason_preparer(request.images), self.h.run_reason)
        return pb.ReasonBatchResponse(results=results)


class _Verifier(_Base, pb_grpc.VerifierServicer):
    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResult:
        return await self._single("Verify", context, request, self.h.prepare_verify, self.h.run_verify)

    async def VerifyBatch(self, request: pb.VerifyBatchRequest, context: Any) -> pb.VerifyBatchResponse:
        results = await self._batch("VerifyBatch", context, request.requests, self.h.prepare_verify,
                                    self.h.run_verify)
        return pb.VerifyBatchResponse(results=results)


class _Gateway(_Base, pb_grpc.P2RServicer):
    async def Answer(self, request: pb.AnswerRequest, context: Any) -> pb.AnswerResponse:
        perceiver, reasoner = self.server.backends()
        await self._checked("Answer", context, lambda: validate_answer(request, self.h))
        return await self.server.call("Answer", context, 1, lambda: answer(request, self.h, perceiver, reasoner))

    async def AnswerStream(self, request: pb.AnswerRequest, context: Any) -> AsyncIterator[pb.AnswerEvent]:
        perceiver, reasoner = self.server.backends()
        await self._checked("AnswerStream", context, lambda: validate_answer(request, self.h))
        # Answer's call wrapper, held for the whole stream; cancelling the RPC cancels the relay.
        async for event in relay(lambda work: self.server.call("AnswerStream", context, 1, work),
                                 lambda: answer_events(request, self.h, perceiver, reasoner)):
            yield event


class _Admin(_Base, pb_grpc.AdminServicer):
    async def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: Any) -> pb.LoadCheckpointResponse:
        async def work() -> pb.LoadCheckpointResponse:
            if not request.uri:
                raise InvalidArgument("uri: required")
            seconds = await self.server.reload(request.uri)
            return pb.LoadCheckpointResponse(uri=request.uri, seconds=seconds)

        # A reload is admin work, not request work: it takes no admission slot.
        return await self.server.call("LoadCheckpoint", context, 0, work)

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        s = self.server
        return pb.StatusResponse(checkpoint=s.checkpoint, roles=list(s.config.roles),
                                 in_flight=s.admission.in_flight, max_in_flight=s.admission.limit,
                                 max_batch_items=s.config.max_batch_items, max_n=s.config.max_n,
                                 max_receive_bytes=s.config.max_receive_bytes)


class _PublicAdmin(_Admin):
    """Admin as the public port serves it: Status only."""

    async def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: Any) -> pb.LoadCheckpointResponse:
        async def work() -> pb.LoadCheckpointResponse:
            raise PermissionDenied("LoadCheckpoint is served on the admin port only (admin_port), with its token")

        return await self.server.call("LoadCheckpoint", context, 0, work)


def _raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one: each connection is a descriptor, and the
    bounds that matter are ``http_max_connections`` and gRPC's idle/age limits, not a soft limit
    of 1,024 that many runtimes start a process with."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit."""
    return_large_frees_to_os()  # before any image is decoded (allocator.py)
    _raise_fd_limit()
    server = Server(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(server.stop())))
    await server.start()
    # What is loaded now (torch, vLLM, the engine client: ~700k objects) lives as long as the
    # process: out of the collector's reach, a full collection scans only what requests create.
    # The decoded-image budget collects before refusing a decode (image_cache.py); that took
    # 0.4 s under its lock, per refusal, with the startup heap still tracked.
    gc.freeze()
    print(f"p2r serve ready: grpc={config.host}:{server.port} metrics={server.metrics_port} "
          f"http={server.http_port} roles={','.join(config.roles)} "
          f"admin={f'{config.host}:{server.admin_port}' if server.admin_port else None}", flush=True)
    await server.wait()
    if server.failed:
        raise SystemExit("p2r serve: the engine died; exiting so the process is restarted")

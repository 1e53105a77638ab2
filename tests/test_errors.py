"""The one exception -> (gRPC code, HTTP status, message) mapping (``services/errors.py``), and both
transports using it: the gRPC ``Server.call`` and the HTTP facade count a bug as INTERNAL."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from p2r.services.checkpoints import CheckpointError
from p2r.services.errors import (
    ERRORS,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    status_of,
)
from p2r.v1 import p2r_pb2 as pb
from p2r.v1 import p2r_pb2_grpc as pb_grpc
from tests.grpc_support import loopback_server

C = grpc.StatusCode


class _Subclassed(InvalidArgument):
    """A subclass of a listed type inherits its row."""


@pytest.mark.parametrize(("exc", "code", "http", "message"), [
    (InvalidArgument("image: empty"), C.INVALID_ARGUMENT, 400, "image: empty"),
    (_Subclassed("question: empty"), C.INVALID_ARGUMENT, 400, "question: empty"),
    (Unauthenticated("no bearer token"), C.UNAUTHENTICATED, 401, "no bearer token"),
    (PermissionDenied("admin only"), C.PERMISSION_DENIED, 403, "admin only"),
    (NotFound("no such model"), C.NOT_FOUND, 404, "no such model"),
    (FailedPrecondition("not loaded"), C.FAILED_PRECONDITION, 409, "not loaded"),
    (CheckpointError("s3://b/p/: no manifest.json"), C.FAILED_PRECONDITION, 409, "s3://b/p/: no manifest.json"),
    (Overloaded("at capacity"), C.RESOURCE_EXHAUSTED, 429, "at capacity"),
    (TooLarge("request body: over the limit"), C.RESOURCE_EXHAUSTED, 413, "request body: over the limit"),
    (asyncio.CancelledError(), C.CANCELLED, 499, ""),
    (Unavailable("draining"), C.UNAVAILABLE, 503, "draining"),
    (TimeoutError(), C.DEADLINE_EXCEEDED, 504, "Perceive: deadline exceeded; engine request aborted"),
    # Not the client's fault: a ValueError from a library is a bug, not INVALID_ARGUMENT.
    (ValueError("bad"), C.INTERNAL, 500, "ValueError: bad"),
    (KeyError("x"), C.INTERNAL, 500, "KeyError: 'x'"),
    (RuntimeError("boom"), C.INTERNAL, 500, "RuntimeError: boom"),
])
def test_status_table(exc: BaseException, code: grpc.StatusCode, http: int, message: str) -> None:
    status = status_of(exc, "Perceive")
    assert (status.code, status.http, status.message, status.fatal) == (code, http, message, False)


def test_unexpected_is_logged_with_traceback_and_dead_engine_is_fatal(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        error = e
    with caplog.at_level(logging.ERROR, logger="p2r.serve"):
        status = status_of(error, "Reason", engine_dead=True)
    assert (status.code, status.http, status.fatal) == (C.UNAVAILABLE, 503, True)
    [record] = [r for r in caplog.records if r.getMessage() == "Reason failed"]
    assert record.levelno == logging.ERROR and record.exc_info is not None and record.exc_info[1] is error
    # A dead engine does not turn the client's own mistake into UNAVAILABLE.
    assert status_of(InvalidArgument("x: bad"), "Reason", engine_dead=True).code == C.INVALID_ARGUMENT


def test_every_row_is_a_distinct_code() -> None:
    # CheckpointError is FailedPrecondition's alias; RESOURCE_EXHAUSTED is gRPC's code both for
    # overload (429, retry later) and for an over-limit message (413, retrying cannot help).
    rows = {k: v for k, v in ERRORS.items() if k not in (CheckpointError, TooLarge)}
    assert len({code for code, _ in rows.values()}) == len(rows)
    assert len({http for _, http in ERRORS.values() if http != 409}) == len(ERRORS) - 2
    assert all(400 <= http < 600 for _, http in ERRORS.values())


# ------------------------------------------------------------------ both transports, one mapping


@contextmanager
def _hollow_roles() -> Iterator[str]:
    """A real perceiver + reasoner gRPC server on loopback that answers with results holding no
    completion - what a broken remote role could send. The gateway's ``answer`` then fails with
    an IndexError: a bug path, not the client's fault."""

    class Perceiver(pb_grpc.PerceiverServicer):
        def Perceive(self, request: pb.PerceiveRequest, context: grpc.ServicerContext) -> pb.PerceiveResult:
            return pb.PerceiveResult(id=request.id)

    class Reasoner(pb_grpc.ReasonerServicer):
        def Reason(self, request: pb.ReasonRequest, context: grpc.ServicerContext) -> pb.ReasonResult:
            return pb.ReasonResult(id=request.id)

    with loopback_server((pb_grpc.add_PerceiverServicer_to_server, Perceiver()),
                         (pb_grpc.add_ReasonerServicer_to_server, Reasoner())) as target:
        yield target


def _count(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("p2r_requests_total", {"method": method, "code": code}) or 0.0


def test_unexpected_exception_is_internal_on_grpc_and_http() -> None:
    import httpx

    from p2r.services.config import ServeConfig
    from p2r.services.server import Server

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    image = buf.getvalue()

    async def scenario(roles: str) -> tuple[tuple[grpc.StatusCode, str], tuple[int, str]]:
        config = ServeConfig(roles=["gateway"], port=0, metrics_port=None, http_port=0,
                             perceiver_endpoint=roles, reasoner_endpoint=roles)
        server = Server(config)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.P2RStub(channel).Answer(pb.AnswerRequest(
                        image=image, question="Q?", answer_form=pb.ANSWER_FORM_MCA), timeout=30)
            async with httpx.AsyncClient(timeout=30) as http:
                reply = await http.post(f"http://127.0.0.1:{server.http_port}/v1/answer",
                                        files={"image": ("a.png", image, "image/png")}, data={"question": "Q?"})
            return (info.value.code(), info.value.details() or ""), (reply.status_code, reply.json()["detail"])
        finally:
            await server.stop(grace=0)

    before = {(m, c): _count(m, c) for m in ("Answer", "http_answer") for c in ("OK", "INTERNAL")}
    with _hollow_roles() as roles:
        (code, details), (http, detail) = asyncio.run(scenario(roles))
    assert code == C.INTERNAL and details.startswith("IndexError")
    assert http == 500 and detail.startswith("IndexError")
    for method in ("Answer", "http_answer"):
        assert _count(method, "INTERNAL") == before[(method, "INTERNAL")] + 1, method
        assert _count(method, "OK") == before[(method, "OK")], method

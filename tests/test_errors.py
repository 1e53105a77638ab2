"""The one exception -> (gRPC code, HTTP status, message) mapping (``services/errors.py``), and both
transports using it: the gRPC ``Server.call`` and the HTTP facade count a bug as INTERNAL."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from p2r.services.checkpoints import CheckpointError
from p2r.services.errors import (
    ERRORS,
    FailedPrecondition,
    HeadersTooLarge,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
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
    (UnsupportedMediaType("content-type: multipart"), C.INVALID_ARGUMENT, 415, "content-type: multipart"),
    (_Subclassed("question: empty"), C.INVALID_ARGUMENT, 400, "question: empty"),
    (Unauthenticated("no bearer token"), C.UNAUTHENTICATED, 401, "no bearer token"),
    (PermissionDenied("admin only"), C.PERMISSION_DENIED, 403, "admin only"),
    (NotFound("no such model"), C.NOT_FOUND, 404, "no such model"),
    (FailedPrecondition("not loaded"), C.FAILED_PRECONDITION, 409, "not loaded"),
    (CheckpointError("s3://b/p/: no manifest.json"), C.FAILED_PRECONDITION, 409, "s3://b/p/: no manifest.json"),
    (Overloaded("at capacity"), C.RESOURCE_EXHAUSTED, 429, "at capacity"),
    (TooLarge("request body: over the limit"), C.RESOURCE_EXHAUSTED, 413, "request body: over the limit"),
    (HeadersTooLarge("request header fields: 101"), C.RESOURCE_EXHAUSTED, 431, "request header fields: 101"),
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


@pytest.fixture
def fresh_bug_log() -> Iterator[None]:
    """No earlier traceback of the same (method, type) within the rate limit hides this test's."""
    from p2r.services import errors

    errors._bug_log.clear()
    yield
    errors._bug_log.clear()


def test_unexpected_is_logged_with_traceback_and_dead_engine_is_fatal(caplog: pytest.LogCaptureFixture,
                                                                      fresh_bug_log: None) -> None:
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


def test_bug_tracebacks_are_rate_limited(caplog: pytest.LogCaptureFixture, fresh_bug_log: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 7: a client that triggers a bug in a loop got one traceback per request (40
    MB of log in 150 s). Now one per (method, type) per interval, the repeats counted in the next."""
    from p2r.services import errors

    now = [1000.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="p2r.serve"):
        for _ in range(50):
            assert status_of(RuntimeError("boom"), "openai.chat").code == C.INTERNAL  # every call still mapped
        status_of(KeyError("k"), "openai.chat")  # another type: its own first traceback
        now[0] += errors.BUG_LOG_INTERVAL_S
        status_of(RuntimeError("boom"), "openai.chat")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["openai.chat failed", "openai.chat failed",
                        f"openai.chat failed (49 more RuntimeError not logged in the last "
                        f"{errors.BUG_LOG_INTERVAL_S:.0f} s)"]
    assert all(r.exc_info is not None for r in caplog.records)


def test_every_row_is_a_distinct_code() -> None:
    # CheckpointError is FailedPrecondition's alias; RESOURCE_EXHAUSTED is gRPC's code both for
    # overload (429, retry later) and for an over-limit message (413, retrying cannot help) or
    # header fields (431); INVALID_ARGUMENT both for a bad field (400) and a body in the wrong
    # format (415).
    rows = {k: v for k, v in ERRORS.items()
            if k not in (CheckpointError, TooLarge, HeadersTooLarge, UnsupportedMediaType)}
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

    async def scenario(roles: str) -> tuple[tuple[grpc.StatusCode, str], tuple[int, str], tuple[int, Any]]:
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
                url = "data:image/png;base64," + base64.b64encode(image).decode()
                chat = await http.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions", json={
                    "model": "p2r", "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Q?"}]}]})
            return ((info.value.code(), info.value.details() or ""), (reply.status_code, reply.json()["detail"]),
                    (chat.status_code, chat.json()))
        finally:
            await server.stop(grace=0)

    before = {(m, c): _count(m, c) for m in ("Answer", "http_answer", "openai.chat") for c in ("OK", "INTERNAL")}
    with _hollow_roles() as roles:
        (code, details), (http, detail), (chat_status, chat) = asyncio.run(scenario(roles))
    assert code == C.INTERNAL and details.startswith("IndexError")
    assert http == 500 and detail.startswith("IndexError")
    # The OpenAI route: an OpenAI error object, never a plain-text 500.
    assert chat_status == 500 and chat["error"]["type"] == "server_error", chat
    assert chat["error"]["message"].startswith("IndexError") and chat["error"]["code"] == "internal"
    for method in ("Answer", "http_answer", "openai.chat"):
        assert _count(method, "INTERNAL") == before[(method, "INTERNAL")] + 1, method
        assert _count(method, "OK") == before[(method, "OK")], method

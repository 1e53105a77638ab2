"""OpenAI-compatible Chat Completions on the gateway's HTTP port, for the clients teams already
use (the OpenAI SDK, LangChain, lmms-eval): ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request is one user turn holding one image (``image_url``: a ``data:`` URL; an ``http(s)``
URL only under a prefix of the ``image_url_allowlist`` setting, empty by default) and the
question text. It runs the same flow as ``P2R.Answer`` (``handlers.answer_events``) under the
same admission control, deadline and metrics (method label ``openai.chat``); ``content`` is the
reasoner's reply and ``usage`` counts the tokens of both stages.

The request - its fields, what is refused and why - is ``services/openai_request.py``.

Response extension (an extra top-level field ``p2r`` that standard clients ignore)::

    "p2r": {"regions": [{"x1", "y1", "x2", "y2", "label"}],   # 0-1000, as the perceiver wrote them
            "crops": [[left, top, right, bottom]],          # pixel boxes of the crops the reasoner saw
            "colours": [str],                               # outline colour of region i: colours[i % len]
            "image": {"width", "height"},
            "perceiver_output": str, "answer": str, "reasoning": str,
            "with_evidence": bool, "num_crops": int,
            "timings": {"perceive_ms", "evidence_ms", "reason_ms", "total_ms"},
            "usage": {"perceive_prompt_tokens", "perceive_completion_tokens",
                      "reason_prompt_tokens", "reason_completion_tokens"}}

With ``stream: true`` the reply is OpenAI-format server-sent events: a first chunk with the
assistant role and ``p2r`` = regions, crops, image, perceiver_output and perceive_ms (as soon as
the perceiver is done); one chunk per reasoner text delta as generated; a last chunk with the
finish reason and ``p2r`` = everything above; a usage chunk when ``include_usage``; ``[DONE]``.
A client that disconnects aborts the engine request in progress (perceiver or reasoner).

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``: 400 with
``param`` naming the field, 404 for an unknown model, 413 for an image over
``max_image_bytes``, and the statuses of ``services/errors.py`` (429 overload, 504 deadline...).
Every request is checked completely before admission, and every outcome - an unexpected
exception included (500, its traceback logged rate-limited) - is an error object counted in
``p2r_requests_total{method="openai.chat"}``, never a plain-text 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.json_format import MessageToDict

from p2r.core.bbox import MAX_IMAGE_EVIDENCE
from p2r.core.evidence import HIGHLIGHT_COLOURS, crop_box
from p2r.core.images import displayed_size
from p2r.services import metrics
from p2r.services.errors import ERRORS, Status, Unavailable
from p2r.services.handlers import answer_events, validate_answer
from p2r.services.openai_request import DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S  # the chart's default reads it here
from p2r.services.openai_request import OpenAIError, Parsed, inner_param, load_json, parse
from p2r.services.protocol import region_from_pb
from p2r.services.streaming import relay
from p2r.v1 import p2r_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image

    from p2r.services.server import Server

METHOD = "openai.chat"
PATHS = ("/v1/chat/", "/v1/models")
"""The routes that answer errors as OpenAI error objects (``http_guard.Guard`` included)."""


def from_status(status: Status, code: str | None = None) -> OpenAIError:
    """The OpenAI error for a mapped failure (``services/errors.status_of``): a 400 names the
    field its message starts with; any other status carries ``code``, by default its gRPC code
    name. Used by the routes and by ``http_guard.Guard``'s refusals (401, 413) on these paths."""
    if status.http == 400:
        return OpenAIError(400, status.message, inner_param(status.message), code)
    return OpenAIError(status.http, status.message, None, code or status.code.name.lower())


# ------------------------------------------------------------------------------------ reply


def crops(regions: Any, width: int, height: int) -> list[list[int]]:
    """The pixel boxes of the crops the reasoner gets for ``regions``: ``evidence.crop_box`` of
    the first ``MAX_IMAGE_EVIDENCE`` regions, empty boxes dropped (``build_evidence``'s rule)."""
    boxes = []
    for r in list(regions)[:MAX_IMAGE_EVIDENCE]:
        box = crop_box(region_from_pb(r), width, height)
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(list(box))
    return boxes


def _dict(message: Any) -> Any:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _regions_ext(regions: Any, perceiver_output: str, image: Image.Image) -> dict[str, Any]:
    """Sizes and crops in the image as displayed (EXIF orientation applied, as the models saw it
    and a browser draws it), not as stored: ``image`` is the request's unrotated header."""
    width, height = displayed_size(image)
    return {"regions": [_dict(r) for r in regions], "crops": crops(regions, width, height),
            "colours": list(HIGHLIGHT_COLOURS),
            "image": {"width": width, "height": height}, "perceiver_output": perceiver_output}


def _usage(u: pb.AnswerUsage) -> dict[str, int]:
    prompt = u.perceive_prompt_tokens + u.reason_prompt_tokens
    completion = u.perceive_completion_tokens + u.reason_completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _final_ext(r: pb.AnswerResponse, image: Image.Image) -> dict[str, Any]:
    return {**_regions_ext(r.regions, r.perceiver_output, image), "answer": r.answer, "reasoning": r.reasoning,
            "with_evidence": r.with_evidence, "num_crops": r.num_crops, "timings": _dict(r.timings),
            "usage": _dict(r.usage)}


def completion(r: pb.AnswerResponse, parsed: Parsed, model: str, created: int) -> dict[str, Any]:
    return {
        "id": parsed.request.id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.reasoner_output},
                     "finish_reason": r.finish_reason or "stop", "logprobs": None}],
        "usage": _usage(r.usage),
        "p2r": _final_ext(r, parsed.image),
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------------ routes


def mount(app: FastAPI, server: Server) -> None:
    """Add the OpenAI-compatible routes to the gateway's HTTP app."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def fail(e: Exception) -> tuple[str, OpenAIError]:
        """The gRPC code name (for the metrics) and the OpenAI error of an exception the flow
        raised, through the one table (``services/errors.py``)."""
        status = server.status_of(METHOD, e)
        return status.code.name, from_status(status)

    async def call(timeout_s: float, work: Callable[[], Awaitable[Any]]) -> Any:
        """P2R.Answer's call wrapper on HTTP: the same admission, a deadline, the same
        exception table and the same metrics, under the method label ``openai.chat``."""
        started = time.perf_counter()
        code = "OK"
        try:
            with server.admission.admit(1):
                return await asyncio.wait_for(work(), timeout_s)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code, error = fail(e)
            raise error from None
        finally:
            metrics.REQUESTS.labels(METHOD, code).inc()
            metrics.LATENCY.labels(METHOD).observe(time.perf_counter() - started)

    async def read_body(request: Request) -> Any:
        # Its size is bounded in front of every route (http_guard.Guard, ServeConfig.max_http_body_bytes);
        # a body that grows past the bound while streaming is refused here as an OpenAI error.
        try:
            body = await request.body()
        except HTTPException as e:
            raise OpenAIError(e.status_code, str(e.detail), None,
                              "request_too_large" if e.status_code == 413 else None) from None
        return load_json(body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.config.openai_model, "object": "model",
                                            "created": 0, "owned_by": "p2r"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        """Every failure is an OpenAI error object, counted once: by ``call`` once the request
        was handed to it, here before (a refusal at parse time) or for an unexpected exception."""
        counted: list[bool] = []  # set by ``completions`` once ``call`` counts the request
        try:
            return await completions(request, counted)
        except OpenAIError as e:
            if not counted:  # under the code the one table gives its HTTP status (404, 413, else 400)
                code = next((c.name for c, h in ERRORS.values() if h == e.status), "INVALID_ARGUMENT")
                metrics.REQUESTS.labels(METHOD, code).inc()
            raise
        except Exception as e:
            code, error = fail(e)
            if not counted:
                metrics.REQUESTS.labels(METHOD, code).inc()
            raise error from None

    async def completions(request: Request, counted: list[bool]) -> JSONResponse | StreamingResponse:
        if not server.serving:
            raise Unavailable("the server is not ready")
        parsed = await parse(await read_body(request), server)
        assert server.handlers is not None
        validate_answer(parsed.request, server.handlers)  # before admission: 400 under any load
        perceiver, reasoner = server.backends()
        model = server.config.openai_model
        created = int(time.time())

        def events() -> AsyncIterator[pb.AnswerEvent]:
            return answer_events(parsed.request, server.handlers, perceiver, reasoner,  # type: ignore[arg-type]
                                 stream=parsed.stream)

        if not parsed.stream:
            async def unary() -> pb.AnswerResponse:
                async with contextlib.aclosing(events()) as items:
                    async for event in items:
                        last = event
                return last.response

            counted.append(True)
            r = await call(parsed.timeout_s, unary)
            return JSONResponse(completion(r, parsed, model, created))

        counted.append(True)
        stream = relay(lambda work: call(parsed.timeout_s, work), events)
        # The first event (the regions) is awaited here, so a request refused before any output
        # (overload, a bad image) gets its HTTP status; a client gone meanwhile cancels it.
        first = await _first_or_disconnect(stream, request)
        if first is None:
            return StreamingResponse(iter(()), status_code=499)  # nobody is listening
        chunk = {"id": parsed.request.id, "object": "chat.completion.chunk", "created": created, "model": model}

        async def sse() -> AsyncIterator[str]:
            try:
                event: pb.AnswerEvent | None = first
                while event is not None:
                    kind = event.WhichOneof("event")
                    if kind == "regions":
                        ext = {**_regions_ext(event.regions.regions, event.regions.perceiver_output, parsed.image),
                               "perceive_ms": event.regions.perceive_ms}
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}], "p2r": ext})
                    elif kind == "delta":
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": event.delta},
                                                          "finish_reason": None}]})
                    else:
                        r = event.response
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {},
                                                          "finish_reason": r.finish_reason or "stop"}],
                                    "p2r": _final_ext(r, parsed.image)})
                        if parsed.include_usage:
                            yield _sse({**chunk, "choices": [], "usage": _usage(r.usage)})
                    event = await anext(stream, None)
            except OpenAIError as e:  # after the 200 went out, an error is an event (as vLLM does)
                yield _sse(e.body())
            except Exception as e:  # a bug while formatting an event: an error event too, never a cut stream
                yield _sse(fail(e)[1].body())
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _first_or_disconnect(stream: AsyncIterator[pb.AnswerEvent], request: Request) -> pb.AnswerEvent | None:
    """The stream's first event; None when the client disconnected first - then the stream is
    cancelled, which aborts its engine request."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    first = asyncio.ensure_future(anext(stream))
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({first, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not first.done():
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        return None
    return first.result()

"""HTTP facade of the gateway (FastAPI): ``POST /v1/answer`` for curl and browsers, plus the
probes ``/healthz`` (process alive) and ``/readyz`` (model loaded and answering).

It calls the same ``answer`` flow as the gRPC ``P2R.Answer`` and maps every failure, the form's
own refusals included, with the same ``Server.status_of`` (``services/errors.py``): 400 bad input,
413 over a size limit, 415 not multipart, 429 overload, 504 deadline, 502 upstream role failure,
500 (counted as INTERNAL) for a bug, 503 not ready or the engine died.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.json_format import MessageToDict

from p2r.core.prompts import AnswerForm
from p2r.services import metrics, openai_api
from p2r.services.errors import InvalidArgument, TooLarge, Unavailable, UnsupportedMediaType
from p2r.services.handlers import answer, validate_answer
from p2r.services.http_guard import ANSWER_METHOD, Guard
from p2r.services.protocol import FORM_TO_PB
from p2r.v1 import p2r_pb2 as pb

if TYPE_CHECKING:
    from p2r.services.server import Server

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The page at ``/`` (plain HTML, JS and CSS; no build step)."""


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="P2R gateway", version="1")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = server.ready
        return JSONResponse({"ready": ready, "checkpoint": server.checkpoint}, status_code=200 if ready else 503)

    app.add_middleware(Guard, server=server)

    @app.post("/v1/answer")
    async def answer_http(http_request: Request) -> Any:
        """multipart/form-data: ``image`` (file: JPEG, PNG or WebP), ``question``, ``answer_form``
        (mca | na | free_form, default mca), ``timeout_s`` (default 300); each field once.

        Every outcome - a refusal of the form before admission included - is mapped by the one
        table (``services/errors.py``) to ``{"detail": message}`` with its HTTP status and counted
        in ``p2r_requests_total{method="http_answer"}``; no exception leaves as a bare 500."""
        code = "OK"
        try:
            result = await _answer(server, http_request)
            if result is None:  # the client went away: its engine requests were aborted
                code = "CANCELLED"
                return Response(status_code=499)
            return MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            status = server.status_of(ANSWER_METHOD, e)
            code = status.code.name
            return JSONResponse({"detail": status.message}, status_code=status.http)
        finally:
            metrics.REQUESTS.labels(ANSWER_METHOD, code).inc()

    # The OpenAI-compatible chat API, and the page at / that uses its streaming form.
    openai_api.mount(app, server)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="page")
    return app


async def _answer(server: Server, http_request: Request) -> pb.AnswerResponse | None:
    """``POST /v1/answer``: the form checked completely (``validate_answer``: image header,
    question, form) before admission, so a bad request is a 400 under any load; then the P2R
    flow under admission and the form's deadline. None when the client disconnected."""
    if not server.serving:
        raise Unavailable("not ready")
    fields = await read_form(http_request, server.config.max_image_bytes)
    question = _text(fields, "question", None)
    try:
        form = AnswerForm.parse(_text(fields, "answer_form", "mca"))
    except InvalidArgument:
        raise
    except ValueError as e:
        raise InvalidArgument(f"answer_form: {e}") from None
    try:
        timeout_s = float(_text(fields, "timeout_s", "300"))
    except ValueError:
        timeout_s = -1.0
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InvalidArgument("timeout_s: must be a number of seconds > 0")
    data = fields.get("image")
    if not isinstance(data, _Upload):
        raise InvalidArgument("image: required, as a file part of multipart/form-data")
    request = pb.AnswerRequest(image=data.content, question=question, answer_form=FORM_TO_PB[form])
    perceiver, reasoner = server.backends()
    assert server.handlers is not None
    validate_answer(request, server.handlers)  # before admission: 400 under any load
    with server.admission.admit(1):
        return await until_disconnected(
            http_request, asyncio.wait_for(answer(request, server.handlers, perceiver, reasoner), timeout_s))


# ------------------------------------------------------------------------------- body, disconnect

T = TypeVar("T")


@dataclass
class _Upload:
    filename: str
    content: bytes


async def read_form(request: Request, max_file_bytes: int) -> dict[str, bytes | _Upload]:
    """A multipart/form-data body, parsed while it streams in (the Guard bounds its size), with
    fields as raw bytes so their UTF-8 is checked strictly (Starlette's parser silently decodes
    invalid UTF-8 as Latin-1). A field sent twice is refused: a second ``image`` part must not
    silently replace the first. Refusals are the table's exceptions (``services/errors.py``)."""
    from python_multipart.multipart import create_form_parser

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "content-type: multipart/form-data required (curl -F image=@FILE -F question=...)")
    fields: dict[str, bytes | _Upload] = {}
    repeated: list[str] = []

    def put(name: str, value: bytes | _Upload) -> None:
        if name in fields:
            repeated.append(name)
        fields[name] = value

    def on_field(field: Any) -> None:
        put(field.field_name.decode("utf-8", "replace"), field.value or b"")

    def on_file(file: Any) -> None:
        file.file_object.seek(0)
        name = file.field_name.decode("utf-8", "replace")
        put(name, _Upload((file.file_name or b"").decode("utf-8", "replace"), file.file_object.read()))

    try:
        parser = create_form_parser({"Content-Type": content_type.encode("latin-1")}, on_field, on_file,
                                    config={"MAX_MEMORY_FILE_SIZE": max_file_bytes + 1})
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except HTTPException as e:  # http_guard.Guard cut the body off at the limit (its only refusal here)
        raise TooLarge(str(e.detail)) from None
    except Exception as e:  # python-multipart's parse errors
        raise InvalidArgument(f"request body: not valid multipart/form-data: {e}") from None
    if repeated:
        raise InvalidArgument(f"{repeated[0]}: sent more than once; send each field once (one image per request)")
    upload = fields.get("image")
    if isinstance(upload, _Upload) and len(upload.content) > max_file_bytes:
        raise TooLarge(f"image: over the limit of {max_file_bytes} bytes")
    return fields


def _text(fields: dict[str, bytes | _Upload], name: str, default: str | None) -> str:
    value = fields.get(name)
    if value is None:
        if default is None:
            raise InvalidArgument(f"{name}: required")
        return default
    if isinstance(value, _Upload):
        raise InvalidArgument(f"{name}: a text field, not a file")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{name}: not valid UTF-8 (byte {e.start})") from None


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` until it is done or the client disconnects; then it is cancelled (which
    aborts its engine requests, as a cancelled gRPC call does) and None is returned."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

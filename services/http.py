"""HTTP facade of the gateway (FastAPI): ``POST /v1/answer`` for curl and browsers, plus the
probes ``/healthz`` (process alive) and ``/readyz`` (model loaded and answering).

It calls the same ``answer`` flow as the gRPC ``P2R.Answer`` and maps its errors with the same
``Server.status_of`` (``services/errors.py``): 400 bad input, 429 overload, 504 deadline, 502
upstream role failure, 500 (counted as INTERNAL) for a bug, 503 when the engine died.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict

from p2r.core.prompts import AnswerForm
from p2r.services import metrics
from p2r.services.handlers import answer
from p2r.services.protocol import FORM_TO_PB
from p2r.v1 import p2r_pb2 as pb

if TYPE_CHECKING:
    from p2r.services.server import Server


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="P2R gateway", version="1")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = server.ready
        return JSONResponse({"ready": ready, "checkpoint": server.checkpoint}, status_code=200 if ready else 503)

    @app.post("/v1/answer")
    async def answer_http(
        image: Annotated[UploadFile, File(description="JPEG, PNG or WebP")],
        question: Annotated[str, Form()],
        answer_form: Annotated[str, Form()] = "mca",
        timeout_s: Annotated[float, Form(gt=0)] = 300.0,
    ) -> dict:
        if not server.ready:
            raise HTTPException(503, "not ready")
        try:
            form = AnswerForm.parse(answer_form)
        except ValueError as e:
            raise HTTPException(400, f"answer_form: {e}") from None
        data = await image.read(server.config.max_image_bytes + 1)
        if len(data) > server.config.max_image_bytes:
            raise HTTPException(400, f"image: over the limit of {server.config.max_image_bytes} bytes")
        request = pb.AnswerRequest(image=data, question=question, answer_form=FORM_TO_PB[form])
        perceiver, reasoner = server.backends()
        assert server.handlers is not None
        code = "OK"
        try:
            with server.admission.admit(1):
                result = await asyncio.wait_for(answer(request, server.handlers, perceiver, reasoner), timeout_s)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            status = server.status_of("http_answer", e)
            code = status.code.name
            raise HTTPException(status.http, status.message) from None
        finally:
            metrics.REQUESTS.labels("http_answer", code).inc()
        return MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    return app

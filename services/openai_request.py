"""The request side of the OpenAI-compatible chat route (``services/openai_api.py``): what a
``POST /v1/chat/completions`` body may hold, the checks made while parsing it - all before
admission, so a client mistake is a 400 naming the field under any load - and its conversion
into the P2R flow's ``AnswerRequest``. Failures are ``OpenAIError``, the error object OpenAI's
clients read.

Request fields: ``model`` (``openai_model``, default ``p2r``), ``messages``, and optionally
``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``), ``seed`` - the
reasoner's sampling; unset ones take the role defaults (greedy, ``reason_max_tokens``) - plus
``n`` (1 only), ``stream``, ``stream_options.include_usage``, ``user`` (accepted, no effect), an
image part's ``detail`` (``auto`` only: the resolution is the server's pixel bounds) and the
extension object ``p2r``::

    "p2r": {"answer_form": "mca" | "na" | "free_form",      # default free_form
            "variant": "train" | "eval",                   # prompt wording, default train
            "perceive": {"temperature", "top_p", "max_tokens", "seed"},   # perceiver sampling
            "structured": false,                           # constrain the perceiver to the bbox JSON schema
            "timeout_s": 300,                              # the call's deadline
            "ignore_unsupported": false}                   # see below

Any other parameter (``stop``, ``logprobs``, ``top_logprobs``, ``tools``, ``tool_choice``,
``response_format``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ...) is refused
with a 400 naming it - a client must be able to tell that it was not honoured - unless it is null
or a value that asks for nothing (``_NOTHING_ASKED``: ``logprobs: false``, ``tools: []``...), or
the request sets ``p2r.ignore_unsupported: true``, which has them ignored. Integers must fit the
p2r.v1 field they travel in (``max_tokens`` a uint32, ``seed`` an int64) and floats a 32-bit
float (``top_p: 1e-300`` would be 0), the question text must be valid Unicode (no lone
surrogate) and the JSON at most ``MAX_JSON_DEPTH`` deep: each is a 400 naming the field, at
parse time.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from p2r.core.prompts import AnswerForm
from p2r.services.errors import InvalidArgument
from p2r.services.protocol import FORM_TO_PB, wire_problem
from p2r.v1 import p2r_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image

    from p2r.services.server import Server

DEFAULT_TIMEOUT_S = 300.0
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (a chat request needs ~6; a
100,000-deep body used to fail in the JSON parser's recursion as a 500)."""
_INERT = frozenset({"user"})
"""OpenAI parameters accepted and ignored because they change nothing in the reply."""
_NOTHING_ASKED: dict[str, list[Any]] = {
    "stop": [[], ""], "logprobs": [False], "top_logprobs": [0], "tools": [[]], "tool_choice": ["none"],
    "response_format": [{"type": "text"}], "presence_penalty": [0], "frequency_penalty": [0],
    "logit_bias": [{}], "store": [False]}
"""Values of unimplemented parameters that ask for the behaviour this server has anyway."""
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                504: "timeout"}


class OpenAIError(Exception):
    """A failure as OpenAI reports it: HTTP status and the error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        # A message may quote the request (a key, a URL): a lone surrogate in it could not be
        # written as UTF-8, and the error itself would fail as a 500.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}



# ------------------------------------------------------------------------------------ request


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ImageURL(_Model):
    url: str
    detail: str | None = None


class _Part(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None


class _Sampling(_Model):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


class _Extension(_Model):
    answer_form: Literal["mca", "na", "free_form"] = "free_form"
    variant: Literal["train", "eval"] = "train"
    perceive: _Sampling = Field(default_factory=_Sampling)
    structured: bool = False
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    ignore_unsupported: bool = False


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The accepted subset of OpenAI's chat request. Other fields are kept (``model_extra``) to
    be refused by name (``_unsupported``), not silently ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    p2r: _Extension = Field(default_factory=_Extension)


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _sampling(fields: dict[str, tuple[Any, str]]) -> pb.SamplingParams:
    """``SamplingParams`` from {proto field: (value, the request's param)}; a value its proto
    field cannot hold (``protocol.wire_problem``) is a 400 naming the request's param."""
    for name, (value, param) in fields.items():
        problem = None if value is None else wire_problem(pb.SamplingParams, name, value)
        if problem is not None:
            raise OpenAIError(400, f"{param}: {problem}", param)
    return pb.SamplingParams(**{k: v for k, (v, _) in fields.items() if v is not None})


def _unsupported(req: ChatRequest) -> None:
    """Refuse, naming it, the first parameter the request sets that this server does not
    implement (see the module docstring), unless ``p2r.ignore_unsupported``."""
    if req.p2r.ignore_unsupported:
        return
    for name, value in (req.model_extra or {}).items():
        if value is None or name in _INERT or value in _NOTHING_ASKED.get(name, []):
            continue
        raise OpenAIError(400, f"{name}: not supported by this server, so it would not be honoured; remove "
                          'it, or send "p2r": {"ignore_unsupported": true} to have such parameters ignored',
                          name, "unsupported_parameter")


_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON ``body`` nests arrays and objects deeper than ``limit``, from its bytes
    at C speed (a walk of the parsed value costs ~1 us per node: seconds for a body of millions
    of empty arrays). Escapes are dropped pairwise from the left, as the JSON lexer reads them
    (outside strings valid JSON has no backslash), then the strings, then all but the brackets,
    whose running count is the depth (in chunks, so the temporary arrays stay small)."""
    import numpy as np

    brackets = re.sub(rb'"[^"]*"', b"", body.replace(b"\\\\", b"").replace(b'\\"', b"")).translate(
        None, _NOT_BRACKETS)
    level = 0
    chunk = 1 << 20
    for start in range(0, len(brackets), chunk):
        part = np.frombuffer(brackets, np.uint8, count=min(chunk, len(brackets) - start), offset=start)
        steps = np.where((part == ord("[")) | (part == ord("{")), np.int32(1), np.int32(-1))
        depth = np.cumsum(steps, dtype=np.int64) + level
        if int(depth.max()) > limit:
            return True
        level = int(depth[-1])
    return False


def load_json(body: bytes) -> Any:
    """The request body as JSON, at most ``MAX_JSON_DEPTH`` deep: a 400 instead of the parser's
    recursion failure (a 500). The depth is checked from the bytes only when they hold more
    brackets than the limit (a chat request has a handful)."""
    try:
        obj = json.loads(body)
    except RecursionError:
        obj = None  # deeper than the interpreter's recursion limit: over ours too
    except ValueError as e:
        raise OpenAIError(400, f"the request body is not JSON: {e}") from None
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise OpenAIError(400, f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


@dataclass
class Parsed:
    """A validated chat request as the P2R flow's request, plus what the reply needs."""

    request: pb.AnswerRequest
    image: Image.Image
    stream: bool
    include_usage: bool
    timeout_s: float


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise OpenAIError(400, f"{param}: a data URL must be data:<mime>;base64,<data>", param, "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(400, f"{param}: the data URL is not valid base64 ({e})", param, "invalid_image_url") from None


def allowed(url: str, allowlist: list[str]) -> bool:
    """Whether ``url`` lies under one of the prefixes: same scheme, host and port, and a path
    starting with the prefix's path (so ``https://a.com/`` never admits ``https://a.com.evil/``)."""
    u = urllib.parse.urlsplit(url)
    for prefix in allowlist:
        p = urllib.parse.urlsplit(prefix)
        try:
            same_port = (u.port or 0) == (p.port or 0)
        except ValueError:
            return False
        if (u.scheme, (u.hostname or "").lower()) == (p.scheme, (p.hostname or "").lower()) and same_port \
                and u.path.startswith(p.path or "/"):
            return True
    return False


async def fetch_image(url: str, param: str, allowlist: list[str], max_bytes: int, timeout_s: float) -> bytes:
    """An ``http(s)`` image_url, only under the allow-list; redirects are not followed (they
    could leave it), and the body is read no further than ``max_bytes``."""
    import httpx

    if not allowlist or not allowed(url, allowlist):
        raise OpenAIError(400, f"{param}: {url!r} is not under an allowed image URL prefix"
                          + ("" if allowlist else " (this server accepts data: URLs only)"), param, "invalid_image_url")
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise OpenAIError(400, f"{param}: fetching the image gave HTTP {response.status_code}", param,
                                  "invalid_image_url")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise OpenAIError(413, f"{param}: image is over the limit of {max_bytes} bytes", param,
                                      "image_too_large")
            return bytes(data)
    except httpx.HTTPError as e:
        raise OpenAIError(400, f"{param}: cannot fetch the image: {type(e).__name__}: {e}", param,
                          "invalid_image_url") from None


async def parse(body: Any, server: Server) -> Parsed:
    """Validate a chat request completely (before any admission or engine work)."""
    config = server.config
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None
    _unsupported(req)
    if req.model != config.openai_model:
        raise OpenAIError(404, f"model: the model {req.model!r} does not exist; this server serves "
                          f"{config.openai_model!r}", "model", "model_not_found")
    if len(req.messages) != 1 or req.messages[0].role != "user":
        raise OpenAIError(400, "messages: P2R answers one user turn: exactly one message, with role user",
                          "messages")
    content = req.messages[0].content
    if not isinstance(content, list):
        raise OpenAIError(400, "messages[0].content: one image_url part is required (a list of parts)",
                          "messages[0].content")
    images = [i for i, part in enumerate(content) if part.type == "image_url"]
    if not images:
        raise OpenAIError(400, "messages[0].content: one image_url part is required", "messages[0].content")
    if len(images) > 1:
        param = f"messages[0].content[{images[1]}]"
        raise OpenAIError(400, f"{param}: one image per request, got {len(images)}", param)
    i = images[0]
    param = f"messages[0].content[{i}].image_url"
    if content[i].image_url is None:
        raise OpenAIError(400, f"{param}: required for a part of type image_url", param)
    detail = content[i].image_url.detail
    if detail not in (None, "auto") and not req.p2r.ignore_unsupported:  # the image's resolution is the server's
        raise OpenAIError(400, f"{param}.detail: {detail!r} is not supported (the resolution is the server's "
                          'pixel bounds); send "auto", or "p2r": {"ignore_unsupported": true}', f"{param}.detail",
                          "unsupported_parameter")
    url = content[i].image_url.url
    param += ".url"
    if url.startswith("data:"):
        data = _data_url(url, param)
    elif url.startswith(("http://", "https://")):
        data = await fetch_image(url, param, config.image_url_allowlist, config.max_image_bytes,
                                 config.image_url_timeout_s)
    else:
        raise OpenAIError(400, f"{param}: expected a data: or http(s) URL", param, "invalid_image_url")
    if len(data) > config.max_image_bytes:
        raise OpenAIError(413, f"{param}: image is {len(data)} bytes, over the limit of {config.max_image_bytes}",
                          param, "image_too_large")
    assert server.handlers is not None
    try:
        image = server.handlers.image(data, param)
    except InvalidArgument as e:
        raise OpenAIError(400, str(e), param, "invalid_image_url") from None
    for k, part in enumerate(content):
        lone = _SURROGATE.search(part.text or "")
        if lone is not None:  # valid JSON ("\\ud800"), not Unicode: it cannot be encoded for the model
            param = f"messages[0].content[{k}].text"
            raise OpenAIError(400, f"{param}: a lone UTF-16 surrogate (\\u{ord(lone.group()):04x}) is not valid "
                              "Unicode", param)
    question = "\n".join(p.text or "" for p in content if p.type == "text").strip()
    if not question:
        raise OpenAIError(400, "messages[0].content: a text part with the question is required",
                          "messages[0].content")
    max_tokens = ((req.max_tokens, "max_tokens") if req.max_tokens is not None
                  else (req.max_completion_tokens, "max_completion_tokens"))
    reason = _sampling({"temperature": (req.temperature, "temperature"), "top_p": (req.top_p, "top_p"),
                        "max_tokens": max_tokens, "seed": (req.seed, "seed")})
    ext = req.p2r
    perceive = _sampling({k: (v, f"p2r.perceive.{k}") for k, v in ext.perceive.model_dump().items()})
    request = pb.AnswerRequest(
        id=f"chatcmpl-{uuid.uuid4().hex}", image=data, question=question,
        answer_form=FORM_TO_PB[AnswerForm.parse(ext.answer_form)],
        variant=pb.PROMPT_VARIANT_EVAL if ext.variant == "eval" else pb.PROMPT_VARIANT_TRAIN,
        perceive_sampling=perceive, reason_sampling=reason,
        structured_perceiver=ext.structured)
    return Parsed(request, image, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                  ext.timeout_s)


# Inner fields of the P2R request -> the chat request's field, for errors raised by the flow.
_FIELDS = {"question": "messages[0].content", "image": "messages[0].content", "reason_sampling": "",
           "perceive_sampling": "p2r.perceive", "answer_form": "p2r.answer_form", "sampling": ""}


def inner_param(message: str) -> str | None:
    """The chat request's field for an error the P2R flow raised naming its own field
    (``reason_sampling.temperature`` -> ``temperature``); None when it has none."""
    head = message.split(":", 1)[0]
    root, _, rest = head.partition(".")
    if root not in _FIELDS:
        return None
    mapped = ".".join(x for x in (_FIELDS[root], rest) if x)
    return mapped or None

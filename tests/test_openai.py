"""The gateway's OpenAI-compatible chat API and P2R.AnswerStream against the shared real server
(tests/conftest.py ``role_server``, tiny model): the official ``openai`` client unary and
streamed, equal to P2R.Answer at temperature 0; OpenAI-style errors; disconnects and
cancellations abort the engine request; the image_url allow-list (no engine)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from p2r.services.client import Client
from p2r.services.launch import ServerProc
from p2r.services.openai_request import OpenAIError, allowed, fetch_image
from p2r.v1 import p2r_pb2 as pb

QUESTION = "Which shape is red? (A) square (B) circle"
MAX_TOKENS = 24


def png(size: tuple[int, int] = (96, 64), colour: str = "white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str = QUESTION) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (in any order)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _wait_aborted(server: ServerProc, before: float) -> None:
    """Until the abort counter passed ``before`` and no engine request is left running."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = _scrape(server.metrics_port)
        if _value(text, "p2r_engine_aborted_requests_total") > before and \
                _value(text, "vllm:num_requests_running") == 0:
            return
        time.sleep(0.2)
    pytest.fail("the engine request was not aborted")


def _wait_counted(server: ServerProc, method: str, code: str, before: float) -> None:
    """Until ``p2r_requests_total{method, code}`` passed ``before``."""
    deadline = time.monotonic() + 30
    while _value(_scrape(server.metrics_port), "p2r_requests_total", method=method, code=code) <= before:
        if time.monotonic() > deadline:
            pytest.fail(f"no {method} call counted {code}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- no engine


def _requests_total(method: str, code: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("p2r_requests_total", {"method": method, "code": code}) or 0.0


def test_guard_refusals_are_openai_errors_on_openai_routes() -> None:
    """http_guard.Guard's 401 (API key) and 413 (Content-Length over the body limit) come from the one
    table (services/errors.py): OpenAI error objects on the OpenAI routes, ``detail`` on
    /v1/answer, counted under their gRPC code. An in-process app with keys; no engine."""
    from fastapi.testclient import TestClient

    from p2r.services.config import ServeConfig
    from p2r.services.http import create_app
    from p2r.services.server import Server

    config = ServeConfig(roles=["gateway"], perceiver_endpoint="127.0.0.1:1", reasoner_endpoint="127.0.0.1:1",
                         port=0, metrics_port=None, api_key="k1")
    over = str(config.max_http_body_bytes + 1)
    http = TestClient(create_app(Server(config)))
    auth = {"authorization": "Bearer k1"}
    for path, method in [("/v1/chat/completions", "openai.chat"), ("/v1/models", "http")]:
        before = _requests_total(method, "UNAUTHENTICATED")
        r = http.post(path, json={}) if path.endswith("completions") else http.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("authentication_error", "unauthenticated")
        assert "API key" in error["message"]
        assert _requests_total(method, "UNAUTHENTICATED") == before + 1
    before = _requests_total("openai.chat", "RESOURCE_EXHAUSTED")
    r = http.post("/v1/chat/completions", content=b"{}", headers={**auth, "content-length": over})
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {"message": f"request body: {over} bytes, over the limit of "
                                             f"{config.max_http_body_bytes} bytes",
                                  "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    assert _requests_total("openai.chat", "RESOURCE_EXHAUSTED") == before + 1
    # The plain routes keep FastAPI's shape, from the same table.
    before = _requests_total("http_answer", "RESOURCE_EXHAUSTED")  # the route's own series
    r = http.post("/v1/answer", content=b"x", headers={**auth, "content-length": over})
    assert r.status_code == 413 and r.json()["detail"].startswith(f"request body: {over} bytes")
    assert _requests_total("http_answer", "RESOURCE_EXHAUSTED") == before + 1
    r = http.post("/v1/answer")
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert http.get("/healthz").status_code == 200  # the probes stay open


def test_allowlist_matches_scheme_host_port_and_path_prefix() -> None:
    prefixes = ["https://img.example.com/p2r/", "http://127.0.0.1:8080/"]
    assert allowed("https://img.example.com/p2r/a.png", prefixes)
    assert allowed("https://IMG.example.com/p2r/x/y.jpg", prefixes)
    assert allowed("http://127.0.0.1:8080/a.png", prefixes)
    assert not allowed("https://img.example.com/other/a.png", prefixes)
    assert not allowed("https://img.example.com.evil.net/p2r/a.png", prefixes)
    assert not allowed("http://img.example.com/p2r/a.png", prefixes)  # scheme
    assert not allowed("http://127.0.0.1:8081/a.png", prefixes)  # port
    assert not allowed("https://user@evil.net/p2r/a.png", prefixes)
    assert not allowed("https://img.example.com/p2r/a.png", [])


def test_json_depth_is_bounded_from_the_bytes() -> None:
    """Issue 25 item 7: the depth bound counts brackets of the JSON structure only - not those
    inside strings, escaped quotes and backslashes included - and refuses 100,000-deep input
    (which the parser's recursion turned into a 500) as a 400."""
    from p2r.services.openai_request import MAX_JSON_DEPTH, load_json

    def nested(depth: int) -> Any:
        value: Any = 'in "a string" [[[{{ \\" \\'
        for i in range(depth):
            value = [value] if i % 2 else {"k[\"{": value}
        return value

    noise = json.dumps({"text": "[" * 500 + '\\"' + "{" * 500, "items": [[]] * 1000})
    assert load_json(noise.encode()) == json.loads(noise)
    assert load_json(json.dumps(nested(MAX_JSON_DEPTH)).encode()) == nested(MAX_JSON_DEPTH)
    for body in (json.dumps(nested(MAX_JSON_DEPTH + 1)).encode(), _DEEP_BODY):
        with pytest.raises(OpenAIError) as e:
            load_json(body)
        assert e.value.status == 400
        assert e.value.message == f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels"


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A loopback HTTP server: /a.png an image, /big 5000 bytes, /moved a redirect to /a.png."""
    body = png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("location", "/a.png")
                self.end_headers()
                return
            data = body if self.path == "/a.png" else b"x" * 5000 if self.path == "/big" else None
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_image_only_under_the_allowlist(image_host: str) -> None:
    import asyncio

    allow = [f"{image_host}/"]

    def fetch(url: str, allowlist: list[str], max_bytes: int = 100_000) -> bytes:
        return asyncio.run(fetch_image(url, "url", allowlist, max_bytes, 10.0))

    assert fetch(f"{image_host}/a.png", allow) == png()
    with pytest.raises(OpenAIError) as e:
        fetch(f"{image_host}/a.png", [])
    assert e.value.status == 400 and "data: URLs only" in e.value.message
    with pytest.raises(OpenAIError) as e:
        fetch(f"{image_host}/a.png", [f"{image_host}/images/"])
    assert e.value.status == 400 and "not under an allowed image URL prefix" in e.value.message
    with pytest.raises(OpenAIError) as e:  # a redirect could leave the allow-list: not followed
        fetch(f"{image_host}/moved", allow)
    assert e.value.status == 400 and "HTTP 302" in e.value.message
    with pytest.raises(OpenAIError) as e:
        fetch(f"{image_host}/big", allow, max_bytes=1000)
    assert e.value.status == 413


# ------------------------------------------------------------------------------ engine

engine = pytest.mark.engine


@pytest.fixture(scope="module")
def base(role_server: ServerProc) -> str:
    return f"http://127.0.0.1:{role_server.http_port}"


@pytest.fixture(scope="module")
def oai(base: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(role_server: ServerProc) -> Iterator[Client]:
    with Client(role_server.target, timeout_s=300) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def synth_image(synthetic_dir: Path) -> bytes:
    return (synthetic_dir / "images" / "000000.png").read_bytes()


def _reference(client: Client, image: bytes) -> pb.AnswerResponse:
    """P2R.Answer for the request the chat calls below make (temperature 0 both stages)."""
    greedy = pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return client.answer(pb.AnswerRequest(image=image, question=QUESTION, answer_form=pb.ANSWER_FORM_MCA,
                                          perceive_sampling=greedy, reason_sampling=greedy, structured_perceiver=True))


def _chat_kwargs(image: bytes) -> dict[str, Any]:
    return {"model": "p2r", "messages": user(image_part(data_url(image)), text_part()), "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "extra_body": {"p2r": {"answer_form": "mca", "structured": True,
                                   "perceive": {"temperature": 0, "max_tokens": MAX_TOKENS}}}}


def _regions(items: Any) -> list[tuple[float, float, float, float, str]]:
    return [(r["x1"], r["y1"], r["x2"], r["y2"], r["label"]) if isinstance(r, dict) else
            (r.x1, r.y1, r.x2, r.y2, r.label) for r in items]


@engine
def test_models_lists_the_served_model(oai: Any) -> None:
    assert [m.id for m in oai.models.list().data] == ["p2r"]


@engine
def test_openai_client_unary_equals_answer(oai: Any, client: Client, synth_image: bytes) -> None:
    ref = _reference(client, synth_image)
    r = oai.chat.completions.create(**_chat_kwargs(synth_image))
    assert r.object == "chat.completion" and r.model == "p2r"
    assert r.choices[0].message.content == ref.reasoner_output
    assert r.choices[0].finish_reason == ref.finish_reason
    ext = r.model_extra["p2r"]
    assert ext["answer"] == ref.answer and ext["perceiver_output"] == ref.perceiver_output
    assert _regions(ext["regions"]) == _regions(ref.regions)
    assert ext["num_crops"] == ref.num_crops == len(ext["crops"])
    assert set(ext["timings"]) == {"perceive_ms", "evidence_ms", "reason_ms", "total_ms"}
    u = ext["usage"]
    assert r.usage.completion_tokens == u["perceive_completion_tokens"] + u["reason_completion_tokens"] > 0
    assert r.usage.prompt_tokens == u["perceive_prompt_tokens"] + u["reason_prompt_tokens"]
    assert u["perceive_prompt_tokens"] > 0 and u["reason_prompt_tokens"] > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@engine
def test_openai_client_stream_equals_answer(oai: Any, client: Client, synth_image: bytes) -> None:
    ref = _reference(client, synth_image)
    chunks = list(oai.chat.completions.create(**_chat_kwargs(synth_image), stream=True,
                                              stream_options={"include_usage": True}))
    first, *rest = chunks
    # the regions come first, before any reasoner token
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert _regions(first.model_extra["p2r"]["regions"]) == _regions(ref.regions)
    assert first.model_extra["p2r"]["perceiver_output"] == ref.perceiver_output
    deltas = [c.choices[0].delta.content for c in rest if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the reply came in one piece, not streamed"
    assert "".join(deltas) == ref.reasoner_output
    [last] = [c for c in rest if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == ref.finish_reason
    assert last.model_extra["p2r"]["answer"] == ref.answer
    assert _regions(last.model_extra["p2r"]["regions"]) == _regions(ref.regions)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@engine
def test_answer_stream_grpc_events_equal_answer(client: Client, synth_image: bytes) -> None:
    ref = _reference(client, synth_image)
    greedy = pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    events = list(client.answer_stream(pb.AnswerRequest(
        image=synth_image, question=QUESTION, answer_form=pb.ANSWER_FORM_MCA, perceive_sampling=greedy,
        reason_sampling=greedy, structured_perceiver=True)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "regions" and kinds[-1] == "response" and set(kinds[1:-1]) == {"delta"}
    assert _regions(events[0].regions.regions) == _regions(ref.regions)
    final = events[-1].response
    assert "".join(e.delta for e in events[1:-1]) == final.reasoner_output == ref.reasoner_output
    for name in ("answer", "reasoning", "perceiver_output", "with_evidence", "num_crops", "finish_reason"):
        assert getattr(final, name) == getattr(ref, name), name
    assert final.timings.total_ms > 0 and final.usage == ref.usage


@engine
def test_cli_ask_stream_prints_events_as_json_lines(role_server: ServerProc, synthetic_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "p2r.cli", "ask", "--target", role_server.target, "--image",
                          str(synthetic_dir / "images" / "000001.png"), "--question", "Q?", "--stream"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert list(events[0]) == ["regions"] and list(events[-1]) == ["response"]
    assert "".join(e["delta"] for e in events[1:-1]) == events[-1]["response"]["reasoner_output"]


def _error(fn: Any) -> Any:
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@engine
@pytest.mark.parametrize(("case", "status", "param"), [
    ("no image", 400, "messages[0].content"),
    ("text only", 400, "messages[0].content"),
    ("two images", 400, "messages[0].content[1]"),
    ("bad base64", 400, "messages[0].content[0].image_url.url"),
    ("not an image", 400, "messages[0].content[0].image_url.url"),
    ("url not allowed", 400, "messages[0].content[0].image_url.url"),
    ("unknown model", 404, "model"),
    ("negative max_tokens", 400, "max_tokens"),
    ("bad answer form", 400, "p2r.answer_form"),
    ("image too large", 413, "messages[0].content[0].image_url.url"),
])
def test_bad_requests_get_openai_errors(oai: Any, case: str, status: int, param: str | None) -> None:
    img = image_part(data_url(png()))
    kwargs: dict[str, Any] = {"model": "p2r", "messages": user(img, text_part())}
    if case == "no image":
        kwargs["messages"] = user(text_part())
    elif case == "text only":
        kwargs["messages"] = [{"role": "user", "content": QUESTION}]
    elif case == "two images":
        kwargs["messages"] = user(img, img, text_part())
    elif case == "bad base64":
        kwargs["messages"] = user(image_part("data:image/png;base64,@@not base64@@"), text_part())
    elif case == "not an image":
        kwargs["messages"] = user(image_part(data_url(b"GIF? no, just bytes")), text_part())
    elif case == "url not allowed":
        kwargs["messages"] = user(image_part("https://images.example.com/a.png"), text_part())
    elif case == "unknown model":
        kwargs["model"] = "gpt-4o"
    elif case == "negative max_tokens":
        kwargs["max_tokens"] = -5
    elif case == "bad answer form":
        kwargs["extra_body"] = {"p2r": {"answer_form": "essay"}}
    elif case == "image too large":  # over max_image_bytes (2,000,000), under the HTTP body limit
        kwargs["messages"] = user(image_part(data_url(b"\0" * 2_050_000)), text_part())
    e = _error(lambda: oai.chat.completions.create(**kwargs))
    assert e.status_code == status, e.body
    body = e.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param and body["type"] == "invalid_request_error"
    if param:
        assert body["message"].startswith(param), body["message"]
    if case == "unknown model":
        assert body["code"] == "model_not_found"


@engine
def test_over_limit_content_length_is_an_openai_413(base: str, role_server: ServerProc) -> None:
    """The shared gateway refuses a Content-Length over its body limit before reading the body."""
    import http.client

    before = _value(_scrape(role_server.metrics_port), "p2r_requests_total", method="openai.chat",
                    code="RESOURCE_EXHAUSTED")
    conn = http.client.HTTPConnection("127.0.0.1", role_server.http_port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(300 * 1024 * 1024))
        conn.endheaders()  # the body is never sent
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 413, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "request_too_large" and "over the limit" in body["error"]["message"]
    _wait_counted(role_server, "openai.chat", "RESOURCE_EXHAUSTED", before)


@engine
def test_deadline_is_504_and_aborts(base: str, role_server: ServerProc) -> None:
    import httpx

    before = _value(_scrape(role_server.metrics_port), "p2r_engine_aborted_requests_total")
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "p2r", "messages": user(image_part(data_url(png())), text_part()),
        "p2r": {"timeout_s": 0.5, "perceive": {"max_tokens": 6000}}})
    # Greedy, so the perceiver's reply is the same every run (it runs past the deadline): sampled
    # at temperature 1.0 it once drew the end token early and the whole answer beat 0.5 s.
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text[:500]
    _wait_aborted(role_server, before)


@engine
def test_disconnect_mid_stream_aborts_the_engine_request(base: str, role_server: ServerProc) -> None:
    import httpx

    text = _scrape(role_server.metrics_port)
    before = _value(text, "p2r_engine_aborted_requests_total")
    cancelled = _value(text, "p2r_requests_total", method="openai.chat", code="CANCELLED")
    body = {"model": "p2r", "messages": user(image_part(data_url(png(colour="red"))), text_part()), "stream": True,
            "temperature": 1.0, "max_tokens": 6000, "p2r": {"perceive": {"max_tokens": 8}}}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 3:  # the reasoner is generating: hang up
                    break
        assert seen == 3
    _wait_aborted(role_server, before)
    _wait_counted(role_server, "openai.chat", "CANCELLED", cancelled)


@engine
def test_cancelling_answer_stream_aborts_the_engine_request(client: Client, role_server: ServerProc) -> None:
    text = _scrape(role_server.metrics_port)
    before = _value(text, "p2r_engine_aborted_requests_total")
    cancelled = _value(text, "p2r_requests_total", method="AnswerStream", code="CANCELLED")
    call = client.answer_stream(pb.AnswerRequest(
        image=png(colour="blue"), question="Q?", answer_form=pb.ANSWER_FORM_NA,
        perceive_sampling=pb.SamplingParams(max_tokens=8),
        reason_sampling=pb.SamplingParams(temperature=1.0, max_tokens=6000)))
    kinds = []
    for event in call:
        kinds.append(event.WhichOneof("event"))
        if kinds.count("delta") == 3:
            call.cancel()
            break
    assert kinds[0] == "regions" and kinds.count("delta") == 3
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    _wait_aborted(role_server, before)
    _wait_counted(role_server, "AnswerStream", "CANCELLED", cancelled)


@engine
def test_answer_stream_bad_input_is_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(client.answer_stream(pb.AnswerRequest(image=png(), question=" ", answer_form=pb.ANSWER_FORM_MCA)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("question:")
    with pytest.raises(grpc.RpcError) as e:
        list(client.answer_stream(pb.AnswerRequest(image=b"not an image", question="Q?",
                                                   answer_form=pb.ANSWER_FORM_MCA)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in e.value.details()


def _post(base: str, body: Any) -> Any:
    """POST a chat body (a dict, or raw bytes for JSON the client libraries will not write)."""
    import httpx

    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=content, timeout=120,
                      headers={"content-type": "application/json"})


def _chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "p2r", "messages": user(image_part(data_url(png())), text_part()), **fields}


_SURROGATE_BODY = json.dumps(_chat_body()).replace(QUESTION, "Which\\ud800 shape?").encode()
_DEEP_BODY = b"[" * 100_000 + b"]" * 100_000


@engine
def test_client_mistakes_are_400_naming_the_field_and_counted(base: str, role_server: ServerProc) -> None:
    """Issue 25 items 7 and 13: each of these was a plain-text 500 with a logged traceback (or a
    400 with ``param: null``), uncounted. Now a 400 OpenAI error whose ``param`` names the field,
    counted INVALID_ARGUMENT, found at parse time."""
    cases: list[tuple[Any, str | None]] = [
        (_chat_body(max_tokens=2**32), "max_tokens"),
        (_chat_body(max_completion_tokens=2**40), "max_completion_tokens"),
        (_chat_body(seed=2**63), "seed"),
        (_chat_body(seed=-(2**63) - 1), "seed"),
        (_chat_body(p2r={"perceive": {"max_tokens": 2**33}}), "p2r.perceive.max_tokens"),
        (_chat_body(p2r={"perceive": {"seed": 10**20}}), "p2r.perceive.seed"),
        (_chat_body(top_p=1e-300), "top_p"),
        (_chat_body(p2r={"perceive": {"top_p": 1e-300}}), "p2r.perceive.top_p"),
        (_SURROGATE_BODY, "messages[0].content[1].text"),
        (_chat_body(extra=json.loads("[" * 80 + "]" * 80)), None),  # over MAX_JSON_DEPTH: the body's fault
        (_DEEP_BODY, None),
    ]
    before = _value(_scrape(role_server.metrics_port), "p2r_requests_total", method="openai.chat",
                    code="INVALID_ARGUMENT")
    for body, param in cases:
        r = _post(base, body)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (param, r.text[:300])
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert error["message"].startswith(param or "request body"), error
    after = _value(_scrape(role_server.metrics_port), "p2r_requests_total", method="openai.chat",
                   code="INVALID_ARGUMENT")
    assert after - before == len(cases)


@engine
def test_unimplemented_openai_parameters_are_refused_by_name(base: str) -> None:
    """Issue 25 item 13: ``stop``, ``logprobs``, ``tools``, ``response_format``... were answered
    200 and ignored; a client could not tell. Now a 400 naming the parameter, unless it asks for
    nothing (null, ``logprobs: false``) or the request opts in with ``p2r.ignore_unsupported``."""
    unsupported = {"stop": ["\n"], "logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_object"},
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                   "tool_choice": "auto", "presence_penalty": 0.5, "frequency_penalty": 0.5,
                   "logit_bias": {"1": 5}, "top_k": 5}
    for name, value in unsupported.items():
        r = _post(base, _chat_body(**{name: value}))
        assert r.status_code == 400, (name, r.text[:300])
        error = r.json()["error"]
        assert (error["param"], error["code"]) == (name, "unsupported_parameter"), error
        assert error["message"].startswith(f"{name}: not supported") and "ignore_unsupported" in error["message"]
    low = {"model": "p2r", "messages": user({"type": "image_url", "image_url": {"url": data_url(png()),
                                                                            "detail": "low"}}, text_part())}
    r = _post(base, low)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url.detail", r.text
    one_token = {"max_tokens": 1, "p2r": {"perceive": {"max_tokens": 1}}}
    asked_nothing = _post(base, _chat_body(stop=None, logprobs=False, tools=[], user="u-1", **one_token))
    assert asked_nothing.status_code == 200, asked_nothing.text[:300]
    ignored = _post(base, _chat_body(**unsupported, max_tokens=1,
                                     p2r={"perceive": {"max_tokens": 1}, "ignore_unsupported": True}))
    assert ignored.status_code == 200 and ignored.json()["object"] == "chat.completion", ignored.text[:300]


@engine
def test_response_image_size_is_the_displayed_one(base: str) -> None:
    """Issue 25 item 12: a JPEG stored 400x200 with EXIF orientation 6 is reported 200x400 (as a
    browser shows it and the models see it), and the crops lie in those coordinates."""
    from tests.test_images import rotated_jpeg

    for stream in (False, True):
        r = _post(base, {"model": "p2r", "messages": user(image_part(data_url(rotated_jpeg(), "image/jpeg")),
                                                          text_part()),
                         "max_tokens": 1, "stream": stream, "p2r": {"perceive": {"max_tokens": 8}}})
        assert r.status_code == 200, r.text[:300]
        events = ([json.loads(line[6:]) for line in r.text.splitlines()
                   if line.startswith("data: {")] if stream else [r.json()])
        for ext in [e["p2r"] for e in events if "p2r" in e]:
            assert ext["image"] == {"width": 200, "height": 400}, ext["image"]
            assert all(0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 400 for x1, y1, x2, y2 in ext["crops"])


@engine
def test_answer_form_refuses_a_second_image(base: str, role_server: ServerProc) -> None:
    """Issue 25 item 13: a second ``image`` part silently replaced the first; now a 400 naming it,
    counted, before admission."""
    import httpx

    before = _value(_scrape(role_server.metrics_port), "p2r_requests_total", method="http_answer",
                    code="INVALID_ARGUMENT")
    r = httpx.post(f"{base}/v1/answer", timeout=60, data={"question": "Q?"},
                   files=[("image", ("a.png", png(), "image/png")),
                          ("image", ("b.png", png(colour="red"), "image/png"))])
    assert r.status_code == 400 and r.json()["detail"].startswith("image: sent more than once"), r.text
    _wait_counted(role_server, "http_answer", "INVALID_ARGUMENT", before)

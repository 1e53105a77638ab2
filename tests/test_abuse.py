"""Issue 14, serving side: a real ``p2r serve`` (all roles on the tiny model) with TLS on every
port, API keys on the public ports and a token on the admin port, fed what an attacker would
send. Every refusal must carry the right status and name the field, and the server must answer
normally afterwards.

One server for the module (an engine start is ~30-60 s); each test ends with ``_alive``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import random
import re
import socket
import ssl
import string
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from p2r.core.images import encode_image
from p2r.services.client import Client
from p2r.services.launch import ServerProc, start_server
from p2r.services.security import ClientCredentials
from p2r.v1 import p2r_pb2 as pb

pytestmark = pytest.mark.engine

API_KEY = "test-api-key-0123456789"
ADMIN_TOKEN = "test-admin-token-9876543210"
MAX_MODEL_LEN = 2048
MAX_IN_FLIGHT = 16
MAX_BATCH = 8
MAX_N = 8
MAX_IMAGE_BYTES = 2_000_000
CACHE_BUDGET = 256 * 1024 * 1024
RSS_MARGIN = 1536 * 1024 * 1024
"""Above baseline + cache budget: the image being decoded (a 10,000 x 10,000 RGB image is 300 MB,
plus its converted copy and the resize) and allocator slack. Unbounded, 16 such images keep
~5 GB."""


@pytest.fixture(scope="module")
def abuse_server(tiny_model_dir: Path, tls_certs: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    work = tmp_path_factory.mktemp("abuse")
    (work / "api-keys").write_text(f"{API_KEY}\nsecond-key-for-rotation\n")
    (work / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = work / "serve.yaml"
    config.write_text(f"""\
max_in_flight: {MAX_IN_FLIGHT}
max_batch_items: {MAX_BATCH}
max_n: {MAX_N}
max_image_bytes: {MAX_IMAGE_BYTES}
max_image_pixels: 100000000
max_question_chars: 40000
max_pixels: 262144
decoded_image_cache_bytes: {CACHE_BUDGET}
prepare_workers: 1
perceive_max_tokens: 1024
reason_max_tokens: 1024
grace_period_s: 30
api_keys_file: {work / "api-keys"}
admin_token_file: {work / "admin-token"}
tls:
  cert_file: {tls_certs / "tls.crt"}
  key_file: {tls_certs / "tls.key"}
limits:
  max_model_len: {MAX_MODEL_LEN}
  max_num_seqs: 16
""")
    server = start_server(
        ["perceiver", "reasoner", "verifier", "gateway", "--model", str(tiny_model_dir), "--http-port", "0"],
        env={"P2R_CHECKPOINT_CACHE": str(work / "cache")}, config=config, timeout=900)
    yield server
    server.stop()


def _creds(tls_certs: Path, **kw: Any) -> ClientCredentials:
    return ClientCredentials(**{"ca_file": tls_certs / "ca.crt", "api_key": API_KEY, **kw})


@pytest.fixture(scope="module")
def client(abuse_server: ServerProc, tls_certs: Path) -> Iterator[Client]:
    with Client(abuse_server.target, timeout_s=300, credentials=_creds(tls_certs, admin_token=ADMIN_TOKEN),
                admin_target=abuse_server.admin_target) as c:
        c.wait_ready(60)
        yield c


def _png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return encode_image(Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3))))


PNG = _png()


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _perceive(question: str = "Where is the red square?", **sampling: Any) -> pb.PerceiveRequest:
    return pb.PerceiveRequest(image=PNG, question=question,
                              sampling=pb.SamplingParams(**{"max_tokens": 1, **sampling}))


def _alive(client: Client) -> None:
    """The server still answers a normal request after the abuse."""
    result = client.perceiver.Perceive(_perceive(), timeout=120)
    assert len(result.completions) == 1


def _ssl(tls_certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_certs / "ca.crt"))


def _metric(server: ServerProc, tls_certs: Path, name: str) -> float:
    """Sum of a Prometheus sample over its labels, scraped over TLS from the metrics port."""
    text = urllib.request.urlopen(f"https://127.0.0.1:{server.metrics_port}/metrics",
                                  context=_ssl(tls_certs), timeout=30).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def _multipart(fields: dict[str, bytes], image: bytes | None) -> tuple[bytes, str]:
    boundary = "p2rboundary7f3a"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _http(server: ServerProc, tls_certs: Path, body: bytes, content_type: str, key: str | None = API_KEY,
          path: str = "/v1/answer") -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", server.http_port, context=_ssl(tls_certs), timeout=300)
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


# ------------------------------------------------------------------------------ item 1: auth, TLS


def test_tls_client_works_and_plaintext_is_refused(abuse_server: ServerProc, client: Client,
                                                   tls_certs: Path) -> None:
    assert client.status().max_in_flight == MAX_IN_FLIGHT
    plain = Client(abuse_server.target, timeout_s=10, credentials=ClientCredentials(api_key=API_KEY))
    code, _ = _code(lambda: plain.perceiver.Perceive(_perceive(), timeout=10))
    plain.close()
    assert code == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, no call
    # A client that does not trust the server's CA is refused too.
    other = Client(abuse_server.target, timeout_s=10,
                   credentials=ClientCredentials(ca_file=tls_certs / "client.crt", api_key=API_KEY))
    assert _code(lambda: other.status())[0] == grpc.StatusCode.UNAVAILABLE
    other.close()
    # HTTP facade and metrics: HTTPS works, plain HTTP gets no answer.
    conn = http.client.HTTPSConnection("127.0.0.1", abuse_server.http_port, context=_ssl(tls_certs), timeout=30)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    for port in (abuse_server.http_port, abuse_server.metrics_port):
        plain_http = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain_http.request("GET", "/healthz")
            plain_http.getresponse().read()
        plain_http.close()
    _alive(client)


def test_api_key_required_on_public_ports(abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    for creds in (_creds(tls_certs, api_key=None), _creds(tls_certs, api_key="wrong-key")):
        with Client(abuse_server.target, timeout_s=30, credentials=creds) as c:
            code, message = _code(lambda c=c: c.perceiver.Perceive(_perceive(), timeout=30))
            assert code == grpc.StatusCode.UNAUTHENTICATED, message
            assert "API key" in message
            # Health stays open for probes.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    # The second key of the file works (rotation).
    rotated = _creds(tls_certs, api_key="second-key-for-rotation")
    with Client(abuse_server.target, timeout_s=60, credentials=rotated) as c:
        assert len(c.perceiver.Perceive(_perceive(), timeout=120).completions) == 1
    body, content_type = _multipart({"question": b"What is it?"}, PNG)
    status, text = _http(abuse_server, tls_certs, body, content_type, key=None)
    assert status == 401 and "API key" in text
    status, _ = _http(abuse_server, tls_certs, body, content_type, key="wrong")
    assert status == 401
    _alive(client)


def test_admin_needs_its_token_and_port(abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    assert abuse_server.admin_target is not None and abuse_server.admin_target != abuse_server.target
    for token in (None, "wrong-token", API_KEY):  # the API key is not the admin token
        with Client(abuse_server.target, credentials=_creds(tls_certs, admin_token=token),
                    admin_target=abuse_server.admin_target) as c:
            code, message = _code(lambda c=c: c.load_checkpoint("/tmp/anything", timeout_s=30))
            assert code == grpc.StatusCode.UNAUTHENTICATED, message
            assert "admin token" in message
    # With the token the call reaches the handler (an empty URI is then the caller's mistake).
    code, message = _code(lambda: client.load_checkpoint("", timeout_s=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("uri")
    # The public port does not reload, even with a valid API key; its Status is read-only.
    with Client(abuse_server.target, credentials=_creds(tls_certs)) as c:
        code, message = _code(lambda: c.load_checkpoint("/tmp/anything", timeout_s=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin port" in message
        status = c.status()
    assert (status.max_batch_items, status.max_n) == (MAX_BATCH, MAX_N)
    assert status.max_receive_bytes > MAX_BATCH * MAX_IMAGE_BYTES
    _alive(client)


# ------------------------------------------------------------------------------ item 7: size


def test_oversized_grpc_message_is_refused_by_the_transport(client: Client) -> None:
    limit = client.status().max_receive_bytes
    blob = random.Random(0).randbytes(MAX_IMAGE_BYTES)
    count = limit // len(blob) + 2  # more bytes than the limit, in valid-looking items
    request = pb.PerceiveBatchRequest(requests=[pb.PerceiveRequest(image=blob, question="q")] * count)
    assert request.ByteSize() > limit
    code, message = _code(lambda: client.perceiver.PerceiveBatch(request, timeout=120))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "larger than max" in message
    _alive(client)


def test_http_upload_over_the_limit_is_413(abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    # Content-Length over the limit: refused before the body is read (the body is never sent).
    conn = http.client.HTTPSConnection("127.0.0.1", abuse_server.http_port, context=_ssl(tls_certs), timeout=60)
    conn.putrequest("POST", "/v1/answer")
    conn.putheader("Authorization", f"Bearer {API_KEY}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(300 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in response.read().decode()
    conn.close()
    # Chunked (no length): cut off once the stream passes the limit.
    chunk = b"0" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(64):
            yield chunk

    conn = http.client.HTTPSConnection("127.0.0.1", abuse_server.http_port, context=_ssl(tls_certs), timeout=60)
    try:
        conn.request("POST", "/v1/answer", body=body(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {API_KEY}",
                              "Content-Type": "multipart/form-data; boundary=x"})
        response = conn.getresponse()
        assert response.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while the client was still sending
    finally:
        conn.close()
    _alive(client)


# ------------------------------------------------------------------------------ item 8: n, admission


def test_n_is_capped_and_admission_counts_completions(abuse_server: ServerProc, client: Client,
                                                      tls_certs: Path) -> None:
    code, message = _code(lambda: client.perceiver.Perceive(_perceive(n=1000), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("sampling.n") and f"max_n={MAX_N}" in message
    # 4 items x n=8 = 32 completions > max_in_flight=16: can never run -> INVALID_ARGUMENT, once.
    before = _metric(abuse_server, tls_certs, "p2r_requests_total")
    batch = pb.PerceiveBatchRequest(requests=[_perceive(n=MAX_N)] * 4)
    code, message = _code(lambda: client.perceiver.PerceiveBatch(batch, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_in_flight={MAX_IN_FLIGHT}" in message and "32 completions" in message
    assert _metric(abuse_server, tls_certs, "p2r_requests_total") - before == 1  # not retried
    # A batch within the capacity runs, all its completions returned.
    ok = client.perceiver.PerceiveBatch(pb.PerceiveBatchRequest(requests=[_perceive(n=4, temperature=1.0)] * 2),
                                        timeout=300)
    assert [len(r.completions) for r in ok.results] == [4, 4]
    _alive(client)


def test_max_tokens_over_the_model_length_is_capped(client: Client) -> None:
    result = client.perceiver.Perceive(_perceive(max_tokens=1_000_000, temperature=1.0, seed=3), timeout=600)
    assert 1 <= result.completions[0].num_tokens < MAX_MODEL_LEN
    _alive(client)


# ------------------------------------------------------------------------------ item 9: disconnects


def test_http_disconnect_aborts_the_engine_request(abuse_server: ServerProc, client: Client,
                                                   tls_certs: Path) -> None:
    aborted = _metric(abuse_server, tls_certs, "p2r_engine_aborted_requests_total")
    body, content_type = _multipart({"question": b"Describe everything in detail."}, _png(seed=9))
    raw = socket.create_connection(("127.0.0.1", abuse_server.http_port))
    sock = _ssl(tls_certs).wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    # Wait until the engine is generating for it (perceive_max_tokens=1024: it runs for long).
    deadline = time.monotonic() + 300
    while _metric(abuse_server, tls_certs, "vllm:num_requests_running") < 1:
        assert time.monotonic() < deadline, "the HTTP request never reached the engine"
        time.sleep(0.05)
    sock.close()
    while client.status().in_flight > 0:
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.05)
    assert _metric(abuse_server, tls_certs, "p2r_engine_aborted_requests_total") >= aborted + 1
    _alive(client)


# ------------------------------------------------------------------------------ item 10: bad input


@pytest.mark.parametrize(("sampling", "field"), [
    ({"temperature": math.nan}, "sampling.temperature"),
    ({"temperature": math.inf}, "sampling.temperature"),
    ({"repetition_penalty": math.nan}, "sampling.repetition_penalty"),
    ({"repetition_penalty": -math.inf}, "sampling.repetition_penalty"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),  # vLLM's own rule
    ({"top_p": math.nan}, "sampling.top_p"),
])
def test_non_finite_and_vllm_invalid_sampling(client: Client, sampling: dict[str, float], field: str) -> None:
    code, message = _code(lambda: client.perceiver.Perceive(_perceive(**sampling), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith(field), message
    batch = pb.ReasonBatchRequest(requests=[
        pb.ReasonRequest(image=PNG, question="q", answer_form=pb.ANSWER_FORM_MCA,
                         sampling=pb.SamplingParams(max_tokens=1)),
        pb.ReasonRequest(image=PNG, question="q", answer_form=pb.ANSWER_FORM_MCA,
                         sampling=pb.SamplingParams(max_tokens=1, **sampling))])
    code, message = _code(lambda: client.reasoner.ReasonBatch(batch, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"requests[1].{field}"), message
    _alive(client)


def test_question_longer_than_the_model(abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    rng = random.Random(1)
    question = "".join(rng.choice(string.ascii_letters + string.digits + " .,;") for _ in range(30_000))
    code, message = _code(lambda: client.perceiver.Perceive(_perceive(question), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith("question") and f"max_model_len={MAX_MODEL_LEN}" in message
    code, message = _code(lambda: client.perceiver.PerceiveBatch(
        pb.PerceiveBatchRequest(requests=[_perceive(), _perceive(question)]), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("requests[1].question"), message
    body, content_type = _multipart({"question": question.encode()}, PNG)
    status, text = _http(abuse_server, tls_certs, body, content_type)
    assert status == 400 and "question" in text and "max_model_len" in text, text
    _alive(client)


def test_invalid_utf8(abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    marker = "QQQQ-marker"
    bad = "\xff\xfeQQ-marker".encode("latin-1")  # same length, not UTF-8
    raw = client.channel.unary_unary("/p2r.v1.Perceiver/Perceive", request_serializer=lambda b: b,
                                     response_deserializer=pb.PerceiveResult.FromString)
    data = _perceive(marker).SerializeToString().replace(marker.encode(), bad)
    code, message = _code(lambda: raw(data, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("question"), message
    raw_batch = client.channel.unary_unary("/p2r.v1.Reasoner/ReasonBatch", request_serializer=lambda b: b,
                                           response_deserializer=pb.ReasonBatchResponse.FromString)
    batch = pb.ReasonBatchRequest(requests=[
        pb.ReasonRequest(image=PNG, question="fine", answer_form=pb.ANSWER_FORM_MCA),
        pb.ReasonRequest(image=PNG, question="fine", answer_form=pb.ANSWER_FORM_MCA,
                         regions=[pb.Region(x1=1, y1=1, x2=9, y2=9, label=marker)])])
    code, message = _code(lambda: raw_batch(batch.SerializeToString().replace(marker.encode(), bad), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert message.startswith("requests[1].regions[0].label"), message
    body, content_type = _multipart({"question": b"What is \xff\xfe this?"}, PNG)
    status, text = _http(abuse_server, tls_certs, body, content_type)
    assert status == 400 and "question" in text and "UTF-8" in text, text
    _alive(client)


def test_unknown_variant(client: Client) -> None:
    request = _perceive()
    request.variant = 7  # proto3 enums are open: the number arrives as it is
    code, message = _code(lambda: client.perceiver.Perceive(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("variant"), message
    answer = pb.AnswerRequest(image=PNG, question="q", answer_form=pb.ANSWER_FORM_MCA, variant=3)
    code, message = _code(lambda: client.answer(answer, timeout_s=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("variant"), message
    _alive(client)


def test_aspect_ratio_over_the_limit_names_the_field(client: Client) -> None:
    thin = _png(4000, 10)
    code, message = _code(lambda: client.perceiver.Perceive(
        pb.PerceiveRequest(image=thin, question="q", sampling=pb.SamplingParams(max_tokens=1)), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("image"), message
    assert "aspect ratio" in message
    batch = pb.ReasonBatchRequest(requests=[
        pb.ReasonRequest(image=PNG, question="q", answer_form=pb.ANSWER_FORM_MCA),
        pb.ReasonRequest(image=thin, question="q", answer_form=pb.ANSWER_FORM_MCA)])
    code, message = _code(lambda: client.reasoner.ReasonBatch(batch, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("requests[1].image"), message
    _alive(client)


def test_unauthenticated_calls_leave_no_engine_work(abuse_server: ServerProc, tls_certs: Path,
                                                    client: Client) -> None:
    """Refused calls are refused before the servicer: nothing is admitted."""
    with Client(abuse_server.target, credentials=_creds(tls_certs, api_key="nope")) as c:
        for _ in range(20):
            assert _code(lambda c=c: c.perceiver.Perceive(_perceive(), timeout=30))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
    assert client.status().in_flight == 0
    _alive(client)


# ------------------------------------------------------------------------------ issue 25 item 8


def _hold(seed: int) -> pb.PerceiveRequest:
    """A request that keeps MAX_N admission slots for long: sampled completions run to the model
    length (max_tokens is capped there), so the test controls when they end (it cancels them)."""
    return pb.PerceiveRequest(image=PNG, question="Describe everything in detail.", sampling=pb.SamplingParams(
        n=MAX_N, temperature=1.0, max_tokens=1_000_000, seed=seed))


def test_bad_input_under_saturation_is_invalid_argument_not_overload(
        abuse_server: ServerProc, client: Client, tls_certs: Path) -> None:
    """Issue 25 item 8: with admission full, a bad image or bad sampling on P2R.Answer /
    AnswerStream, /v1/answer and the chat route got RESOURCE_EXHAUSTED / 429 - which clients
    retry, in vain - because it was checked only once admitted (and the reasoner's sampling only
    after the perceiver had generated). Each must be refused before admission, naming its field:
    ``image``, ``perceive_sampling.*``, ``reason_sampling.*`` (chat: the OpenAI param)."""
    from p2r.services.client import RetryPolicy

    once = Client(abuse_server.target, timeout_s=60, credentials=_creds(tls_certs),
                  retry=RetryPolicy(max_attempts=1))  # a RESOURCE_EXHAUSTED is seen, not retried
    holds = [client.perceiver.Perceive.future(_hold(seed), timeout=600) for seed in range(MAX_IN_FLIGHT // MAX_N)]

    def saturated() -> bool:
        code, _ = _code(lambda: once.perceiver.Perceive(_perceive(), timeout=60))
        return code == grpc.StatusCode.RESOURCE_EXHAUSTED

    try:
        deadline = time.monotonic() + 300
        while once.status().in_flight < MAX_IN_FLIGHT:
            assert time.monotonic() < deadline and not any(f.done() for f in holds), "the load never filled admission"
            time.sleep(0.05)
        assert saturated()
        fine = {"image": PNG, "question": "What is it?", "answer_form": pb.ANSWER_FORM_MCA}
        answers = [
            ({"image": b"GIF89a, not really"}, "image: cannot decode"),
            ({"image": random.Random(2).randbytes(MAX_IMAGE_BYTES + 1)}, "image: image is"),
            ({"image": _png(4000, 10)}, "image: image is 4000x10"),
            ({"reason_sampling": pb.SamplingParams(temperature=math.nan)}, "reason_sampling.temperature"),
            ({"reason_sampling": pb.SamplingParams(top_p=0.0)}, "reason_sampling: top_p"),
            ({"perceive_sampling": pb.SamplingParams(repetition_penalty=0.0)}, "perceive_sampling.repetition_penalty"),
            ({"perceive_sampling": pb.SamplingParams(n=MAX_N + 1)}, "perceive_sampling.n"),
        ]
        for fields, prefix in answers:
            request = pb.AnswerRequest(**{**fine, **fields})
            for call in (lambda r=request: once.answer(r), lambda r=request: list(once.answer_stream(r))):
                code, message = _code(call)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(prefix), (prefix, code, message)
        for image in (b"GIF89a, not really", _png(4000, 10)):
            body, content_type = _multipart({"question": b"What is it?"}, image)
            status, text = _http(abuse_server, tls_certs, body, content_type)
            assert status == 400 and '"image: ' in text, (status, text)
        url = "data:image/png;base64," + base64.b64encode(PNG).decode()
        chat = {"model": "p2r", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
        for extra, param in [({"top_p": 1e-300}, "top_p"), ({"p2r": {"perceive": {"top_p": 1e-300}}},
                                                           "p2r.perceive.top_p"),
                             ({"max_tokens": 2**32}, "max_tokens")]:
            status, text = _http(abuse_server, tls_certs, json.dumps({**chat, **extra}).encode(), "application/json",
                                 path="/v1/chat/completions")
            assert status == 400 and json.loads(text)["error"]["param"] == param, (status, text)
        assert saturated(), "the load ended before the checks did: they proved nothing"
    finally:
        for hold in holds:
            hold.cancel()
        once.close()
    deadline = time.monotonic() + 120
    while client.status().in_flight > 0:  # the module's server back to idle
        assert time.monotonic() < deadline, "the cancelled load kept running"
        time.sleep(0.05)
    _alive(client)


# ------------------------------------------------------------------------------ item 6: memory


def test_large_pixel_small_file_pngs_keep_memory_bounded(abuse_server: ServerProc, client: Client) -> None:
    """16 distinct 10,000 x 10,000 PNGs (~100 KB files, 300 MB decoded each, within the pixel
    limit): the decoded-image cache is bounded by bytes, so RSS stays within baseline + budget
    + margin instead of keeping every decoded image."""
    images = []
    for i in range(16):
        image = Image.new("RGB", (10_000, 10_000), (i * 13 % 256, 255 - i * 7 % 256, i * 29 % 256))
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=9)
        del image
        images.append(buf.getvalue())
    assert max(len(b) for b in images) < MAX_IMAGE_BYTES
    baseline = abuse_server.rss()
    peak = baseline
    for data in images:
        result = client.perceiver.Perceive(
            pb.PerceiveRequest(image=data, question="q", sampling=pb.SamplingParams(max_tokens=1)), timeout=600)
        assert len(result.completions) == 1
        peak = max(peak, abuse_server.rss())
    assert peak - baseline <= CACHE_BUDGET + RSS_MARGIN, (baseline >> 20, peak >> 20)
    _alive(client)


# ------------------------------------------------------------------------------ item 8: trainer


def test_trainer_checks_its_batch_size_against_the_server(abuse_server: ServerProc, client: Client) -> None:
    from p2r.core.errors import UserError
    from p2r.trainer.rewards import check_batch_limits

    check_batch_limits(client, abuse_server.target, MAX_BATCH)
    with pytest.raises(UserError, match=f"reward_batch_size=9 is over .*max_batch_items={MAX_BATCH}"):
        check_batch_limits(client, abuse_server.target, MAX_BATCH + 1)

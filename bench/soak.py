"""Bounded soak of one real ``p2r serve`` (all roles on one engine) on loopback, as an attacker
and a busy trainer at once (issues 14 and 25).

``--concurrency`` clients (default 128) loop for ``--duration-s`` seconds over a mix of valid
calls (Perceive, ReasonBatch, Answer, HTTP /v1/answer, OpenAI chat unary and streamed) and every
bad input of issues 14 and 25 (non-finite and vLLM-invalid sampling, a question longer than the
model, invalid UTF-8, an unknown variant, an over-wide image, n over the cap, a batch over the
admission capacity, a unary message over its limit, an upload over the HTTP limit, large-pixel
small-file PNGs, wrong API key, Admin without its token; chat integers past their range, a lone
surrogate, deeply nested JSON, an unimplemented OpenAI parameter, a garbage image on Answer), while
one thread reloads the checkpoint through the admin port every ``--reload-every-s`` seconds and
another samples the server's RSS and open fds (its process tree: the API server and the engine
core). The server runs at the default transport limits (image, batch and body sizes).

On top of that load, phases run one after another:

1. ``unauthenticated``: ``--unauth-workers`` clients without an API key send messages of
   ``--unauth-message-mib`` to the batch method and of one image's worth to the unary one; each
   must be UNAUTHENTICATED, and the server's RSS must come back afterwards;
2. ``slow``: ``--slow-connections`` HTTP connections that are idle, send their headers a byte at a
   time, or their body a byte at a time; the server must close them by its deadlines while
   ``/healthz`` keeps answering, and its fds must come back to where they were;
3. ``max_body``: ``--max-body-clients`` concurrent chat requests each carrying a maximal image
   (a noise PNG just under ``max_image_bytes``, about 43 MB as a data URL); RSS within budget;
4. ``http_sigterm``: the gRPC clients stop, the HTTP ones go on, and the server gets SIGTERM: every
   HTTP request it accepted before the signal must be answered in full (a stream with its
   ``[DONE]``): a request cut or answered 5xx is *lost*.

Every call has the set of codes it may end with (a bad input: INVALID_ARGUMENT naming its field;
overload: RESOURCE_EXHAUSTED); anything else is an *unexpected* failure. Prints requests sent,
failures by code, p99 latency of the valid calls, RSS after each phase against the decoded-image
cache budget plus ``--rss-margin-mib``, fds and requests lost on SIGTERM; writes JSON (default
bench/results/soak.json).

    .venv/bin/python bench/soak.py --duration-s 300          # the real run (the lead's)
    .venv/bin/python bench/soak.py --duration-s 60 --concurrency 16 --slow-connections 300   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import math
import os
import random
import signal
import string
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

API_KEY = "soak-api-key"
ADMIN_TOKEN = "soak-admin-token"
OK = "OK"
BAD = {"INVALID_ARGUMENT"}
BUSY = {"RESOURCE_EXHAUSTED"}
GONE = {"UNAVAILABLE", "HTTP_REFUSED", "HTTP_CONNECTION", "STREAM_CUT", "CANCELLED"}
"""How a call sent after SIGTERM ends: refused (503 / UNAVAILABLE while draining, or the port
closed: refused or reset at connect), not lost."""
HTTP_BAD = BAD | BUSY
"""A bad HTTP body: INVALID_ARGUMENT naming its field, or 429 when it arrives while the bodies in
progress fill ``http_body_budget_bytes`` - refused before it is read, so not yet known to be bad."""
LOST = {"HTTP_CONNECTION", "STREAM_CUT", "HTTP_500", "HTTP_502", "CANCELLED", "INTERNAL"}
"""How a call sent before SIGTERM ends when the drain dropped it: cut, reset or a 500. (A 503 /
UNAVAILABLE is an answer - the server is draining and has not started the request; retry
elsewhere - as gRPC answers new calls during its drain.)"""
CROWDED = {"UNAVAILABLE", "HTTP_REFUSED", "HTTP_CONNECTION"}
"""How a valid HTTP call may end while the slow phase holds ``http_max_connections`` full: 503
(only the probes are served past the bound), or its new connection closed as the oldest idle one
before its request was read (the bound evicts idle connections for new ones). Counted apart."""
HTTP_KINDS = ("valid_http_answer", "valid_chat", "valid_chat_stream")
HTTP_CODES = {200: OK, 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 413: "INVALID_ARGUMENT",
              429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
PHASES = ("unauthenticated", "slow", "max_body", "http_sigterm")


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def noise_png(max_bytes: int) -> bytes:
    """A PNG of random pixels just under ``max_bytes``: incompressible, so a maximal valid image."""
    from PIL import Image

    side = math.isqrt((max_bytes - 1024 * 1024) // 3)
    image = Image.frombytes("RGB", (side, side), random.Random(7).randbytes(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) <= max_bytes, len(buf.getvalue())
    return buf.getvalue()


def multipart(fields: dict[str, bytes], image: bytes) -> tuple[bytes, str]:
    boundary = "soakboundary42"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def chat_body(image: bytes, **fields: Any) -> dict[str, Any]:
    import base64

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": "p2r", "max_tokens": 8, "p2r": {"answer_form": "mca", "perceive": {"max_tokens": 8}},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Which? (A) red (B) blue"}]}],
            **fields}


def open_fds(pid: int) -> int:
    """Open file descriptors of the server's process tree (sockets included)."""
    from p2r.services.launch import descendants

    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


class Soak:
    def __init__(self, args: argparse.Namespace, model: Path, work: Path) -> None:
        self.args = args
        self.model = model
        self.work = work
        self.results: list[tuple[str, str, float, float]] = []
        """(kind, code, seconds, accepted_at): accepted_at is when the request was on the wire."""
        self.lock = threading.Lock()
        self.stop_at = 0.0
        self.http_only = threading.Event()
        self.phase = "mixed"
        self.max_rss: dict[str, int] = defaultdict(int)
        self.rss_samples = 0
        self.phases: dict[str, dict[str, Any]] = {}
        self.sigterm_at = math.inf
        self.windows: dict[str, tuple[float, float]] = {}
        self.started_at = time.monotonic()
        self.failure_samples: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ server

    def start(self) -> None:
        from p2r.services.config import ServeConfig
        from p2r.services.launch import start_server

        config = self.work / "serve.yaml"
        # The transport limits (image, batch, body, connections) stay at their defaults: the
        # unauthenticated and max-body phases are about what those defaults let through.
        config.write_text(f"""\
max_in_flight: {self.args.max_in_flight}
max_n: 8
max_question_chars: 40000
max_pixels: 262144
perceive_max_tokens: 16
reason_max_tokens: 16
grace_period_s: 30
api_key: {API_KEY}
admin_token: {ADMIN_TOKEN}
decoded_image_cache_bytes: {self.args.cache_budget_mib * 1024 * 1024}
limits:
  max_model_len: 2048
  max_num_seqs: 16
""")
        self.config = ServeConfig.load(config, roles=["gateway"], model=str(self.model))
        self.server = start_server(["perceiver", "reasoner", "verifier", "gateway", "--model", str(self.model),
                                    "--http-port", "0"], env={"P2R_CHECKPOINT_CACHE": str(self.work / "cache")},
                                   config=config, timeout=self.args.start_timeout_s)

    # ------------------------------------------------------------------------------ calls

    def http(self, path: str, body: bytes, content_type: str, *, stream: bool = False,
             key: str | None = API_KEY) -> tuple[str, float]:
        """POST and read the whole reply; (code, sent_at). A stream counts as answered only with
        its ``[DONE]``. ``HTTP_REFUSED``: the connection failed before the request was sent;
        ``HTTP_CONNECTION``: after it was, with no answer; ``STREAM_CUT``: the answer started and
        did not end (a stream without its ``[DONE]``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=120)
        sent_at, sent, answered = time.monotonic(), False, False
        try:
            conn.connect()
            conn.request("POST", path, body=body,
                         headers={"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})})
            sent_at, sent = time.monotonic(), True
            response = conn.getresponse()
            answered = True
            text = response.read()
        except (OSError, http.client.HTTPException) as e:
            code = ("STREAM_CUT" if answered else "HTTP_CONNECTION") if sent else "HTTP_REFUSED"
            self.sample_failure(path, code, sent_at, repr(e))
            return code, sent_at
        finally:
            conn.close()
        if response.status == 200 and stream and b"data: [DONE]" not in text:
            self.sample_failure(path, "STREAM_CUT", sent_at, text[-300:].decode(errors="replace"))
            return "STREAM_CUT", sent_at
        return HTTP_CODES.get(response.status, f"HTTP_{response.status}"), sent_at

    def sample_failure(self, path: str, code: str, accepted_at: float, detail: str) -> None:
        """Keep the first few cut or failed HTTP calls with what the client saw, to explain them."""
        with self.lock:
            if len(self.failure_samples) < 40:
                self.failure_samples.append({"path": path, "code": code, "phase": self.phase,
                                             "at_s": round(time.monotonic() - self.started_at, 1),
                                             "sent_before_sigterm": accepted_at < self.sigterm_at,
                                             "detail": detail})

    def build_calls(self) -> list[tuple[str, set[str], Callable[[], str | tuple[str, float] | None]]]:
        import grpc

        from p2r.services.client import Client
        from p2r.services.security import ClientCredentials
        from p2r.v1 import p2r_pb2 as pb

        target, admin = self.server.target, self.server.admin_target
        creds = ClientCredentials(api_key=API_KEY, admin_token=ADMIN_TOKEN)
        self.client = Client(target, timeout_s=120, credentials=creds, admin_target=admin)
        wrong = Client(target, timeout_s=30, credentials=ClientCredentials(api_key="wrong"))
        no_admin = Client(target, timeout_s=30, credentials=ClientCredentials(api_key=API_KEY), admin_target=admin)
        small = png(96, 64, 0)
        thin = png(4000, 10, 1)
        # ~100 KB files, 300 MB decoded each: the decoded-image cache must bound them by bytes.
        huge = [png(10_000, 10_000, 100 + i) for i in range(self.args.large_images)]
        rng = random.Random(0)
        long_question = "".join(rng.choice(string.ascii_letters + " .,") for _ in range(30_000))
        over_image = random.Random(1).randbytes(self.config.max_image_bytes + 1024 * 1024)
        big_lock = threading.Semaphore(2)  # two over-limit messages at a time: the client holds them too
        huge_counter = iter(range(10**9))

        def perceive(**sampling: Any) -> pb.PerceiveRequest:
            return pb.PerceiveRequest(image=small, question="Where is it?",
                                      sampling=pb.SamplingParams(**{"max_tokens": 8, **sampling}))

        def rpc(fn: Callable[[], Any]) -> str:
            try:
                fn()
            except grpc.RpcError as e:
                return e.code().name
            return OK

        raw_perceive = self.client.channel.unary_unary(
            "/p2r.v1.Perceiver/Perceive", request_serializer=lambda b: b,
            response_deserializer=pb.PerceiveResult.FromString)
        bad_utf8 = perceive().SerializeToString().replace(b"Where is it?", b"Where \xff\xfe it?")

        def over_limit_call() -> str | None:
            # Never wait for the slot: a worker that queued here would stop sending anything else.
            if not big_lock.acquire(blocking=False):
                return None
            try:
                return rpc(lambda: self.client.perceiver.Perceive(
                    pb.PerceiveRequest(image=over_image, question="q"), timeout=120))
            finally:
                big_lock.release()

        def body_over_limit() -> str:
            """Headers announcing a body over the limit: refused before the body is sent."""
            conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
            try:
                conn.putrequest("POST", "/v1/chat/completions")
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Authorization", f"Bearer {API_KEY}")
                conn.putheader("Content-Length", str(self.config.max_http_body_bytes + 1))
                conn.endheaders()
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException):
                return "HTTP_CONNECTION"
            finally:
                conn.close()
            return HTTP_CODES.get(status, f"HTTP_{status}")

        def chat(stream: bool = False, **fields: Any) -> Callable[[], tuple[str, float]]:
            raw = json.dumps(chat_body(small, stream=stream, **fields)).encode()
            return lambda: self.http("/v1/chat/completions", raw, "application/json", stream=stream)

        def chat_raw(raw: bytes) -> Callable[[], tuple[str, float]]:
            return lambda: self.http("/v1/chat/completions", raw, "application/json")

        deep = b'{"model": "p2r", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        surrogate = json.dumps(chat_body(small)).replace("Which?", "Which\\ud800?").encode()
        good_http = multipart({"question": b"What is it?"}, small)
        bad_http = multipart({"question": b"What \xff\xfe is it?"}, small)
        answer = pb.AnswerRequest(image=small, question="What is it?", answer_form=pb.ANSWER_FORM_MCA,
                                  perceive_sampling=pb.SamplingParams(max_tokens=8),
                                  reason_sampling=pb.SamplingParams(max_tokens=8))
        garbage_answer = pb.AnswerRequest(image=b"\x89PNG not really", question="What is it?",
                                          answer_form=pb.ANSWER_FORM_MCA)
        bad_reason_sampling = pb.AnswerRequest(image=small, question="What is it?", answer_form=pb.ANSWER_FORM_MCA,
                                               reason_sampling=pb.SamplingParams(temperature=math.nan))
        reason = pb.ReasonBatchRequest(requests=[pb.ReasonRequest(
            image=small, question="q", answer_form=pb.ANSWER_FORM_MCA,
            regions=[pb.Region(x1=10, y1=10, x2=500, y2=500)], sampling=pb.SamplingParams(max_tokens=8))] * 4)
        c = self.client
        return [
            ("valid_perceive", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(perceive()))),
            ("valid_reason_batch", BUSY, lambda: rpc(lambda: c.reasoner.ReasonBatch(reason))),
            ("valid_answer", BUSY, lambda: rpc(lambda: c.answer(answer))),
            ("valid_http_answer", BUSY, lambda: self.http("/v1/answer", *good_http)),
            ("valid_chat", BUSY, chat()),
            ("valid_chat_stream", BUSY, chat(stream=True)),
            ("nan_temperature", BAD, lambda: rpc(lambda: c.perceiver.Perceive(perceive(temperature=math.nan)))),
            ("inf_repetition_penalty", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(perceive(repetition_penalty=math.inf)))),
            ("zero_repetition_penalty", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(perceive(repetition_penalty=0.0)))),
            ("question_over_model_len", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=small, question=long_question)))),
            ("invalid_utf8_grpc", BAD, lambda: rpc(lambda: raw_perceive(bad_utf8, timeout=60))),
            ("invalid_utf8_http", HTTP_BAD, lambda: self.http("/v1/answer", *bad_http)),
            ("unknown_variant", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=small, question="q", variant=9)))),
            ("aspect_ratio", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=thin, question="q")))),
            ("n_1000", BAD, lambda: rpc(lambda: c.perceiver.Perceive(perceive(n=1000)))),
            ("batch_over_capacity", BAD, lambda: rpc(lambda: c.perceiver.PerceiveBatch(
                pb.PerceiveBatchRequest(requests=[perceive(n=8)] * 8)))),
            ("answer_garbage_image", BAD, lambda: rpc(lambda: c.answer(garbage_answer))),
            ("answer_nan_reason_sampling", BAD, lambda: rpc(lambda: c.answer(bad_reason_sampling))),
            ("chat_max_tokens_2_32", HTTP_BAD, chat(max_tokens=2**32)),
            ("chat_seed_over_int64", HTTP_BAD, chat(seed=2**64)),
            ("chat_perceive_seed_10_20", HTTP_BAD,
             chat(p2r={"answer_form": "mca", "perceive": {"max_tokens": 8, "seed": 10**20}})),
            ("chat_surrogate", HTTP_BAD, chat_raw(surrogate)),
            ("chat_deep_json", HTTP_BAD, chat_raw(deep)),
            ("chat_unsupported_stop", HTTP_BAD, chat(stop=["\n"])),
            ("max_tokens_huge", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(perceive(max_tokens=10**9)))),
            ("unary_over_limit", {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}, over_limit_call),
            ("body_over_limit", BAD, body_over_limit),
            ("large_pixels", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(
                image=huge[next(huge_counter) % len(huge)], question="q",
                sampling=pb.SamplingParams(max_tokens=1))))),
            ("wrong_api_key", {"UNAUTHENTICATED"}, lambda: rpc(lambda: wrong.perceiver.Perceive(perceive()))),
            ("admin_without_token", {"UNAUTHENTICATED"},
             lambda: rpc(lambda: no_admin.load_checkpoint(str(self.model), timeout_s=30))),
        ]

    # ------------------------------------------------------------------------------ phases

    def settle(self, name: str, started: float, extra: dict[str, Any]) -> None:
        """Close a phase: RSS and fds a few seconds after its last request."""
        time.sleep(self.args.settle_s)
        self.windows[name] = (started, time.monotonic())
        self.phases[name] = {"seconds": round(time.monotonic() - started, 1),
                             "rss_peak_mib": round(self.max_rss[name] / 2**20),
                             "rss_after_mib": round(self.server.rss() / 2**20),
                             "fds_after": open_fds(self.server.proc.pid), **extra}

    def in_phase(self, name: str, sent: float, ended: float) -> bool:
        """Whether a call that ran from ``sent`` to ``ended`` overlapped the phase ``name``."""
        start, end = self.windows.get(name, (math.inf, math.inf))
        return sent <= end and ended >= start

    def phase_unauthenticated(self, until: float) -> None:
        """Clients without a key send a near-limit batch message and a one-image unary message,
        over and over: each must be refused UNAUTHENTICATED, and nothing of it may stay."""
        import grpc

        from p2r.v1 import p2r_pb2 as pb

        started = time.monotonic()
        size = min(self.config.max_receive_bytes - 2**20, self.args.unauth_message_mib * 2**20)
        blob = random.Random(3).randbytes(self.config.max_image_bytes)
        items = max(1, size // (len(blob) + 64))
        batch = pb.PerceiveBatchRequest(requests=[pb.PerceiveRequest(image=blob, question="q")] * items
                                        ).SerializeToString()
        unary = pb.PerceiveRequest(image=blob, question="q").SerializeToString()
        del blob
        channel = grpc.insecure_channel(self.server.target, options=[("grpc.max_send_message_length", -1)])
        calls = [("unauth_batch", channel.unary_unary("/p2r.v1.Perceiver/PerceiveBatch",
                                                      request_serializer=lambda b: b), batch),
                 ("unauth_unary", channel.unary_unary("/p2r.v1.Perceiver/Perceive",
                                                      request_serializer=lambda b: b), unary)]

        def worker(i: int) -> None:
            k = i
            while time.monotonic() < until:
                kind, method, payload = calls[k % 2]
                k += 1
                t0 = time.perf_counter()
                try:
                    method(payload, timeout=120)
                    code = OK
                except grpc.RpcError as e:
                    code = e.code().name
                self.record(kind, code, time.perf_counter() - t0, time.monotonic())

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.args.unauth_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        channel.close()
        self.settle("unauthenticated", started, {"batch_message_mib": round(len(batch) / 2**20),
                                                 "unary_message_mib": round(len(unary) / 2**20)})

    def phase_slow(self, until: float) -> None:
        """Slow-loris: idle connections, headers a byte at a time, a body a byte at a time. The
        server must close each by its deadlines while ``/healthz`` answers; then its fds are back."""
        import selectors
        import socket

        started = time.monotonic()
        fds_before = open_fds(self.server.proc.pid)
        port = self.server.http_port
        body_head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n").encode()
        flavours = {"idle": b"", "slow_headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n", "slow_body": body_head}
        sel = selectors.DefaultSelector()
        opened: dict[socket.socket, tuple[str, float]] = {}
        closed_after: dict[str, list[float]] = defaultdict(list)
        refused = Counter[str]()
        names = list(flavours)
        for i in range(self.args.slow_connections):
            flavour = names[i % len(names)]
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(flavours[flavour])
            except OSError:
                refused[flavour] += 1
                continue
            sock.setblocking(False)
            opened[sock] = (flavour, time.monotonic())
            sel.register(sock, selectors.EVENT_READ)
        healthz: list[float] = []
        healthz_failed = 0
        next_drip = next_probe = time.monotonic()
        while time.monotonic() < until and opened:
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)  # type: ignore[attr-defined]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server (a 408/400 reply first is fine: read on)
                    flavour, t = opened.pop(sock)  # type: ignore[call-overload]
                    closed_after[flavour].append(time.monotonic() - t)
                    sel.unregister(sock)
                    sock.close()  # type: ignore[attr-defined]
            now = time.monotonic()
            if now >= next_drip:  # one more byte of header or body on each slow connection
                next_drip = now + self.args.drip_every_s
                for sock, (flavour, _) in list(opened.items()):
                    if flavour != "idle":
                        with contextlib.suppress(OSError):
                            sock.send(b"X" if flavour == "slow_headers" else b" ")
            if now >= next_probe:
                next_probe = now + 1.0
                t0 = time.perf_counter()
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/healthz")
                    ok = conn.getresponse().status == 200
                    conn.close()
                except (OSError, http.client.HTTPException):
                    ok = False
                seconds = time.perf_counter() - t0
                self.record("healthz_during_slow", OK if ok else "HTTP_CONNECTION", seconds, time.monotonic())
                if ok:
                    healthz.append(seconds)
                else:
                    healthz_failed += 1
        still_open = Counter(flavour for flavour, _ in opened.values())
        fds_peak = open_fds(self.server.proc.pid)
        for sock in opened:
            sock.close()
        sel.close()
        healthz.sort()
        self.settle("slow", started, {
            "connections": self.args.slow_connections, "refused_at_connect": dict(refused),
            "closed_by_server": {f: len(v) for f, v in closed_after.items()},
            "closed_after_s_median": {f: round(sorted(v)[len(v) // 2], 1) for f, v in closed_after.items() if v},
            "closed_after_s_max": {f: round(max(v), 1) for f, v in closed_after.items() if v},
            "still_open_at_end": dict(still_open), "fds_before": fds_before, "fds_while_open": fds_peak,
            "healthz_ok": len(healthz), "healthz_failed": healthz_failed,
            "healthz_p99_ms": round(healthz[min(len(healthz) - 1, int(0.99 * len(healthz)))] * 1000, 1)
            if healthz else None})

    def phase_max_body(self, until: float) -> None:
        """Concurrent chat requests each carrying the largest valid image: their bodies (about
        4/3 of ``max_image_bytes`` as data URLs) must stay inside the memory bound."""
        started = time.monotonic()
        raw = json.dumps(chat_body(noise_png(self.config.max_image_bytes))).encode()

        def worker() -> None:
            while time.monotonic() < until:
                t0 = time.perf_counter()
                code, accepted = self.http("/v1/chat/completions", raw, "application/json")
                self.record("max_body_chat", code, time.perf_counter() - t0, accepted)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.args.max_body_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.settle("max_body", started, {"body_mib": round(len(raw) / 2**20, 1),
                                          "clients": self.args.max_body_clients})

    # ------------------------------------------------------------------------------ run

    def record(self, kind: str, code: str, seconds: float, accepted_at: float) -> None:
        with self.lock:
            self.results.append((kind, code, seconds, accepted_at))

    def run(self) -> dict[str, Any]:
        calls = self.build_calls()
        http_kinds = [i for i, (kind, _, _) in enumerate(calls) if kind in HTTP_KINDS]
        expected = {kind: allowed for kind, allowed, _ in calls}
        expected |= {"unauth_batch": {"UNAUTHENTICATED"}, "unauth_unary": {"UNAUTHENTICATED"},
                     "healthz_during_slow": {OK}, "max_body_chat": BUSY, "reload": set()}
        baseline = self.server.rss()
        self.fds_baseline = open_fds(self.server.proc.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = self.server.rss()
                self.max_rss[self.phase] = max(self.max_rss[self.phase], rss)
                self.max_rss["all"] = max(self.max_rss["all"], rss)
                self.rss_samples += 1
                time.sleep(0.2)

        def worker(i: int) -> None:
            k = i
            while time.monotonic() < self.stop_at:
                index = http_kinds[k % len(http_kinds)] if self.http_only.is_set() else k % len(calls)
                kind, _, call = calls[index]
                k += 1
                sent, started = time.monotonic(), time.perf_counter()
                out = call()
                if out is None:  # the over-limit slots are taken: this turn goes to the next kind
                    continue
                code, accepted = out if isinstance(out, tuple) else (out, sent)  # gRPC: on the wire at once
                self.record(kind, code, time.perf_counter() - started, accepted)
                if code in GONE and sent >= self.sigterm_at:  # the server is going: stop knocking
                    return

        def reloader() -> None:
            import grpc

            while time.monotonic() < self.stop_at and not self.http_only.is_set():
                time.sleep(self.args.reload_every_s)
                sent, started = time.monotonic(), time.perf_counter()
                try:
                    self.client.load_checkpoint(str(self.model), timeout_s=300)
                    code = OK
                except grpc.RpcError as e:
                    code = e.code().name
                self.record("reload", code, time.perf_counter() - started, sent)

        start = self.started_at = time.monotonic()
        self.stop_at = start + self.args.duration_s
        threads = [threading.Thread(target=sample, daemon=True)]
        threads += [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.args.concurrency)]
        threads.append(threading.Thread(target=reloader, daemon=True))
        for t in threads:
            t.start()
        # The phases share the run: 10 % mixed load alone, then 20 % each for the first three on
        # top of it, the rest mixed again, and the last 10 % HTTP only, ended by SIGTERM.
        share = self.args.duration_s / 10
        for name, begin, length in (("unauthenticated", 1, 2), ("slow", 3, 2), ("max_body", 5, 2)):
            time.sleep(max(0.0, start + begin * share - time.monotonic()))
            self.phase = name
            getattr(self, f"phase_{name}")(start + (begin + length) * share)
            self.phase = "mixed"
        time.sleep(max(0.0, start + 9 * share - time.monotonic()))
        self.phase = "http_sigterm"
        self.http_only.set()
        time.sleep(max(0.0, self.stop_at - time.monotonic() - self.args.sigterm_before_end_s))
        self.sigterm_at = time.monotonic()
        self.server.proc.send_signal(signal.SIGTERM)
        for t in threads[1:]:
            t.join(timeout=600)
        exit_code = self.server.proc.wait(timeout=300)
        done.set()
        threads[0].join()
        return self.report(expected, baseline, exit_code)

    def report(self, expected: dict[str, set[str]], baseline: int, exit_code: int) -> dict[str, Any]:
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        unexpected: Counter[str] = Counter()
        lost: Counter[str] = Counter()
        refused_draining: Counter[str] = Counter()
        crowded: Counter[str] = Counter()
        valid_latency: list[float] = []
        may_pass = ("max_tokens_huge", "large_pixels", "reload", "max_body_chat")
        for kind, code, seconds, accepted_at in self.results:
            by_kind[kind][code] += 1
            allowed = expected[kind] | {OK} if kind.startswith("valid") or kind in may_pass else expected[kind]
            if accepted_at >= self.sigterm_at and code in GONE:  # sent after SIGTERM: refused
                continue
            if accepted_at < self.sigterm_at <= accepted_at + seconds and code == "UNAVAILABLE":
                refused_draining[kind] += 1  # sent before SIGTERM, read after it: 503 draining
                continue
            if code in CROWDED and kind in HTTP_KINDS and self.in_phase("slow", accepted_at, accepted_at + seconds):
                crowded[kind] += 1  # the slow phase holds the connection bound full
                continue
            if accepted_at < self.sigterm_at and seconds > 0 and code in LOST and \
                    accepted_at + seconds >= self.sigterm_at:  # accepted, then dropped by the drain
                lost[f"{kind}:{code}"] += 1
            elif code not in allowed:
                unexpected[f"{kind}:{code}"] += 1
            if kind.startswith("valid") and code == OK:
                valid_latency.append(seconds)
        valid_latency.sort()
        p99 = valid_latency[min(len(valid_latency) - 1, int(0.99 * len(valid_latency)))] if valid_latency else None
        failed = Counter(code for _, code, _, _ in self.results if code != OK)
        mib = 2**20
        bound = self.args.cache_budget_mib + self.args.rss_margin_mib
        rss_ok = all(p["rss_after_mib"] - baseline / mib <= bound for p in self.phases.values())
        return {
            "duration_s": self.args.duration_s, "concurrency": self.args.concurrency,
            "requests_sent": len(self.results), "failed_by_code": dict(failed),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "unexpected": dict(unexpected), "lost_on_sigterm": dict(lost),
            "refused_while_draining": dict(refused_draining), "crowded_out_in_slow_phase": dict(crowded),
            "p99_valid_ms": None if p99 is None else round(p99 * 1000, 1), "valid_ok": len(valid_latency),
            "rss_baseline_mib": round(baseline / mib), "rss_max_mib": round(self.max_rss["all"] / mib),
            "rss_max_by_phase_mib": {k: round(v / mib) for k, v in self.max_rss.items()},
            "rss_samples": self.rss_samples, "fds_baseline": self.fds_baseline, "phases": self.phases,
            "cache_budget_mib": self.args.cache_budget_mib, "rss_margin_mib": self.args.rss_margin_mib,
            "rss_within_budget": rss_ok and (self.max_rss["all"] - baseline) <= bound * mib,
            "server_exit_code": exit_code, "load_average": [round(x, 2) for x in os.getloadavg()],
            "http_failure_samples": self.failure_samples,
        }


def print_table(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['duration_s']} s, concurrency {r['concurrency']}, {r['requests_sent']} requests sent, "
          f"server exit code {r['server_exit_code']}")
    print(f"{'kind':<28} {'sent':>7}  codes")
    for kind, codes in r["by_kind"].items():
        print(f"{kind:<28} {sum(codes.values()):>7}  " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items())))
    print(f"failed by code: {r['failed_by_code']}")
    print(f"unexpected failures: {r['unexpected'] or 'none'}")
    print(f"requests lost on SIGTERM: {r['lost_on_sigterm'] or 'none'}; sent before it and answered 503 "
          f"(draining, not started): {r['refused_while_draining'] or 'none'}")
    print(f"valid HTTP calls crowded out while the slow phase held the connection bound: "
          f"{r['crowded_out_in_slow_phase'] or 'none'}")
    print(f"p99 of valid calls: {r['p99_valid_ms']} ms over {r['valid_ok']} OK")
    print(f"RSS (server + engine): baseline {r['rss_baseline_mib']} MiB, max {r['rss_max_mib']} MiB; "
          f"cache budget {r['cache_budget_mib']} MiB + margin {r['rss_margin_mib']} MiB: "
          f"{'within' if r['rss_within_budget'] else 'OVER'}")
    print(f"{'phase':<16} {'seconds':>8} {'RSS peak':>9} {'RSS after':>10} {'fds after':>10}  (fds at start "
          f"{r['fds_baseline']})")
    for name, p in r["phases"].items():
        print(f"{name:<16} {p['seconds']:>8} {p['rss_peak_mib']:>9} {p['rss_after_mib']:>10} {p['fds_after']:>10}")
    if "slow" in r["phases"]:
        s = r["phases"]["slow"]
        print(f"slow connections: {s['connections']} opened; closed by the server {s['closed_by_server']} after "
              f"median {s['closed_after_s_median']} s, max {s['closed_after_s_max']} s; still open at the end "
              f"{s['still_open_at_end'] or 'none'}; refused at connect {s['refused_at_connect'] or 'none'}; "
              f"fds {s['fds_before']} before, {s['fds_while_open']} while open, {s['fds_after']} after; "
              f"/healthz {s['healthz_ok']} OK, {s['healthz_failed']} failed, p99 {s['healthz_p99_ms']} ms")


def main() -> None:
    import resource

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--max-in-flight", type=int, default=32,
                        help="below 8 items x max_n 8, so an over-capacity batch exists")
    parser.add_argument("--reload-every-s", type=float, default=20.0)
    parser.add_argument("--sigterm-before-end-s", type=float, default=3.0)
    parser.add_argument("--settle-s", type=float, default=5.0, help="after a phase, before its RSS and fds")
    parser.add_argument("--cache-budget-mib", type=int, default=1024)
    parser.add_argument("--large-images", type=int, default=16, help="distinct 10,000 x 10,000 PNGs in the mix")
    parser.add_argument("--unauth-workers", type=int, default=8)
    parser.add_argument("--unauth-message-mib", type=int, default=256,
                        help="the unauthenticated batch message (capped below the server's receive limit)")
    parser.add_argument("--slow-connections", type=int, default=3000,
                        help="idle, slow-header and slow-body connections, a third each")
    parser.add_argument("--drip-every-s", type=float, default=2.0, help="one byte per slow connection this often")
    parser.add_argument("--max-body-clients", type=int, default=32)
    parser.add_argument("--rss-margin-mib", type=int, default=1536,
                        help="allowance above baseline + the decoded-image budget (which bounds every decoded "
                             "image, annotated copy and crop alive): the engine's 1 GiB CPU KV cache, resident "
                             "only once used (1024), received messages and bodies in flight (256), "
                             "model-side resizes in flight and allocator slack (256)")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a fresh tiny model)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the slow phase holds thousands of sockets
    with tempfile.TemporaryDirectory(prefix="p2r-soak-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from p2r.models.tiny import write_tiny_model

            model = write_tiny_model(work / "model")
        soak = Soak(args, model, work)
        soak.start()
        try:
            result = soak.run()
        finally:
            if soak.server.proc.poll() is None:
                soak.server.stop()
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

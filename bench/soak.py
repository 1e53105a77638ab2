"""Bounded soak of one real ``p2r serve`` (all roles on one engine) on loopback, as an attacker
and a busy trainer at once (issue 14).

``--concurrency`` clients (default 128) loop for ``--duration-s`` seconds over a mix of valid
calls (Perceive, ReasonBatch, Answer, HTTP /v1/answer), every bad input of issue 14 (non-finite
and vLLM-invalid sampling, a question longer than the model, invalid UTF-8 over gRPC and HTTP,
an unknown variant, an over-wide image, n over the cap, a batch over the admission capacity, a
message over the transport limit, an upload over the HTTP limit, large-pixel small-file PNGs,
wrong API key, Admin without its token), while one thread reloads the checkpoint through the
admin port every ``--reload-every-s`` seconds and another samples the server's RSS (its process
tree: the API server and the engine core). At the end the server gets one SIGTERM under load.

Every call has the set of codes it may end with (a bad input: INVALID_ARGUMENT naming its field;
overload: RESOURCE_EXHAUSTED); anything else is an *unexpected* failure. Prints requests sent,
failures by code, p99 latency of the valid calls and the maximum RSS against the decoded-image
cache budget plus ``--rss-margin-mib``; writes JSON (default bench/results/soak.json).

    .venv/bin/python bench/soak.py --duration-s 300          # the real run (the lead's)
    .venv/bin/python bench/soak.py --duration-s 20 --concurrency 16   # smoke
"""

from __future__ import annotations

import argparse
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


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def multipart(fields: dict[str, bytes], image: bytes) -> tuple[bytes, str]:
    boundary = "soakboundary42"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Soak:
    def __init__(self, args: argparse.Namespace, model: Path, work: Path) -> None:
        self.args = args
        self.model = model
        self.work = work
        self.results: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        self.stop_at = 0.0
        self.max_rss = 0
        self.rss_samples = 0

    # ------------------------------------------------------------------------------ server

    def start(self) -> None:
        from p2r.services.launch import start_server

        config = self.work / "serve.yaml"
        config.write_text(f"""\
max_in_flight: {self.args.max_in_flight}
max_batch_items: 8
max_n: 8
max_image_bytes: 2000000
max_image_pixels: 100000000
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
        self.server = start_server(["perceiver", "reasoner", "verifier", "gateway", "--model", str(self.model),
                                    "--http-port", "0"], env={"P2R_CHECKPOINT_CACHE": str(self.work / "cache")},
                                   config=config, timeout=self.args.start_timeout_s)

    # ------------------------------------------------------------------------------ calls

    def build_calls(self) -> list[tuple[str, set[str], Callable[[], str]]]:
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
        limit = self.client.status().max_receive_bytes
        blob = random.Random(1).randbytes(1_900_000)
        oversized = pb.PerceiveBatchRequest(
            requests=[pb.PerceiveRequest(image=blob, question="q")] * (limit // len(blob) + 2))
        big_lock = threading.Semaphore(1)  # one oversized message at a time: the client holds it too
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

        def http_post(body: bytes, content_type: str) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=120)
            try:
                conn.request("POST", "/v1/answer", body=body,
                             headers={"Content-Type": content_type, "Authorization": f"Bearer {API_KEY}"})
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException):
                return "HTTP_CONNECTION"
            finally:
                conn.close()
            return {200: OK, 400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                    503: "UNAVAILABLE"}.get(status, f"HTTP_{status}")

        def oversized_call() -> str | None:
            # Never wait for the slot: a worker that queued here would stop sending anything else,
            # and the soak's concurrency would collapse onto this one lock (seen: 89 of 128 workers).
            if not big_lock.acquire(blocking=False):
                return None
            try:
                return rpc(lambda: self.client.perceiver.PerceiveBatch(oversized, timeout=120))
            finally:
                big_lock.release()

        good_http = multipart({"question": b"What is it?"}, small)
        bad_http = multipart({"question": b"What \xff\xfe is it?"}, small)
        answer = pb.AnswerRequest(image=small, question="What is it?", answer_form=pb.ANSWER_FORM_MCA,
                                  perceive_sampling=pb.SamplingParams(max_tokens=8),
                                  reason_sampling=pb.SamplingParams(max_tokens=8))
        reason = pb.ReasonBatchRequest(requests=[pb.ReasonRequest(
            image=small, question="q", answer_form=pb.ANSWER_FORM_MCA,
            regions=[pb.Region(x1=10, y1=10, x2=500, y2=500)], sampling=pb.SamplingParams(max_tokens=8))] * 4)
        c = self.client
        return [
            ("valid_perceive", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(perceive()))),
            ("valid_reason_batch", BUSY, lambda: rpc(lambda: c.reasoner.ReasonBatch(reason))),
            ("valid_answer", BUSY, lambda: rpc(lambda: c.answer(answer))),
            ("valid_http_answer", BUSY, lambda: http_post(*good_http)),
            ("nan_temperature", BAD, lambda: rpc(lambda: c.perceiver.Perceive(perceive(temperature=math.nan)))),
            ("inf_repetition_penalty", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(perceive(repetition_penalty=math.inf)))),
            ("zero_repetition_penalty", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(perceive(repetition_penalty=0.0)))),
            ("question_over_model_len", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=small, question=long_question)))),
            ("invalid_utf8_grpc", BAD, lambda: rpc(lambda: raw_perceive(bad_utf8, timeout=60))),
            ("invalid_utf8_http", BAD, lambda: http_post(*bad_http)),
            ("unknown_variant", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=small, question="q", variant=9)))),
            ("aspect_ratio", BAD,
             lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(image=thin, question="q")))),
            ("n_1000", BAD, lambda: rpc(lambda: c.perceiver.Perceive(perceive(n=1000)))),
            ("batch_over_capacity", BAD, lambda: rpc(lambda: c.perceiver.PerceiveBatch(
                pb.PerceiveBatchRequest(requests=[perceive(n=8)] * 8)))),
            ("max_tokens_huge", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(perceive(max_tokens=10**9)))),
            ("oversized_message", BUSY, oversized_call),
            ("oversized_http", BAD, lambda: http_post(b"0" * (4 * 1024 * 1024), "multipart/form-data; boundary=x")),
            ("large_pixels", BUSY, lambda: rpc(lambda: c.perceiver.Perceive(pb.PerceiveRequest(
                image=huge[next(huge_counter) % len(huge)], question="q",
                sampling=pb.SamplingParams(max_tokens=1))))),
            ("wrong_api_key", {"UNAUTHENTICATED"}, lambda: rpc(lambda: wrong.perceiver.Perceive(perceive()))),
            ("admin_without_token", {"UNAUTHENTICATED"},
             lambda: rpc(lambda: no_admin.load_checkpoint(str(self.model), timeout_s=30))),
        ]

    # ------------------------------------------------------------------------------ run

    def record(self, kind: str, code: str, seconds: float) -> None:
        with self.lock:
            self.results.append((kind, code, seconds))

    def run(self) -> dict[str, Any]:
        calls = self.build_calls()
        expected = {kind: allowed for kind, allowed, _ in calls}
        baseline = self.server.rss()
        done = threading.Event()

        def sample_rss() -> None:
            while not done.is_set():
                self.max_rss = max(self.max_rss, self.server.rss())
                self.rss_samples += 1
                time.sleep(0.2)

        def worker(i: int) -> None:
            k = i
            while time.monotonic() < self.stop_at:
                kind, _, call = calls[k % len(calls)]
                k += 1
                started = time.perf_counter()
                code = call()
                if code is None:  # the one oversized slot is taken: this turn goes to the next kind
                    continue
                self.record(kind, code, time.perf_counter() - started)

        reloads: list[str] = []

        def reloader() -> None:
            import grpc

            while time.monotonic() < self.stop_at:
                time.sleep(self.args.reload_every_s)
                started = time.perf_counter()
                try:
                    self.client.load_checkpoint(str(self.model), timeout_s=300)
                    code = OK
                except grpc.RpcError as e:
                    code = e.code().name
                reloads.append(code)
                self.record("reload", code, time.perf_counter() - started)

        expected["reload"] = set()
        threads = [threading.Thread(target=sample_rss, daemon=True)]
        self.stop_at = time.monotonic() + self.args.duration_s
        threads += [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.args.concurrency)]
        threads.append(threading.Thread(target=reloader, daemon=True))
        for t in threads:
            t.start()
        # One SIGTERM at the end, under load: in-flight calls drain, later ones find the server gone.
        time.sleep(max(0.0, self.stop_at - time.monotonic() - self.args.sigterm_before_end_s))
        sigterm_at = len(self.results)
        self.server.proc.send_signal(signal.SIGTERM)
        for t in threads[1:]:
            t.join(timeout=600)
        exit_code = self.server.proc.wait(timeout=300)
        done.set()
        threads[0].join()
        return self.report(expected, baseline, sigterm_at, exit_code)

    def report(self, expected: dict[str, set[str]], baseline: int, sigterm_at: int, exit_code: int) -> dict[str, Any]:
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        unexpected: Counter[str] = Counter()
        valid_latency: list[float] = []
        for i, (kind, code, seconds) in enumerate(self.results):
            by_kind[kind][code] += 1
            after_sigterm = i >= sigterm_at
            allowed = expected[kind] | {OK} if kind.startswith("valid") or kind in ("max_tokens_huge", "large_pixels",
                                                                                     "reload") else expected[kind]
            if after_sigterm:  # draining or gone: refusals of new calls are expected
                allowed = allowed | {"UNAVAILABLE", "HTTP_CONNECTION", "CANCELLED"}
            if code not in allowed:
                unexpected[f"{kind}:{code}"] += 1
            if kind.startswith("valid") and code == OK:
                valid_latency.append(seconds)
        valid_latency.sort()
        p99 = valid_latency[min(len(valid_latency) - 1, int(0.99 * len(valid_latency)))] if valid_latency else None
        failed = Counter(code for _, code, _ in self.results if code != OK)
        mib = 1024 * 1024
        return {
            "duration_s": self.args.duration_s, "concurrency": self.args.concurrency,
            "requests_sent": len(self.results), "failed_by_code": dict(failed),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "unexpected": dict(unexpected), "p99_valid_ms": None if p99 is None else round(p99 * 1000, 1),
            "valid_ok": len(valid_latency),
            "rss_baseline_mib": round(baseline / mib), "rss_max_mib": round(self.max_rss / mib),
            "rss_samples": self.rss_samples,
            "cache_budget_mib": self.args.cache_budget_mib,
            "rss_margin_mib": self.args.rss_margin_mib,
            "rss_within_budget": (self.max_rss - baseline) <= (self.args.cache_budget_mib + self.args.rss_margin_mib)
            * mib,
            "server_exit_code": exit_code, "load_average": [round(x, 2) for x in os.getloadavg()],
        }


def print_table(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r['duration_s']} s, concurrency {r['concurrency']}, {r['requests_sent']} requests sent, "
          f"server exit code {r['server_exit_code']}")
    print(f"{'kind':<26} {'sent':>7}  codes")
    for kind, codes in r["by_kind"].items():
        print(f"{kind:<26} {sum(codes.values()):>7}  " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items())))
    print(f"failed by code: {r['failed_by_code']}")
    print(f"unexpected failures: {r['unexpected'] or 'none'}")
    print(f"p99 of valid calls: {r['p99_valid_ms']} ms over {r['valid_ok']} OK")
    print(f"RSS (server + engine): baseline {r['rss_baseline_mib']} MiB, max {r['rss_max_mib']} MiB; "
          f"cache budget {r['cache_budget_mib']} MiB + margin {r['rss_margin_mib']} MiB: "
          f"{'within' if r['rss_within_budget'] else 'OVER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--max-in-flight", type=int, default=32,
                        help="below max_batch_items x max_n (8 x 8), so an over-capacity batch exists")
    parser.add_argument("--reload-every-s", type=float, default=20.0)
    parser.add_argument("--sigterm-before-end-s", type=float, default=3.0)
    parser.add_argument("--cache-budget-mib", type=int, default=1024)
    parser.add_argument("--large-images", type=int, default=16, help="distinct 10,000 x 10,000 PNGs in the mix")
    parser.add_argument("--rss-margin-mib", type=int, default=1536,
                        help="allowance above baseline + the decoded-image budget (which bounds every decoded "
                             "image, annotated copy and crop alive): the engine's 1 GiB CPU KV cache, resident "
                             "only once used (1024), received messages of 128 clients with 2 MB images (256), "
                             "model-side resizes in flight and allocator slack (256)")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a fresh tiny model)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
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

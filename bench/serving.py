"""Serving benchmark: our gRPC services vs vLLM's offline engine vs vLLM's OpenAI HTTP server.

One run, same machine, same tiny model, same prompts, greedy decoding, the same engine limits
everywhere (``LIMITS``: max_model_len, max_num_seqs; on CPU ``services.engine.engine_kwargs``
turns chunked prefill off and sets max_num_batched_tokens = max_model_len for both of our
engines, and ``vllm serve`` gets the same flags). Paths:

  (a) offline - vLLM offline ``LLM.generate`` on the prepared reasoner prompts (and without the
                preparation time), and offline P2R: batched perceive then batched reason
                (``p2r.core.flow.run_p2r``)
  (b) ours    - ``p2r serve``: unary ``Reasoner.Reason`` and ``P2R.Answer`` at each concurrency
                level, and one ``ReasonBatch`` call; raw image bytes, evidence built server-side
  (c) openai  - ``vllm serve``'s OpenAI chat API with base64 JPEG images, one blocking request per
                sample (the reference implementation's path), and the same at concurrency 32; and
                streamed (``stream: true``) at each concurrency level, for its time to first token
  (d) ours, OpenAI-compatible - the gateway's own ``/v1/chat/completions`` (the whole P2R flow,
                the original image as a base64 PNG data URL), unary and streamed, and gRPC
                ``P2R.AnswerStream``, at each concurrency level

Time to first token (TTFT, the "ttft" column: median over requests, then median and min-max
over repeats) is measured on the streamed paths as request sent -> first reasoner text
received. On our paths it includes the whole perceiver stage (the regions come first), so it is
the wait a user of the P2R endpoint sees; on ``vllm serve`` it is one reasoner request whose
evidence the client already built.

The offline rows are not an upper bound: ``LLM.generate`` renders and processes the prompts
in the calling process while a server overlaps that with the engine (and our server prepares
images on worker threads), and offline P2R finishes every perceive before the first reason,
where the gateway pipelines them. So they are named "offline", and "vs offline" is a ratio,
not a fraction of a limit.

Equal engine state (``bench/_common.py``): all three engines are up for the whole run and each
was warmed up once; every measurement sends images its engine has never seen (a fresh variant
of the same samples), so no path gets vLLM's prefix or multimodal cache, or our decoded-image
cache, for free. Each path runs ``--repeats`` times interleaved (every path once, then again),
and the table shows the median with the min–max; "vs offline" pairs each repeat with the
offline measurement of the same repeat. An idle engine waits blocked (an idle offline engine
used 0.2 CPU-seconds in 10 s here), so the measured path has the CPU to itself; the load
average at the table's start is printed for the rest.

    .venv/bin/python bench/serving.py [--n 64] [--max-tokens 64] [--repeats 3] \
        [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import header, image_variants, load_average, repeats, spread, summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_PIXELS = 256 * 32 * 32
MAX_MODEL_LEN = 8192
MAX_NUM_SEQS = 32
LIMITS = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}
OFFLINE_REASON = "offline engine: LLM.generate, same reason prompts"
OFFLINE_PREP = "offline, incl. decode + evidence + resize (serial)"
OFFLINE_P2R = "offline P2R (perceive batch, then reason batch)"


@dataclass(frozen=True)
class Timing:
    """One measurement of one path: wall seconds, per-request latencies, generated tokens."""

    wall: float
    latencies: list[float]
    tokens: int
    ttfts: list[float] = field(default_factory=list)
    """Per request, seconds to the first reasoner text (streamed paths only)."""


Measure = Callable[[list[Any]], dict[str, Timing]]
"""Runs a path on a list of samples; one Timing per table row it produces."""


@dataclass(frozen=True)
class PathSpec:
    engine: str  # which engine serves it: a variant is fresh only per engine
    measure: Measure
    vs: str  # the offline row it is compared with


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn: Callable[[Any], tuple[float, ...]], items: list[Any], concurrency: int) -> Timing:
    """Run ``fn`` (returning latency, tokens[, time to first token]) over items with
    ``concurrency`` workers."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(fn, items))
    return Timing(time.perf_counter() - started, [r[0] for r in results], int(sum(r[1] for r in results)),
                  [r[2] for r in results if len(r) > 2])


def _sse(resp: Any) -> Any:
    """The JSON events of an OpenAI-format server-sent event stream, until ``[DONE]``."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chat_stream(url: str, body: dict[str, Any]) -> tuple[float, int, float]:
    """One streamed chat completion: latency, completion tokens (from the usage chunk), TTFT."""
    t = time.perf_counter()
    ttft = None
    tokens = 0
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        for chunk in _sse(resp):
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t
    return latency, tokens, latency if ttft is None else ttft


def _gt_regions(sample: Any) -> list[Any]:
    from p2r.core.bbox import Region

    return [Region(*b, label="gt") for b in sample.gt_bboxes]


class Offline:
    """vLLM's offline engine in this process, with the servers' limits."""

    def __init__(self, model: Path, max_tokens: int) -> None:
        from p2r.core.generation import Sampling
        from p2r.core.images import MIN_PIXELS, PixelBounds
        from p2r.services.engine import EngineLimits, OfflineEngine

        self.bounds = PixelBounds(MIN_PIXELS, MAX_PIXELS)
        self.engine = OfflineEngine(str(model), EngineLimits(**LIMITS))
        self.sampling = Sampling(max_tokens=max_tokens)
        self.tokenizer = self.engine.renderer.tokenizer

    def tokens(self, *texts: str) -> int:
        return sum(len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    def reason(self, samples: list[Any]) -> dict[str, Timing]:
        from p2r.core.evidence import build_evidence
        from p2r.core.flow import reasoner_request

        started = time.perf_counter()
        requests = [reasoner_request(build_evidence(s.load_image(), _gt_regions(s)), s.question, s.form, self.bounds)
                    for s in samples]
        prep = time.perf_counter() - started
        started = time.perf_counter()
        outs = self.engine.generate(requests, self.sampling)
        wall = time.perf_counter() - started
        tokens = self.tokens(*(o[0] for o in outs))
        return {OFFLINE_REASON: Timing(wall, [], tokens), OFFLINE_PREP: Timing(wall + prep, [], tokens)}

    def p2r(self, samples: list[Any]) -> dict[str, Timing]:
        from p2r.core.flow import P2RConfig, Question, run_p2r

        questions = [Question(s.load_image(), s.question, s.form) for s in samples]
        config = P2RConfig(bounds=self.bounds, perceive=self.sampling, reason=self.sampling)
        started = time.perf_counter()
        results = run_p2r(questions, self.engine, self.engine, config)
        wall = time.perf_counter() - started
        return {OFFLINE_P2R: Timing(wall, [], self.tokens(*(t for r in results
                                                             for t in (r.perceiver_output, r.reasoner_output))))}


class Ours:
    """``p2r serve reasoner perceiver gateway`` with the same limits, over gRPC."""

    def __init__(self, model: Path, tmp: Path, max_tokens: int, tokens: Callable[..., int], n: int) -> None:
        from p2r.services.client import Client
        from p2r.services.launch import start_server
        from p2r.v1 import p2r_pb2 as pb

        # ReasonBatch sends all ``n`` samples in one call and every request asks one completion
        # (sampling.n = 1, under max_n), so the batch and admission limits follow ``--n``: any
        # ``--n`` runs, not only up to the server's default max_batch_items.
        config = tmp / "serve.yaml"
        config.write_text(json.dumps({"max_pixels": MAX_PIXELS, "max_in_flight": max(4096, n),
                                      "max_batch_items": n, "limits": LIMITS}))
        self.server = start_server(["reasoner", "perceiver", "gateway", "--model", str(model), "--http-port", "0"],
                                   config=config, env=ENV)
        self.chat_url = f"http://127.0.0.1:{self.server.http_port}/v1/chat/completions"
        self.max_tokens = max_tokens
        self.client = Client(self.server.target, timeout_s=600)
        self.client.wait_ready()
        self.params = pb.SamplingParams(max_tokens=max_tokens)
        self.tokens = tokens

    def close(self) -> None:
        self.server.stop()

    def reason_requests(self, samples: list[Any]) -> list[Any]:
        from p2r.services.protocol import FORM_TO_PB
        from p2r.v1 import p2r_pb2 as pb

        return [pb.ReasonRequest(image=s.images[0].data, question=s.question, answer_form=FORM_TO_PB[s.form],
                                 regions=[pb.Region(x1=r.x1, y1=r.y1, x2=r.x2, y2=r.y2, label="gt")
                                          for r in _gt_regions(s)], sampling=self.params)
                for s in samples]

    def one_reason(self, req: Any) -> tuple[float, int]:
        t = time.perf_counter()
        r = self.client.reasoner.Reason(req, timeout=600)
        return time.perf_counter() - t, r.completions[0].num_tokens

    def one_answer(self, req: Any) -> tuple[float, int]:
        t = time.perf_counter()
        r = self.client.answer(req)
        return time.perf_counter() - t, self.tokens(r.perceiver_output, r.reasoner_output)

    def reason(self, concurrency: int) -> Measure:
        name = f"ours gRPC Reason, concurrency {concurrency}"
        return lambda samples: {name: _timed(self.one_reason, self.reason_requests(samples), concurrency)}

    def reason_batch(self, samples: list[Any]) -> dict[str, Timing]:
        requests = self.reason_requests(samples)
        started = time.perf_counter()
        results = self.client.reason_batch(requests)
        wall = time.perf_counter() - started
        return {f"ours gRPC ReasonBatch ({len(requests)} items, 1 call)":
                Timing(wall, [wall], sum(r.completions[0].num_tokens for r in results))}

    def answer(self, concurrency: int) -> Measure:
        from p2r.v1 import p2r_pb2 as pb

        def measure(samples: list[Any]) -> dict[str, Timing]:
            requests = [pb.AnswerRequest(image=r.image, question=r.question, answer_form=r.answer_form,
                                         perceive_sampling=self.params, reason_sampling=self.params)
                        for r in self.reason_requests(samples)]
            return {f"ours gRPC P2R.Answer, concurrency {concurrency}": _timed(self.one_answer, requests, concurrency)}

        return measure

    def answer_requests(self, samples: list[Any]) -> list[Any]:
        from p2r.v1 import p2r_pb2 as pb

        return [pb.AnswerRequest(image=r.image, question=r.question, answer_form=r.answer_form,
                                 perceive_sampling=self.params, reason_sampling=self.params)
                for r in self.reason_requests(samples)]

    def one_answer_stream(self, req: Any) -> tuple[float, int, float]:
        t = time.perf_counter()
        ttft = None
        for event in self.client.answer_stream(req):
            if ttft is None and event.WhichOneof("event") == "delta":
                ttft = time.perf_counter() - t
            if event.WhichOneof("event") == "response":
                u = event.response.usage
                tokens = u.perceive_completion_tokens + u.reason_completion_tokens
        latency = time.perf_counter() - t
        return latency, tokens, latency if ttft is None else ttft

    def answer_stream(self, concurrency: int) -> Measure:
        name = f"ours gRPC P2R.AnswerStream, concurrency {concurrency}"
        return lambda samples: {name: _timed(self.one_answer_stream, self.answer_requests(samples), concurrency)}

    def chat_body(self, req: Any) -> dict[str, Any]:
        from p2r.services.protocol import FORM_FROM_PB

        url = "data:image/png;base64," + base64.b64encode(req.image).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": req.question}]
        return {"model": "p2r", "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": content}],
                "p2r": {"answer_form": FORM_FROM_PB[req.answer_form].value, "timeout_s": 600,
                        "perceive": {"temperature": 0, "max_tokens": self.max_tokens}}}

    def one_chat(self, req: Any) -> tuple[float, int]:
        t = time.perf_counter()
        http = urllib.request.Request(self.chat_url, data=json.dumps(self.chat_body(req)).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(http, timeout=600) as resp:
            usage = json.loads(resp.read())["usage"]
        return time.perf_counter() - t, usage["completion_tokens"]

    def chat(self, concurrency: int, stream: bool) -> Measure:
        name = f"ours OpenAI-compatible P2R{' stream' if stream else ''}, concurrency {concurrency}"
        one = (lambda r: _chat_stream(self.chat_url, self.chat_body(r))) if stream else self.one_chat
        return lambda samples: {name: _timed(one, self.answer_requests(samples), concurrency)}


class OpenAI:
    """``vllm serve``'s OpenAI server, images as base64 JPEG data URLs, evidence built client-side."""

    def __init__(self, model: Path, max_tokens: int) -> None:
        from p2r.core.images import MIN_PIXELS, PixelBounds

        self.model, self.max_tokens = model, max_tokens
        self.bounds = PixelBounds(MIN_PIXELS, MAX_PIXELS)
        self.port = _free_port()
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN),
                "--max-num-seqs", str(MAX_NUM_SEQS), "--limit-mm-per-prompt", '{"image": 4}', "--enforce-eager",
                "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(MAX_MODEL_LEN), "--seed", "0"]
        env = {**os.environ, **ENV, "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("vllm serve did not start") from None
                time.sleep(1)

    def close(self) -> None:
        from p2r.services.launch import stop_process

        stop_process(self.proc)

    def body(self, sample: Any) -> bytes:
        """What the reference client does per sample: decode, build evidence, resize,
        JPEG-encode and base64 every image into the JSON body."""
        from p2r.core import prompts
        from p2r.core.evidence import build_evidence
        from p2r.core.images import resize_for_model

        ev = build_evidence(sample.load_image(), _gt_regions(sample))
        content: list[dict[str, Any]] = []
        for im in ev.images:
            buf = io.BytesIO()
            resize_for_model(im, self.bounds).save(buf, format="JPEG", quality=95)
            content.append({"type": "image_url", "image_url": {
                "url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}})
        content.append({"type": "text", "text": prompts.reasoner_text(sample.question, sample.form,
                                                                      with_evidence=ev.with_evidence)})
        return json.dumps({"model": str(self.model), "temperature": 0, "max_tokens": self.max_tokens, "messages": [
            {"role": "system", "content": prompts.SYSTEM_PROMPT}, {"role": "user", "content": content}]}).encode()

    def one(self, sample: Any) -> tuple[float, int]:
        t = time.perf_counter()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=self.body(sample),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            usage = json.loads(resp.read())["usage"]
        return time.perf_counter() - t, usage["completion_tokens"]

    def measure(self, concurrency: int) -> Measure:
        label = "one blocking request per sample" if concurrency == 1 else f"concurrency {concurrency}"
        name = f"vLLM OpenAI HTTP + base64 JPEG, {label}"
        return lambda samples: {name: _timed(self.one, samples, concurrency)}

    def measure_stream(self, concurrency: int) -> Measure:
        name = f"vLLM OpenAI HTTP + base64 JPEG stream, concurrency {concurrency}"
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        return lambda samples: {name: _timed(lambda s: _chat_stream(url, json.loads(self.body(s))), samples,
                                             concurrency)}


def row(name: str, timings: list[Timing], baseline: list[Timing], n: int) -> dict[str, Any]:
    """One table row: per-repeat values and their median / min / max; "vs offline" pairs
    repeat r with the offline measurement of repeat r."""
    rps = [n / t.wall for t in timings]
    lat = [sorted(t.latencies) for t in timings if t.latencies]
    return {
        "path": name, "requests": n, "repeats": len(timings),
        "seconds": summary([t.wall for t in timings]), "req_per_s": summary(rps),
        "p50_ms": summary([1000 * statistics.median(v) for v in lat], 1) if lat else None,
        "p99_ms": summary([1000 * v[min(len(v) - 1, int(0.99 * len(v)))] for v in lat], 1) if lat else None,
        "generated_tokens": summary([t.tokens for t in timings], 0),
        "ttft_ms": summary([1000 * statistics.median(t.ttfts) for t in timings], 1)
        if all(t.ttfts for t in timings) else None,
        "vs_offline": summary([r * b.wall / n for r, b in zip(rps, baseline, strict=True)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--repeats", type=repeats, default=3, help="measurements per path (at least 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    os.environ.update(ENV)

    from p2r.data.dataset import load_samples, write_synthetic
    from p2r.models.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        model = write_tiny_model(tmp / "model")
        base = load_samples(write_synthetic(tmp / "data", args.n))
        offline = Offline(model, args.max_tokens)
        ours = Ours(model, tmp, args.max_tokens, offline.tokens, args.n)
        stack.callback(ours.close)
        openai = OpenAI(model, args.max_tokens)
        stack.callback(openai.close)
        paths = [PathSpec("offline", offline.reason, OFFLINE_REASON), PathSpec("offline", offline.p2r, OFFLINE_P2R)]
        paths += [PathSpec("ours", ours.reason(c), OFFLINE_REASON) for c in levels]
        paths += [PathSpec("ours", ours.reason_batch, OFFLINE_REASON)]
        paths += [PathSpec("ours", ours.answer(c), OFFLINE_P2R) for c in levels]
        paths += [PathSpec("openai", openai.measure(c), OFFLINE_REASON) for c in (1, 32)]
        # The streamed and OpenAI-compatible paths, ours beside vllm serve's at each level, interleaved.
        for c in levels:
            paths += [PathSpec("ours", ours.chat(c, stream=False), OFFLINE_P2R),
                      PathSpec("ours", ours.chat(c, stream=True), OFFLINE_P2R),
                      PathSpec("ours", ours.answer_stream(c), OFFLINE_P2R),
                      PathSpec("openai", openai.measure_stream(c), OFFLINE_REASON)]
        per_engine = max(sum(p.engine == e for p in paths) for e in {p.engine for p in paths})
        variants = image_variants(base, 1 + args.repeats * per_engine)
        # Warm-up on variant 0, never measured: every engine starts the first repeat in the same state.
        for p in paths:
            p.measure(variants[0][:2])
        load = load_average()
        timings: dict[str, list[Timing]] = {}
        vs: dict[str, str] = {}
        for r in range(args.repeats):
            used: dict[str, int] = {}
            for p in paths:
                used[p.engine] = used.get(p.engine, 0) + 1
                for name, timing in p.measure(variants[r * per_engine + used[p.engine]]).items():
                    timings.setdefault(name, []).append(timing)
                    vs[name] = p.vs
        load_end = load_average()
    rows = [row(name, ts, timings[vs[name]], args.n) for name, ts in timings.items()]
    print(header(f"serving benchmark: tiny Qwen3-VL, {args.n} requests per measurement, max_tokens "
                 f"{args.max_tokens}, greedy, max_pixels {MAX_PIXELS}", args.repeats, load))
    cols = (f"{'path':64} {'req/s':>20} {'p50 ms':>9} {'p99 ms':>9} {'ttft ms':>24} {'tokens':>7} "
            f"{'vs offline':>19}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        p50, p99 = (f"{r[k]['median']:.1f}" if r[k] else "-" for k in ("p50_ms", "p99_ms"))
        ttft = spread(r["ttft_ms"], 1) if r["ttft_ms"] else "-"
        print(f"{r['path']:64} {spread(r['req_per_s']):>20} {p50:>9} {p99:>9} {ttft:>24} "
              f"{r['generated_tokens']['median']:>7.0f} {spread(r['vs_offline']):>19}")
    print(f"\nvs offline: req/s over the same repeat's {OFFLINE_REASON!r} ({OFFLINE_P2R!r} for P2R.Answer); "
          f"load average at end {load_end}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "n": args.n, "max_tokens": args.max_tokens, "max_pixels": MAX_PIXELS, "repeats": args.repeats,
        "order": list(timings), "load_average_start": load, "load_average_end": load_end,
        "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

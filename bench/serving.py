"""Serving benchmark: our gRPC services vs the offline-engine limit vs vLLM's OpenAI HTTP server.

One run, same machine, same tiny model, same prompts, greedy decoding (so every path generates
the same tokens), one engine at a time (no CPU contention between them):

  (a) limit   - vLLM offline ``LLM.generate`` on the prepared reasoner prompts (and a P2R limit:
                batched perceive then batched reason, ``p2r.core.flow.run_p2r``)
  (b) ours    - ``p2r serve``: unary ``Reasoner.Reason`` and ``P2R.Answer`` at concurrency 1, 8,
                32, and one ``ReasonBatch`` call; raw image bytes, evidence built server-side
  (c) openai  - ``vllm serve``'s OpenAI chat API with base64 JPEG images, one blocking request per
                sample (the reference implementation's path), and the same at concurrency 32

Prints a table (requests/s, p50/p99 latency, ratio to the matching limit) and writes JSON.

    .venv/bin/python bench/serving.py [--n 64] [--max-tokens 64] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import base64
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_PIXELS = 256 * 32 * 32
MAX_MODEL_LEN = 8192
MAX_NUM_SEQS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(name: str, n: int, wall: float, latencies: list[float], tokens: int, limit: float | None) -> dict[str, Any]:
    rps = n / wall
    lat = sorted(latencies)
    return {
        "path": name, "requests": n, "seconds": round(wall, 3), "req_per_s": round(rps, 3),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "generated_tokens": tokens, "ratio_to_limit": round(rps / limit, 3) if limit else None,
    }


def _timed(
    fn: Callable[[Any], tuple[float, int]], items: list[Any], concurrency: int
) -> tuple[float, list[float], int]:
    """Run ``fn`` over items with ``concurrency`` workers; returns wall time, latencies, tokens."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(fn, items))
    return time.perf_counter() - started, [r[0] for r in results], sum(r[1] for r in results)


def workload(n: int, tmp: Path) -> tuple[Path, list[Any]]:
    """The tiny model and n synthetic questions with their ground-truth boxes as the regions."""
    from p2r.data.dataset import load_samples, write_synthetic
    from p2r.models.tiny import write_tiny_model

    model = write_tiny_model(tmp / "model")
    # Distinct images: no path gets vLLM's multimodal cache or our decode cache for free.
    return model, load_samples(write_synthetic(tmp / "data", n))


def bench_offline(model: Path, samples: list[Any], max_tokens: int) -> dict[str, Any]:
    from p2r.core.bbox import Region
    from p2r.core.evidence import build_evidence
    from p2r.core.flow import P2RConfig, Question, reasoner_request, run_p2r
    from p2r.core.generation import Sampling
    from p2r.core.images import MIN_PIXELS, PixelBounds
    from p2r.services.engine import EngineLimits, OfflineEngine

    bounds = PixelBounds(MIN_PIXELS, MAX_PIXELS)
    engine = OfflineEngine(str(model), EngineLimits(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS))
    sampling = Sampling(max_tokens=max_tokens)
    started = time.perf_counter()
    images = [s.load_image() for s in samples]
    requests = [
        reasoner_request(build_evidence(im, [Region(*b, label="gt") for b in s.gt_bboxes]), s.question, s.form,
                         bounds)
        for s, im in zip(samples, images, strict=True)
    ]
    prep_wall = time.perf_counter() - started
    engine.generate(requests[:2], sampling)  # warm-up
    started = time.perf_counter()
    outs = engine.generate(requests, sampling)
    reason_wall = time.perf_counter() - started
    tokenizer = engine.renderer.tokenizer
    reason_tokens = sum(len(tokenizer.encode(o[0], add_special_tokens=False)) for o in outs)
    questions = [Question(im, s.question, s.form) for s, im in zip(samples, images, strict=True)]
    config = P2RConfig(bounds=bounds, perceive=sampling, reason=sampling)
    started = time.perf_counter()
    run_p2r(questions, engine, engine, config)
    p2r_wall = time.perf_counter() - started
    del engine
    return {"reason": (reason_wall, reason_tokens), "prep": prep_wall, "p2r": p2r_wall}


def start_ours(model: Path, tmp: Path) -> tuple[Any, str]:
    from p2r.services.launch import start_server

    config = tmp / "serve.yaml"
    config.write_text(json.dumps({
        "max_pixels": MAX_PIXELS, "max_in_flight": 4096, "limits": {"max_model_len": MAX_MODEL_LEN,
                                                                    "max_num_seqs": MAX_NUM_SEQS}}))
    server = start_server(["reasoner", "perceiver", "gateway", "--model", str(model)], config=config,
                          env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    return server, server.target


def bench_ours(model: Path, samples: list[Any], max_tokens: int, tmp: Path, limits: dict[str, float],
               levels: list[int]) -> list[dict[str, Any]]:
    from p2r.services.client import Client
    from p2r.services.handlers import FORM_TO_PB
    from p2r.v1 import p2r_pb2 as pb

    server, target = start_ours(model, tmp)
    rows = []
    try:
        client = Client(target, timeout_s=600)
        client.wait_ready()
        params = pb.SamplingParams(max_tokens=max_tokens)
        reason = [
            pb.ReasonRequest(image=s.images[0].path.read_bytes(), question=s.question, answer_form=FORM_TO_PB[s.form],
                             regions=[pb.Region(x1=b[0], y1=b[1], x2=b[2], y2=b[3], label="gt") for b in s.gt_bboxes],
                             sampling=params)
            for s in samples
        ]
        answer = [pb.AnswerRequest(image=r.image, question=r.question, answer_form=r.answer_form,
                                   perceive_sampling=params, reason_sampling=params) for r in reason]
        client.reasoner.Reason(reason[0], timeout=600)  # warm-up

        def one_reason(req: Any) -> tuple[float, int]:
            t = time.perf_counter()
            r = client.reasoner.Reason(req, timeout=600)
            return time.perf_counter() - t, r.completions[0].num_tokens

        def one_answer(req: Any) -> tuple[float, int]:
            t = time.perf_counter()
            client.answer(req)
            return time.perf_counter() - t, 0

        for c in levels:
            wall, lat, tokens = _timed(one_reason, reason, c)
            rows.append(_row(f"ours gRPC Reason, concurrency {c}", len(reason), wall, lat, tokens, limits["reason"]))
        started = time.perf_counter()
        results = client.reason_batch(reason)
        wall = time.perf_counter() - started
        rows.append(_row(f"ours gRPC ReasonBatch ({len(reason)} items, 1 call)", len(reason), wall, [wall],
                         sum(r.completions[0].num_tokens for r in results), limits["reason"]))
        for c in levels:
            wall, lat, _ = _timed(one_answer, answer, c)
            rows.append(_row(f"ours gRPC P2R.Answer, concurrency {c}", len(answer), wall, lat, 0, limits["p2r"]))
    finally:
        server.stop()
    return rows


def bench_openai(model: Path, samples: list[Any], max_tokens: int, limit: float) -> list[dict[str, Any]]:
    """vLLM's OpenAI server, images as base64 JPEG data URLs, evidence built client-side."""
    from p2r.core import prompts
    from p2r.core.bbox import Region
    from p2r.core.evidence import build_evidence
    from p2r.core.images import MIN_PIXELS, PixelBounds, resize_for_model
    from p2r.services.launch import stop_process

    port = _free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--limit-mm-per-prompt", '{"image": 4}', "--enforce-eager",
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    bounds = PixelBounds(MIN_PIXELS, MAX_PIXELS)
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vllm serve did not start") from None
                time.sleep(1)

        def body(sample: Any) -> bytes:
            # What the reference client does per sample: decode, build evidence, resize,
            # JPEG-encode and base64 every image into the JSON body.
            image = sample.load_image()
            ev = build_evidence(image, [Region(*b, label="gt") for b in sample.gt_bboxes])
            content: list[dict[str, Any]] = []
            for im in ev.images:
                buf = io.BytesIO()
                resize_for_model(im, bounds).save(buf, format="JPEG", quality=95)
                content.append({"type": "image_url", "image_url": {
                    "url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}})
            text = prompts.reasoner_text(sample.question, sample.form, with_evidence=ev.with_evidence)
            content.append({"type": "text", "text": text})
            return json.dumps({"model": str(model), "temperature": 0, "max_tokens": max_tokens, "messages": [
                {"role": "system", "content": prompts.SYSTEM_PROMPT}, {"role": "user", "content": content}]}).encode()

        def one(sample: Any) -> tuple[float, int]:
            t = time.perf_counter()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body(sample),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as resp:
                usage = json.loads(resp.read())["usage"]
            return time.perf_counter() - t, usage["completion_tokens"]

        one(samples[0])  # warm-up
        for c in (1, 32):
            wall, lat, tokens = _timed(one, samples, c)
            label = "one blocking request per sample" if c == 1 else "concurrency 32"
            rows.append(_row(f"vLLM OpenAI HTTP + base64 JPEG, {label}", len(samples), wall, lat, tokens, limit))
    finally:
        stop_process(proc)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, samples = workload(args.n, tmp)
        offline = bench_offline(model, samples, args.max_tokens)
        reason_wall, reason_tokens = offline["reason"]
        limits = {"reason": args.n / reason_wall, "p2r": args.n / offline["p2r"]}
        rows = [
            _row("limit: vLLM offline generate (reason prompts)", args.n, reason_wall, [], reason_tokens,
                 limits["reason"]),
            _row("offline, incl. decode + evidence + resize (serial)", args.n, reason_wall + offline["prep"], [],
                 reason_tokens, limits["reason"]),
            _row("limit: offline P2R (perceive batch + reason batch)", args.n, offline["p2r"], [], 0, limits["p2r"]),
        ]
        rows += bench_ours(model, samples, args.max_tokens, tmp, limits, levels)
        rows += bench_openai(model, samples, args.max_tokens, limits["reason"])
    print(f"\nserving benchmark: tiny Qwen3-VL, {args.n} requests, max_tokens {args.max_tokens}, greedy, "
          f"max_pixels {MAX_PIXELS}, {os.cpu_count()} CPU cores\n")
    header = f"{'path':58} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'tokens':>7} {'vs limit':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
        print(f"{r['path']:58} {r['req_per_s']:>8} {fmt(r['p50_ms']):>9} {fmt(r['p99_ms']):>9} "
              f"{r['generated_tokens']:>7} {fmt(r['ratio_to_limit']):>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "max_tokens": args.max_tokens, "max_pixels": MAX_PIXELS,
                                    "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

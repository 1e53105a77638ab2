"""Evaluation benchmark: samples/s in one process vs Ray Data with N workers, and the p2r-mode
overhead vs default mode, in one run on the same machine and model.

The model is the tiny Qwen3-VL with init std 0.2 (its replies depend on the input, and it never
stops early, so every request spends its whole token budget: the reference budgets, 16 tokens in
default mode and 256 + 1,024 in p2r mode, are the work being timed). Images are the synthetic
≥2048-px canvases resized to ``--max-pixels`` (65,536 here instead of 4,194,304: a 2-core CPU).
Wall time includes engine start-up; "steady" throughput counts from the first finished chunk.

    .venv/bin/python bench/eval.py [--samples 16] [--workers 2] [--out bench/results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(samples: list[Any], spec: Any, mode: str, out: Path, batch: int, workers: int) -> dict[str, Any]:
    from dataclasses import replace

    from p2r.eval.runner import evaluate, spec_meta

    marks: list[float] = []
    spec = replace(spec, settings=replace(spec.settings, mode=mode))
    started = time.perf_counter()
    summary = evaluate(samples, spec, {mode: out}, spec_meta(spec, "synthetic"), batch_size=batch,
                       ray_workers=workers, progress=lambda done, total: marks.append(time.perf_counter()))[mode]
    wall = time.perf_counter() - started
    first_chunk = batch if len(marks) > 1 else 0
    steady = (len(samples) - first_chunk) / (marks[-1] - marks[0]) if len(marks) > 1 else None
    return {"mode": mode, "workers": workers, "samples": len(samples), "wall_s": round(wall, 2),
            "samples_per_s": round(len(samples) / wall, 3), "steady_samples_per_s": steady and round(steady, 3),
            "accuracy": summary["overall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-pixels", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import ray

    from p2r.core.images import PixelBounds
    from p2r.data.dataset import write_synthetic
    from p2r.eval.benchmarks import load_benchmark
    from p2r.eval.inference import BackendSpec, EvalSettings
    from p2r.models.tiny import write_tiny_model
    from p2r.services.engine import EngineLimits

    work = Path(tempfile.mkdtemp(prefix="p2r-bench-eval-"))
    model = write_tiny_model(work / "model", init_std=0.2)
    write_synthetic(work / "data", args.samples)
    samples = load_benchmark("synthetic", work / "data")
    spec = BackendSpec(EvalSettings(bounds=PixelBounds(16384, args.max_pixels)), model=str(model),
                       limits=EngineLimits(max_model_len=16384, max_num_seqs=args.batch_size))
    rows = [timed(samples, spec, "default", work / "default-1", args.batch_size, 0),
            timed(samples, spec, "p2r", work / "p2r-1", args.batch_size, 0)]
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    try:
        rows.append(timed(samples, spec, "p2r", work / "p2r-ray", args.batch_size, args.workers))
    finally:
        ray.shutdown()

    def same(a: str, b: str) -> bool:
        load = lambda p: [json.loads(x) for x in (work / p / "results.jsonl").read_text().splitlines()[1:]]  # noqa: E731
        return sorted(load(a), key=lambda r: r["uid"]) == sorted(load(b), key=lambda r: r["uid"])

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"samples": args.samples, "batch_size": args.batch_size, "max_pixels": args.max_pixels,
                     "max_tokens": {"default": 16, "p2r": [256, 1024]}},
        "runs": rows,
        "p2r_over_default_wall": round(rows[1]["wall_s"] / rows[0]["wall_s"], 2),
        "p2r_over_default_steady": (round(rows[0]["steady_samples_per_s"] / rows[1]["steady_samples_per_s"], 2)
                                    if rows[0]["steady_samples_per_s"] and rows[1]["steady_samples_per_s"] else None),
        "ray_over_single_wall": round(rows[1]["wall_s"] / rows[2]["wall_s"], 2),
        "ray_results_identical": same("p2r-1", "p2r-ray"),
    }
    print(f"{'run':<28}{'wall s':>9}{'samples/s':>11}{'steady/s':>10}")
    for r in rows:
        name = f"{r['mode']} {'ray x' + str(r['workers']) if r['workers'] else 'one process'}"
        print(f"{name:<28}{r['wall_s']:>9.2f}{r['samples_per_s']:>11.3f}{(r['steady_samples_per_s'] or 0):>10.3f}")
    print(f"p2r / default time: {result['p2r_over_default_wall']}x wall, {result['p2r_over_default_steady']}x steady; "
          f"Ray x{args.workers} speed-up (wall): {result['ray_over_single_wall']}x; "
          f"identical results: {result['ray_results_identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

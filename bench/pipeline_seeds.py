"""The pipeline's measurement over seeds: is the README's report table a property of the method or
of one draw? (issue 26)

For each seed (default 0 1 2) this runs the README's main command, ``p2r pipeline run --config``
on a copy of ``examples/pipeline-local.yaml`` as a subprocess (the user's path, nothing
in-process), with the copy's paths moved under a work dir (as ``tests/test_pipeline_local.py``
``local_config`` does) and the seed set where the run draws: ``prepare.seed`` (the pretraining and
the synthetic sets) and ``stage1.seed`` / ``stage2.seed`` (the trainers). From each run's state
(``WORKDIR/state.json``: the report step's recorded outputs, ``controller/report.py``
``Report.outputs``, and the prepare step's start and finish) it takes every number in the report's
table - each matrix row's accuracy, each stage's first-5 / last-5 mean reward and their
difference - and the wall time of the whole run and of its prepare step, then prints each as
median (min–max) over seeds, and how many seeds met each claim. JSON (per-seed values and the
summary) goes to ``bench/results/pipeline_seeds.json``.

Every seed starts cold: its own work dir and its own pretrained-base cache (``P2R_CACHE``), so the
prepare time is a first run's (pretraining included) and no seed reuses another's base;
``--warm-cache`` uses the caller's cache instead. Run it alone: every seed is a whole pipeline run
(the shrunk smoke below took 8 minutes on 2 cores), and the wall times are only comparable on an
otherwise idle machine.

Smoke options (``--stage-steps``, ``--eval-limit``, ``--pretrain-steps``, or fewer than 3 seeds)
shrink the work; the output then says SMOKE and is not the reference measurement, and unless
``--out`` is given the JSON goes into the work dir, never into bench/results.

    .venv/bin/python bench/pipeline_seeds.py                                  # the reference run
    .venv/bin/python bench/pipeline_seeds.py --seeds 0 --stage-steps 1 --eval-limit 2 --pretrain-steps 4   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import MIN_REPEATS, load_average, spread, summary  # noqa: E402
from p2r.controller.config import MATRIX_ROWS  # noqa: E402
from p2r.controller.report import STAGES, WINDOW  # noqa: E402
from p2r.controller.state import SUCCEEDED, FileStore  # noqa: E402

EXAMPLE = ROOT / "examples" / "pipeline-local.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "pipeline_seeds.json"
REWARD_KEYS = ("first5", "last5", "diff")  # Curve.summary's keys, in the report table's order
REWARD_NAMES = {"first5": f"first {WINDOW}", "last5": f"last {WINDOW}", "diff": "gain"}
LOG_TAIL = 3000


def seed_config(seed: int, work: Path, args: argparse.Namespace) -> Path:
    """The README example for ``seed``: paths under ``work``, the seed everywhere the run draws,
    and the smoke overrides (if any)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    run = work / "work"
    config.update(workdir=str(run), storage=str(work / "storage"), base_model=str(run / "tiny-model"),
                  data=str(run / "synthetic" / "train.parquet"))
    config["eval"]["data"] = str(run / "synthetic-eval")
    config["prepare"]["seed"] = seed
    for stage in STAGES:
        config[stage]["seed"] = seed
        if args.stage_steps is not None:
            config[stage]["max_steps"] = args.stage_steps
    if args.eval_limit is not None:
        config["eval"]["limit"] = args.eval_limit
    if args.pretrain_steps is not None:
        config["prepare"]["pretrain"] = {**(config["prepare"].get("pretrain") or {}), "steps": args.pretrain_steps}
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def p2r_command() -> list[str]:
    """``p2r`` as the README runs it: the console script beside this interpreter."""
    script = Path(sys.executable).with_name("p2r")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "p2r.cli"]


def run_seed(seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``p2r pipeline run``; its numbers from the run state (None where it did not finish)."""
    work.mkdir(parents=True, exist_ok=True)
    config = seed_config(seed, work, args)
    env = dict(os.environ)
    if not args.warm_cache:
        env["P2R_CACHE"] = str(work / "cache")
    log = work / "pipeline.log"
    print(f"seed {seed}: p2r pipeline run --config {config} (log {log})", flush=True)
    started = time.perf_counter()
    with log.open("wb") as f:
        try:
            rc: int | None = subprocess.run([*p2r_command(), "pipeline", "run", "--config", str(config)], cwd=ROOT,
                                            env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout_s,
                                            check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - started
    state = FileStore(work / "work").load() or {"status": "no state", "steps": {}}
    steps = state["steps"]
    prepare = steps.get("prepare") or {}
    report = (steps.get("report") or {}).get("outputs") or {}
    rows, rewards, claims = report.get("rows") or {}, report.get("rewards") or {}, report.get("claims") or {}
    ok = rc == 0 and state.get("status") == SUCCEEDED and bool(rows)
    result: dict[str, Any] = {
        "seed": seed, "ok": ok, "returncode": rc, "status": state.get("status"), "reason": state.get("reason"),
        "wall_s": round(wall, 1),
        "prepare_s": (round(prepare["finished"] - prepare["started"], 1)
                      if prepare.get("started") and prepare.get("finished") else None),
        "pretrain_steps": (prepare.get("outputs") or {}).get("pretrain_steps"),
        "accuracy": {name: (rows.get(name) or {}).get("overall") for name in MATRIX_ROWS},
        "n": {name: (rows.get(name) or {}).get("n") for name in MATRIX_ROWS},
        "rewards": {stage: {k: (rewards.get(stage) or {}).get(k) for k in (*REWARD_KEYS, "steps")} for stage in STAGES},
        "claims": {key: c.get("met") for key, c in claims.items()},
        "claim_text": {key: c.get("text") for key, c in claims.items()},
        "log": str(log),
    }
    if not ok:
        result["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
        print(f"seed {seed}: FAILED (rc {rc}, status {state.get('status')}: {state.get('reason')})\n"
              f"{result['log_tail']}", flush=True)
    else:
        print(f"seed {seed}: done in {wall:.0f} s", flush=True)
    return result


def metrics(runs: list[dict[str, Any]]) -> list[tuple[str, str, int, list[float | None]]]:
    """(key, label, digits, per-seed values) of every number in the table, in the report's order."""
    out: list[tuple[str, str, int, list[float | None]]] = []
    for name, (label, *_) in MATRIX_ROWS.items():
        out.append((f"accuracy.{name}", f"accuracy {label}", 1, [r["accuracy"][name] for r in runs]))
    for stage in STAGES:
        for k in REWARD_KEYS:
            out.append((f"rewards.{stage}.{k}", f"{stage} reward {REWARD_NAMES[k]}", 3,
                        [r["rewards"][stage][k] for r in runs]))
    out.append(("wall_s", "wall time, whole run (s)", 0, [r["wall_s"] for r in runs]))
    out.append(("prepare_s", "wall time, prepare step (s)", 0, [r["prepare_s"] for r in runs]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage-steps", type=int, help="smoke: both stages' max_steps instead of the example's")
    parser.add_argument("--eval-limit", type=int, help="smoke: eval.limit (questions per matrix row)")
    parser.add_argument("--pretrain-steps", type=int, help="smoke: prepare.pretrain.steps")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse the caller's pretrained-base cache (P2R_CACHE, ~/.cache/p2r), not a cold one")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new temporary dir, kept)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per seed")
    parser.add_argument("--out", type=Path, help=f"JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                        "a smoke run: WORK/pipeline_seeds.json)")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")

    overrides = {k: getattr(args, k) for k in ("stage_steps", "eval_limit", "pretrain_steps")
                 if getattr(args, k) is not None}
    smoke = bool(overrides) or len(args.seeds) < MIN_REPEATS
    work = args.work or Path(tempfile.mkdtemp(prefix="p2r-bench-pipeline-"))
    out = args.out or (work / "pipeline_seeds.json" if smoke else DEFAULT_OUT)
    label = (f"SMOKE - not the reference measurement ({len(args.seeds)} seed(s)"
             + "".join(f", {k.replace('_', '-')} {v}" for k, v in overrides.items()) + ")") if smoke else "reference"
    load = load_average()
    print(f"{label}; work dir {work}", flush=True)

    runs = []
    for seed in args.seeds:
        d = work / f"seed-{seed}"
        shutil.rmtree(d, ignore_errors=True)  # a fresh run, never a resumed one
        runs.append(run_seed(seed, d, args))
    done = [r for r in runs if r["ok"]]

    table = metrics(done)
    claims = {key: {"text": next(r["claim_text"][key] for r in done if key in r["claim_text"]),
                    "met": sum(r["claims"].get(key) is True for r in done),
                    "not_measured": sum(r["claims"].get(key) is None for r in done), "of": len(done)}
              for key in dict.fromkeys(k for r in done for k in r["claims"])}
    print(f"\nP2R pipeline (examples/pipeline-local.yaml) over seeds {' '.join(map(str, args.seeds))}: {label}\n"
          f"{len(done)} of {len(runs)} runs finished; median (min–max) over seeds; {os.cpu_count()} CPU cores; "
          f"load average at start {load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min); pretrained base "
          f"{'from the caller cache' if args.warm_cache else 'cold (trained in every run)'}\n")
    width = max(len(t[1]) for t in table) + 2
    print(f"{'NUMBER':<{width}}{'MEDIAN (MIN–MAX)':<26}PER SEED")
    summaries: dict[str, Any] = {}
    for key, name, digits, values in table:
        known = [v for v in values if v is not None]
        summaries[key] = summary(known, digits) if known else None
        per_seed = " ".join("-" if v is None else f"{v:.{digits}f}" for v in values)
        print(f"{name:<{width}}{spread(summaries[key], digits):<26}{per_seed}")
    for c in claims.values():
        extra = f", {c['not_measured']} not measured" if c["not_measured"] else ""
        print(f"claim {c['text']}: met {c['met']}/{c['of']}{extra}")

    result = {
        "reference": not smoke, "label": label, "overrides": overrides, "seeds": args.seeds,
        "warm_cache": args.warm_cache, "example": EXAMPLE.read_text(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "load_average": load,
        "runs": runs, "summary": summaries, "claims": claims,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nJSON: {out}")
    if len(done) < len(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()

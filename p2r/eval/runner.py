"""Running an evaluation: fixed chunks, in one process or over Ray Data, with resume.

The sample list is cut into fixed chunks of ``batch_size`` in benchmark order, and a chunk is
the unit of work everywhere: the single process runs them one after another, Ray Data hands one
chunk per call to engine replicas (one per GPU; ``concurrency`` = workers). Each chunk meets the
engine as the same batch either way, so greedy results are identical across the two paths.
Grading happens in the driver (the verifier is one model, not one per replica), and every
graded chunk is appended to ``results.jsonl`` at once: a re-run skips the uids already there.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2r.core.errors import UserError
from p2r.eval.benchmarks import EvalSample
from p2r.eval.inference import IN_PROCESS_MODES, NEEDS_MODEL, Backend, BackendSpec, Mode, Output
from p2r.eval.report import RESULTS, grade_rows, result_row, summarize, write_reports

Chunk = list[EvalSample]


class ResultsFile:
    """``results.jsonl`` with a header line (``{"meta": ...}``) naming what was evaluated, so a
    resume into a directory that holds another task, mode or model is refused, not mixed."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.rows: list[dict[str, Any]] = []
        if path.is_file() and path.stat().st_size:
            lines = path.read_text().splitlines()
            header = json.loads(lines[0]).get("meta", {})
            for key in ("task", "mode", "model", "perceiver_model"):
                if header.get(key) != meta.get(key):
                    raise UserError(f"{path}: holds results of {key}={header.get(key)!r}, not {meta.get(key)!r} "
                                     "(use another --out)")
            # A line cut short by a crash is the only one that can be partial: the last one.
            for line in lines[1:]:
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            self._rewrite()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"meta": meta}) + "\n")

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"meta": self.meta}, *self.rows]))
        tmp.replace(self.path)

    @property
    def done(self) -> set[str]:
        return {r["uid"] for r in self.rows}

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
        self.rows.extend(rows)


def chunks(samples: Sequence[EvalSample], batch_size: int) -> list[Chunk]:
    return [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def run_chunk(backend: Backend, mode: Mode, chunk: Chunk) -> list[dict[str, Any]]:
    """Answer one chunk in ``mode`` (images decoded here, in the worker); ungraded rows."""
    backend.settings = replace(backend.settings, mode=mode)
    images = [s.image.load() for s in chunk]
    outputs: list[Output] = backend.run(chunk, images)
    return [result_row(s, o, mode) for s, o in zip(chunk, outputs, strict=True)]


Work = list[tuple[Mode, Chunk]]
Stream = Iterator[tuple[Mode, list[dict[str, Any]]]]


def _local(spec: BackendSpec, work: Work) -> tuple[Stream, Any]:
    backend = spec.build()
    return ((mode, run_chunk(backend, mode, c)) for mode, c in work), backend.verifier()


class _RayWorker:
    """One engine replica: built once per Ray actor, then fed one (mode, chunk) per call."""

    def __init__(self, spec: BackendSpec) -> None:
        self.backend = spec.build(verifier=False)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = [(mode, run_chunk(self.backend, mode, pickle.loads(p)))
               for mode, p in zip(batch["mode"], batch["chunk"], strict=True)]
        return {"mode": [m for m, _ in out], "rows": [json.dumps(r) for _, r in out]}


def _ray(spec: BackendSpec, work: Work, workers: int, gpus_per_worker: float) -> tuple[Stream, Any]:
    """Ray Data: (mode, chunk) pairs as rows, ``map_batches`` over ``workers`` actor replicas
    (a local Ray here; on Kubernetes, ``RAY_ADDRESS`` of a RayCluster or the RayJob's cluster)."""
    spec.check_local_models()
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"mode": m, "chunk": pickle.dumps(c)} for m, c in work], override_num_blocks=len(work))
    ds = ds.map_batches(_RayWorker, fn_constructor_kwargs={"spec": spec}, batch_size=1, concurrency=workers,
                        num_cpus=0 if gpus_per_worker else 1, num_gpus=gpus_per_worker or None)
    verifier = spec.build(answer=False).verifier() if (spec.verifier_model or spec.verifier_endpoint) else None
    return ((row["mode"], json.loads(row["rows"])) for row in ds.iter_rows()), verifier


def evaluate(samples: Sequence[EvalSample], spec: BackendSpec, outputs: dict[Mode, Path], meta: dict[str, Any], *,
             batch_size: int = 16, ray_workers: int = 0, gpus_per_worker: float = 0.0,
             progress: Callable[[int, int], None] | None = None,
             backend: Backend | None = None) -> dict[Mode, dict[str, Any]]:
    """Evaluate ``samples`` in every mode of ``outputs`` (mode -> output directory), sharing the
    engines across modes; returns each mode's summary. Samples already in a mode's
    ``results.jsonl`` are skipped (resume). ``backend``: one already built (several evaluations
    sharing one engine, ``p2r.eval.matrix``) instead of building ``spec``'s; ``spec`` then only
    names what is evaluated."""
    if spec.reasoner_endpoint is not None and set(IN_PROCESS_MODES) & set(outputs):
        raise UserError(NEEDS_MODEL)  # before any work, not at the first default-mode chunk
    files: dict[Mode, ResultsFile] = {}
    work: Work = []
    for mode, out_dir in outputs.items():
        settings = replace(spec.settings, mode=mode).as_dict()
        files[mode] = ResultsFile(out_dir / RESULTS, {**meta, "mode": mode, "settings": settings})
        done = files[mode].done
        work += [(mode, c) for c in chunks([s for s in samples if s.uid not in done], batch_size)]
    total = sum(len(c) for _, c in work)
    started = time.perf_counter()
    if work:
        if backend is not None:
            stream, verifier = ((mode, run_chunk(backend, mode, c)) for mode, c in work), backend.verifier()
        elif ray_workers:
            stream, verifier = _ray(spec, work, ray_workers, gpus_per_worker)
        else:
            stream, verifier = _local(spec, work)
        finished = 0
        for mode, rows in stream:
            grade_rows(rows, verifier)
            files[mode].append(rows)
            finished += len(rows)
            if progress is not None:
                progress(finished, total)
    elapsed = time.perf_counter() - started
    wanted = {s.uid for s in samples}
    summaries: dict[Mode, dict[str, Any]] = {}
    for mode, out_dir in outputs.items():
        rows = [r for r in files[mode].rows if r["uid"] in wanted]
        summaries[mode] = summarize(rows, {**files[mode].meta, "evaluated_now": total, "seconds": round(elapsed, 2),
                                           "samples_per_s": round(total / elapsed, 3) if total else None,
                                           "ray_workers": ray_workers})
        write_reports(out_dir, summaries[mode], samples, rows)
    return summaries


def spec_meta(spec: BackendSpec, task: str) -> dict[str, Any]:
    return {"task": task, "model": spec.model or spec.reasoner_endpoint,
            "perceiver_model": spec.perceiver_model or spec.perceiver_endpoint}

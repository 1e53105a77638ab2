"""An evaluation matrix: several (mode, answering model, perceiver model) rows in one process.

The pipeline measures its claim on five rows (base / default, base / p2r, stage-1 perceiver +
base reasoner / p2r, final / default, final / p2r) over three checkpoints of one architecture.
On CPU an engine start is most of a small evaluation's wall time, so every row shares one vLLM
engine whose weights follow the checkpoint each call needs (``OfflineEngine.reload_weights``):
one start, then a cheap in-place reload where consecutive calls change checkpoint (rows are run
in the order given: list the rows of one checkpoint together). Each row is an ordinary
evaluation (``runner.evaluate``) into ``OUT/NAME/``, with its own ``results.jsonl`` (resumable)
and ``summary.json``; ``OUT/matrix.json`` records the rows and what the matrix cost.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2r.core.errors import UserError
from p2r.core.generation import ChatRequest, Sampling
from p2r.eval.benchmarks import EvalSample
from p2r.eval.inference import MODES, BackendSpec, EngineBackend, EngineVerifier, EvalSettings, Mode
from p2r.eval.runner import evaluate, spec_meta

MATRIX = "matrix.json"
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A row's name is its output folder (``OUT/NAME``): one path segment, no surprises in S3 keys."""


@dataclass(frozen=True)
class Row:
    """One evaluation of the matrix: ``mode`` answered by ``model``, perceived by
    ``perceiver_model`` in p2r mode (ignored in the other modes)."""

    name: str
    mode: Mode
    model: str
    perceiver_model: str

    @classmethod
    def parse(cls, name: str, mode: str, model: str, perceiver_model: str) -> Row:
        if not ROW_NAME.match(name):
            raise UserError(f"--row {name}: a row name is letters, digits, '.', '_' and '-' (its output folder)")
        if mode not in MODES:
            raise UserError(f"--row {name}: mode {mode!r} is not one of {', '.join(MODES)}")
        return cls(name, mode, model, perceiver_model)  # type: ignore[arg-type]


def parse_rows(values: Sequence[tuple[str, str, str, str]]) -> list[Row]:
    rows = [Row.parse(*v) for v in values]
    names = [r.name for r in rows]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--row {duplicate}: given twice (each row needs its own output folder)")
    return rows


class SwapEngine:
    """One engine for many checkpoints of one architecture: started on the first checkpoint a
    call needs, its weights reloaded in place when a call needs another."""

    def __init__(self, limits: Any, seed: int = 0, engine: Any = None) -> None:
        """``engine``: an ``OfflineEngine`` already running (on its ``model``'s weights) to use
        instead of starting one."""
        from p2r.services.checkpoints import DEFAULT_CACHE

        self.limits, self.seed = limits, seed
        self.cache = Path(os.environ.get("P2R_CHECKPOINT_CACHE", DEFAULT_CACHE))
        self.engine: Any = engine  # p2r.services.engine.OfflineEngine; else started by the first call
        self.local: dict[str, str] = {}  # checkpoint URI -> verified local directory
        self.current: str | None = os.path.realpath(engine.model) if engine is not None else None
        self.start_s = 0.0
        self.reload_s = 0.0
        self.reloads = 0

    def resolve(self, uri: str) -> str:
        """The local directory of ``uri``, verified against its manifest (downloaded if remote)."""
        if uri not in self.local:
            from p2r.services.checkpoints import resolve_checkpoint

            self.local[uri] = os.path.realpath(resolve_checkpoint(uri, self.cache))
        return self.local[uri]

    def use(self, uri: str) -> Any:
        """The engine, holding ``uri``'s weights."""
        path = self.resolve(uri)
        if self.engine is None:
            from p2r.services.engine import OfflineEngine

            started = time.perf_counter()
            self.engine = OfflineEngine(path, self.limits, self.seed)
            self.start_s = time.perf_counter() - started
        elif self.current != path:
            started = time.perf_counter()
            self.engine.reload_weights(path)
            self.reload_s += time.perf_counter() - started
            self.reloads += 1
        self.current = path
        return self.engine

    def generator(self, uri: str) -> Weights:
        return Weights(self, uri)


@dataclass(frozen=True)
class Weights:
    """A ``Generator`` that answers with one checkpoint's weights on a shared ``SwapEngine``."""

    swap: SwapEngine
    uri: str

    def generate(self, requests: Sequence[ChatRequest], sampling: Sampling) -> list[list[str]]:
        if not requests:
            return []
        return self.swap.use(self.uri).generate(requests, sampling)  # type: ignore[no-any-return]


class _RowBackend(EngineBackend):
    """A row's engine backend whose verifier is the matrix's one (service or shared engine)."""

    def __init__(self, settings: EvalSettings, reasoner: Weights, perceiver: Weights, verifier: Any) -> None:
        super().__init__(settings, reasoner, perceiver)
        self._shared_verifier = verifier

    def verifier(self) -> Any:
        return self._shared_verifier


def evaluate_rows(samples: Sequence[EvalSample], rows: Sequence[Row], out_dir: Path, task: str,
                  settings: EvalSettings, limits: Any, *, verifier_model: str | None = None,
                  verifier_endpoint: str | None = None, batch_size: int = 16, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None, engine: Any = None) -> dict[str, dict[str, Any]]:
    """Evaluate every row into ``out_dir/NAME`` on one shared engine (``engine``, a running
    ``OfflineEngine``, or one started for the first row); returns name -> summary and writes
    ``out_dir/matrix.json``. A row already complete in its folder costs nothing."""
    swap = SwapEngine(limits, seed, engine)
    verifier: Any = None
    if verifier_endpoint is not None:
        from p2r.services.client import Client, ServiceVerifier

        verifier = ServiceVerifier(Client(verifier_endpoint))
    elif verifier_model is not None:
        verifier = EngineVerifier(swap.generator(verifier_model))
    started = time.perf_counter()
    total, done = len(samples) * len(rows), 0
    summaries: dict[str, dict[str, Any]] = {}
    for row in rows:
        spec = BackendSpec(replace(settings, mode=row.mode), model=row.model,
                           perceiver_model=row.perceiver_model if row.mode == "p2r" else None,
                           verifier_model=verifier_model, verifier_endpoint=verifier_endpoint, limits=limits)
        backend = _RowBackend(spec.settings, swap.generator(row.model), swap.generator(row.perceiver_model), verifier)
        base = done

        def row_progress(finished: int, _total: int, base: int = base) -> None:
            if progress is not None:
                progress(base + finished, total)

        summary = evaluate(samples, spec, {row.mode: out_dir / row.name}, spec_meta(spec, task),
                           batch_size=batch_size, progress=row_progress, backend=backend)[row.mode]
        summaries[row.name] = summary
        done += len(samples)
    record = {
        "task": task, "rows": [{**vars(r), "out": r.name, "n": summaries[r.name]["n"],
                                "overall": summaries[r.name]["overall"]} for r in rows],
        "seconds": round(time.perf_counter() - started, 2), "engine_start_s": round(swap.start_s, 2),
        "reloads": swap.reloads, "reload_s": round(swap.reload_s, 2),
    }
    (out_dir / MATRIX).write_text(json.dumps(record, indent=1) + "\n")
    return summaries

"""The step graph of a P2R run and the loop that walks it; both backends run this same graph.

    [prepare | inputs] → serve_reasoner → stage1 → verify_stage1 → serve_perceiver → stage2 → verify_stage2
              [→ baseline → verify_baseline] → eval → report

``prepare`` (local) builds missing tiny inputs; ``inputs`` (Kubernetes) waits, reporting what is
missing, until the models, the data claim and the PyTorchJob CRD exist. ``serve_reasoner`` puts
the base model up as the frozen reasoner and the verifier; ``stage1``
trains the perceiver against them; ``verify_stage1`` checks the newest stage-1 checkpoint file by
file against its manifest (stage 2 never starts from an incomplete one); ``serve_perceiver`` serves
that checkpoint as the frozen perceiver; ``stage2`` trains the reasoner from it; ``eval`` runs
``p2r eval`` on the final checkpoint (which serves both roles, as in production) or, with
``eval.matrix`` (the local default), the matrix that measures the P2R claim - base, stage-1
perceiver and final checkpoint, direct and p2r (config.MATRIX_ROWS) - in one process; ``report``
reads the evaluation summaries back into the run state and, after a matrix, writes the pipeline
report (report.py: accuracy table, reward curves, the claims met or not). With ``baseline:`` in the config,
``baseline`` trains the reference's plain single-turn GRPO baseline from the base model on the same
data (graded by the verifier service, no frozen role) and ``verify_baseline`` checks its checkpoint.

The loop persists the state after every transition (see ``state.py``), retries a step that failed
transiently (``transient``) with exponential backoff up to ``retry.max_attempts`` - a bug fails the
run at once, its traceback logged at ERROR - and stops cleanly on ``p2r pipeline cancel``
(the step's work is stopped, the run marked cancelled) or on SIGTERM (the work is stopped, the run
stays resumable: a Kubernetes controller pod being rescheduled must not cancel the pipeline).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2r.controller import metrics
from p2r.controller.config import MATRIX_ROWS, PipelineConfig
from p2r.controller.state import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Store,
    new_state,
    now,
)
from p2r.controller.storage import read_json, verify_checkpoint
from p2r.services.checkpoints import MANIFEST, CheckpointError, latest_checkpoint

log = logging.getLogger("p2r.pipeline")


class StepFailed(Exception):
    """A step attempt failed; the message is the reason shown by ``status`` (retried)."""


TRANSIENT_HTTP_STATUSES = frozenset({0, 408, 409, 425, 429, 500, 502, 503, 504})
"""HTTP answers of the cluster API or object storage that say "try again later" (0: no answer)."""


def transient(error: BaseException) -> bool:
    """Whether another attempt of the step can succeed, so the loop retries it.

    Retried: the step's own failure (``StepFailed``: a process or job that failed, a checkpoint
    not complete yet), I/O and network errors (``OSError``: connection refused or reset, a
    timeout, a file not there yet), urllib3's transport errors, and a Kubernetes API or S3
    answer with a transient HTTP status. Anything else - a ``TypeError``, a ``KeyError``, a
    config the pipeline cannot run - is a bug or a mistake that every attempt would repeat: the
    run fails at once, with the traceback in the log at ERROR.
    """
    if isinstance(error, StepFailed | OSError):
        return True
    status = getattr(error, "status", None)  # kubernetes.client.ApiException
    if status is None:
        status = getattr(getattr(error, "response", None), "status", None)  # minio.error.S3Error
    if isinstance(status, int):
        return status in TRANSIENT_HTTP_STATUSES
    try:
        from urllib3.exceptions import HTTPError
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes and minio clients
        return False
    return isinstance(error, HTTPError)


class Cancelled(Exception):
    """``p2r pipeline cancel`` was requested."""


class Interrupted(Exception):
    """The controller was asked to stop (SIGTERM / SIGINT); the run stays resumable."""


class Backend(Protocol):
    """Runs the parts of steps that differ between local processes and Kubernetes objects."""

    name: str

    def serve(self, ctx: Context, models: dict[str, str]) -> dict[str, str]:
        """Serve each role on its model; wait until ready; return role -> endpoint."""

    def endpoint(self, ctx: Context, role: str) -> str:
        """The endpoint of a served role, bringing it back if it went away (controller restart)."""

    def release(self, ctx: Context, keep: set[str]) -> None:
        """Stop serving roles not in ``keep`` where that frees resources."""

    def train(self, ctx: Context, stage: str, role: str, train_config: dict[str, Any]) -> dict[str, Any]:
        """Run one training stage to completion (StepFailed otherwise); returns step outputs."""

    def train_workdir(self, stage: str) -> str:
        """The trainer's scratch directory as the trainer sees it."""

    def evaluate(self, ctx: Context, args: list[str]) -> dict[str, Any]:
        """Run ``p2r eval ARGS`` to completion; returns step outputs."""

    def shutdown(self, ctx: Context, cancelled: bool) -> None:
        """Stop whatever is running for this run (the current job, local services)."""

    def cancel_detached(self, state: dict[str, Any]) -> None:
        """Stop a run's work when no controller is alive to do it (``p2r pipeline cancel``)."""

    def check_inputs(self, ctx: Context) -> dict[str, Any]:
        """Wait until the run's inputs exist, reporting what is missing (Kubernetes only: local
        inputs are checked when the config loads)."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], dict[str, Any]]
    needs: frozenset[str] = frozenset()  # service roles that must be up while the step runs


@dataclass
class Context:
    """What a running step sees: config, state, backend, and the stop checks."""

    config: PipelineConfig
    state: dict[str, Any]
    store: Store
    backend: Backend
    step: str = ""
    attempt: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def save(self) -> None:
        self.store.save(self.state)

    def record(self, **outputs: Any) -> None:
        """Persist outputs of the running step now (a job name before the job is created, a pid),
        so a restarted controller finds them."""
        self.state["steps"][self.step]["outputs"].update(outputs)
        self.save()

    def outputs(self, step: str) -> dict[str, Any]:
        return self.state["steps"][step]["outputs"]

    def check(self) -> None:
        """Raise Cancelled / Interrupted when asked to stop; every wait loop calls this."""
        if self.store.cancel_requested():
            raise Cancelled("cancelled by p2r pipeline cancel")
        if self.stop.is_set():
            raise Interrupted("controller stopped by a signal")

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 0.5))


# ------------------------------------------------------------------------------------ steps


def _prepare(ctx: Context) -> dict[str, Any]:
    """Build the tiny model and the synthetic sets where they are missing (local bootstrap)."""
    from p2r.data.dataset import write_synthetic
    from p2r.models.tiny import write_tiny_model

    cfg, prep = ctx.config, ctx.config.prepare
    assert prep is not None
    made: dict[str, Any] = {}
    if prep.pretrain is not None:  # the cached base when its digest matches, else trained now
        from p2r.models.pretrain import PretrainConfig, install_pretrained

        record = install_pretrained(Path(cfg.base_model), PretrainConfig(**{"seed": prep.seed, **prep.pretrain}),
                                    time_budget_s=prep.pretrain_time_budget_s)
        made.update(base_model=cfg.base_model, pretrain_digest=record["digest"], pretrain_steps=record["steps_run"],
                    pretrain_curve=record["curve"])
    elif prep.tiny_model and not (Path(cfg.base_model) / "config.json").is_file():
        write_tiny_model(Path(cfg.base_model), seed=prep.seed)
        made["base_model"] = cfg.base_model
    if prep.train_samples and not Path(cfg.data).is_file():
        made["data"] = str(write_synthetic(Path(cfg.data).parent, prep.train_samples, seed=prep.seed, task=prep.task))
    eval_dir = Path(cfg.eval_data)
    if prep.eval_samples and not any(eval_dir.glob("*.parquet")):
        made["eval_data"] = str(write_synthetic(eval_dir, prep.eval_samples, seed=prep.seed + 1, task=prep.task))
    return made


def _inputs(ctx: Context) -> dict[str, Any]:
    return ctx.backend.check_inputs(ctx)


def _serve_reasoner(ctx: Context) -> dict[str, Any]:
    models = {"reasoner": ctx.config.base_model, "verifier": ctx.config.verifier}
    return {"models": models, "endpoints": ctx.backend.serve(ctx, models)}


def _serve_perceiver(ctx: Context) -> dict[str, Any]:
    models = {"perceiver": ctx.outputs("verify_stage1")["checkpoint"]}
    return {"models": models, "endpoints": ctx.backend.serve(ctx, models)}


def _stage(stage: str, role: str, frozen: str | None) -> Callable[[Context], dict[str, Any]]:
    """A training step; stage 2 starts from the verified stage-1 checkpoint, the others (stage 1,
    the baseline) from the base model. ``frozen``: the served role the rewards need, if any."""
    def run(ctx: Context) -> dict[str, Any]:
        model = ctx.outputs("verify_stage1")["checkpoint"] if stage == "stage2" else ctx.config.base_model
        endpoints = {"verifier": ctx.backend.endpoint(ctx, "verifier")}
        if frozen is not None:
            endpoints = {frozen: ctx.backend.endpoint(ctx, frozen), **endpoints}
        train_config = ctx.config.train_config(stage, role, model, endpoints, ctx.backend.train_workdir(stage))
        outputs = ctx.backend.train(ctx, stage, role, train_config)
        return {"model": model, "output": ctx.config.stage_root(stage), **outputs}

    return run


def _verify(stage: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        root = ctx.config.stage_root(stage)
        try:
            uri = ctx.outputs(stage).get("checkpoint") or latest_checkpoint(root)
            if not uri:
                raise StepFailed(f"no complete checkpoint (with {MANIFEST}) under {root}")
            info = verify_checkpoint(uri.rstrip("/"))
        except CheckpointError as e:
            raise StepFailed(str(e)) from None
        return {"checkpoint": uri.rstrip("/"), "files": info["files"], "bytes": info["bytes"],
                "checkpoint_step": info["step"]}

    return run


def _eval(ctx: Context) -> dict[str, Any]:
    """``p2r eval`` on the final checkpoint, or (``eval.matrix``) one ``p2r eval --row ...`` over
    the matrix rows: a single process whose one engine reloads weights between the checkpoints,
    as an engine start costs more than a small evaluation. Each row's summary goes into the
    outputs (``rows``)."""
    cfg = ctx.config
    final = ctx.outputs("verify_stage2")["checkpoint"]
    rows = cfg.eval.matrix_rows(cfg.backend)
    if rows:
        args = ["--task", cfg.eval.task, "--data", cfg.eval_data, "--out", cfg.eval_out]
        models = {"base": cfg.base_model, "stage1": ctx.outputs("verify_stage1")["checkpoint"], "final": final}
        for name in rows:
            _, mode, answering, perceiving = MATRIX_ROWS[name]
            args += ["--row", name, mode, models[answering], models[perceiving]]
    else:
        args = ["--model", final, "--perceiver-model", final, "--task", cfg.eval.task, "--data", cfg.eval_data,
                "--mode", cfg.eval.mode, "--out", cfg.eval_out]
    if cfg.eval.limit:
        args += ["--limit", str(cfg.eval.limit)]
    if cfg.eval.grade_free_form:  # the verifier service that graded training grades the evaluation
        args += ["--verifier-endpoint", ctx.backend.endpoint(ctx, "verifier")]
    args += cfg.eval.args
    outputs = {"model": final, "out": cfg.eval_out, **ctx.backend.evaluate(ctx, args)}
    if rows:
        outputs["rows"] = {name: _row_summary(cfg.eval_out, name) for name in rows}
    return outputs


def _summary(uri: str) -> dict[str, Any]:
    """An evaluation's ``summary.json``, with the fields the report reads (StepFailed otherwise)."""
    try:
        summary: dict[str, Any] = read_json(uri)
    except (FileNotFoundError, CheckpointError) as e:
        raise StepFailed(f"evaluation summary: {e}") from None
    missing = [k for k in ("n", "overall", "categories") if k not in summary]
    if missing:
        raise StepFailed(f"{uri} lacks {', '.join(missing)}")
    return summary


def _row_summary(out: str, name: str) -> dict[str, Any]:
    summary = _summary(f"{out}/{name}/summary.json")
    label, mode, _, _ = MATRIX_ROWS[name]
    return {"label": label, "mode": mode, "model": summary.get("model"),
            "perceiver_model": summary.get("perceiver_model"), "out": f"{out}/{name}",
            "summary": f"{out}/{name}/summary.json", "n": summary["n"], "overall": summary["overall"],
            "categories": summary["categories"]}


def _report(ctx: Context) -> dict[str, Any]:
    """The evaluation's numbers into the run state; after a matrix, also the pipeline report
    (report.md / report.html / the reward curves, controller/report.py) in the eval output."""
    out = ctx.outputs("eval")["out"]
    rows: dict[str, dict[str, Any]] | None = ctx.outputs("eval").get("rows")
    if not rows:
        summary = _summary(f"{out}/summary.json")
        return {"summary": f"{out}/summary.json", "report": f"{out}/report.md", "n": summary["n"],
                "overall": summary["overall"], "categories": summary["categories"]}
    from p2r.controller.report import build_report, write_report
    from p2r.trainer.state import METRICS, read_metrics

    curves = {}
    for stage in ("stage1", "stage2"):
        path = ctx.outputs(stage).get("metrics") or str(Path(ctx.backend.train_workdir(stage)) / METRICS)
        curves[stage] = read_metrics(Path(path))
    report = build_report(rows, curves)
    files = write_report(report, ctx.config.workdir_path / "report", out)
    headline = rows.get("final-p2r") or list(rows.values())[-1]  # the production configuration
    return {"summary": headline["summary"], "n": headline["n"], "overall": headline["overall"],
            "categories": headline["categories"], **files, **report.outputs()}


def build_graph(config: PipelineConfig) -> list[Step]:
    prepare = [Step("prepare", _prepare)] if config.prepare is not None else []
    # On Kubernetes nothing is created until the models, data claim and CRD exist (kube.py).
    inputs = [Step("inputs", _inputs)] if config.backend == "kubernetes" else []
    baseline = [Step("baseline", _stage("baseline", "baseline", None), frozenset({"verifier"})),
                Step("verify_baseline", _verify("baseline"))] if config.baseline is not None else []
    return [
        *prepare,
        *inputs,
        Step("serve_reasoner", _serve_reasoner),
        Step("stage1", _stage("stage1", "perceiver", "reasoner"), frozenset({"reasoner", "verifier"})),
        Step("verify_stage1", _verify("stage1")),
        Step("serve_perceiver", _serve_perceiver, frozenset({"verifier"})),
        Step("stage2", _stage("stage2", "reasoner", "perceiver"), frozenset({"perceiver", "verifier"})),
        Step("verify_stage2", _verify("stage2")),
        *baseline,
        Step("eval", _eval, frozenset({"verifier"}) if config.eval.grade_free_form else frozenset()),
        Step("report", _report),
    ]


# ------------------------------------------------------------------------------------- loop


def _set_current(step: str | None, steps: list[Step]) -> None:
    for s in steps:
        metrics.CURRENT_STEP.labels(step=s.name).set(1 if s.name == step else 0)


def _install_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: object) -> None:
        log.warning("signal %d: stopping the controller (the run stays resumable)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def prepare_state(config: PipelineConfig, store: Store, steps: list[Step]) -> dict[str, Any]:
    """The run's state: a new one, or the stored one made ready to continue. A failed or
    cancelled step starts again with fresh attempts (the user asked to run again)."""
    state = store.load()
    if state is None:
        return new_state(config.name, config.backend, [s.name for s in steps])
    if state["name"] != config.name:
        raise StepFailed(f"{store.describe()} holds run {state['name']!r}, not {config.name!r}")
    for s in steps:  # a graph that gained a step (prepare) keeps the old ones' records
        state["steps"].setdefault(s.name, new_state("", "", [s.name])["steps"][s.name])
    for record in state["steps"].values():
        if record["status"] in (FAILED, CANCELLED):
            record.update(status=PENDING, attempts=0, next_attempt_at=None)
    return state


def run_pipeline(config: PipelineConfig, backend: Backend, store: Store,
                 stop: threading.Event | None = None) -> dict[str, Any]:
    """Walk the graph from where the stored state left off; returns the final state."""
    steps = build_graph(config)
    state = prepare_state(config, store, steps)
    if state["status"] == SUCCEEDED:
        log.info("run %s already succeeded; nothing to do", config.name)
        return state
    store.clear_cancel()
    stop = stop or threading.Event()
    _install_signals(stop)
    ctx = Context(config, state, store, backend, stop=stop)
    state.update(status=RUNNING, reason=None,
                 controller={"pid": os.getpid(), "host": socket.gethostname(), "started": now()})
    ctx.save()
    if config.metrics_port is not None:  # in a pod Prometheus scrapes the pod IP; locally stay on loopback
        metrics.serve_metrics(config.metrics_port, "0.0.0.0" if config.backend == "kubernetes" else "127.0.0.1")
    metrics.RUN_STATE.set(1)
    try:
        outcome = _walk(ctx, steps)
    finally:
        metrics.RUN_STATE.set(0)
        _set_current(None, steps)
    if outcome != INTERRUPTED:
        metrics.RUNS.labels(outcome=outcome).inc()
    return state


def _walk(ctx: Context, steps: list[Step]) -> str:
    state, retry = ctx.state, ctx.config.retry
    for i, step in enumerate(steps):
        record = state["steps"][step.name]
        if record["status"] == SUCCEEDED:
            continue
        ctx.step = step.name
        state["current"] = step.name
        _set_current(step.name, steps)
        keep = set().union(*(s.needs for s in steps[i:]))
        try:
            ctx.backend.release(ctx, keep)
        except Exception as e:  # releasing is housekeeping; never fail a run on it
            log.warning("releasing services: %s", e)
        while True:
            started = time.monotonic()
            try:
                resumed = record["status"] == RUNNING
                if not resumed:
                    wait = (record["next_attempt_at"] or 0) - time.time()
                    if wait > 0:
                        log.info("%s: attempt %d in %.1f s", step.name, record["attempts"] + 1, wait)
                        ctx.sleep(wait)
                    record.update(status=RUNNING, attempts=record["attempts"] + 1, started=now(), finished=None,
                                  error=None, next_attempt_at=None)
                    ctx.save()
                ctx.attempt = record["attempts"]
                metrics.STEP_ATTEMPTS.labels(step=step.name).set(record["attempts"])
                log.info("%s: attempt %d/%d %s", step.name, ctx.attempt, retry.max_attempts,
                         "resumed" if resumed else "started")
                started = time.monotonic()
                ctx.check()
                outputs = step.run(ctx)
            except Cancelled as e:
                record.update(status=CANCELLED, finished=now(), error=str(e))
                state.update(status=CANCELLED, reason=f"cancelled at {step.name}")
                _shutdown(ctx, cancelled=True)
                ctx.save()
                log.warning("run %s cancelled at %s", ctx.config.name, step.name)
                return CANCELLED
            except Interrupted:
                state.update(status=INTERRUPTED, reason=f"controller stopped at {step.name}; run again to resume")
                _shutdown(ctx, cancelled=False)
                ctx.save()
                return INTERRUPTED
            except Exception as e:
                reason = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
                reason = reason.strip().splitlines()[-1] if reason.strip() else type(e).__name__
                retryable = transient(e)
                if not isinstance(e, StepFailed):  # not the step's reported failure: show where it came from
                    log.error("%s: attempt %d raised %s%s", step.name, record["attempts"], type(e).__name__,
                              "" if retryable else " (not transient: not retried)", exc_info=e)
                elapsed = time.monotonic() - started
                metrics.STEP_DURATION.labels(step=step.name, outcome="failed").observe(elapsed)
                metrics.STEP_FAILURES.labels(step=step.name).inc()
                record["history"].append({"attempt": record["attempts"], "started": record["started"],
                                          "finished": now(), "error": reason})
                record.update(finished=now(), error=reason)
                log.error("%s: attempt %d failed: %s", step.name, record["attempts"], reason)
                if not retryable or record["attempts"] >= retry.max_attempts:
                    record["status"] = FAILED
                    state.update(status=FAILED, reason=(
                        f"{step.name} failed after {record['attempts']} attempts: {reason}" if retryable
                        else f"{step.name} failed (not transient, not retried): {reason}"))
                    _shutdown(ctx, cancelled=False)
                    ctx.save()
                    return FAILED
                record.update(status=PENDING, next_attempt_at=now() + retry.delay(record["attempts"]))
                ctx.save()
                continue
            elapsed = time.monotonic() - started
            metrics.STEP_DURATION.labels(step=step.name, outcome="succeeded").observe(elapsed)
            record["outputs"].update(outputs)
            record["history"].append({"attempt": record["attempts"], "started": record["started"],
                                      "finished": now(), "error": None})
            record.update(status=SUCCEEDED, finished=now(), error=None)
            ctx.save()
            log.info("%s: succeeded in %.1f s", step.name, elapsed)
            break
    state.update(status=SUCCEEDED, current=None, reason=None)
    _shutdown(ctx, cancelled=False)
    ctx.save()
    return SUCCEEDED


def _shutdown(ctx: Context, cancelled: bool) -> None:
    try:
        ctx.backend.shutdown(ctx, cancelled)
    except Exception as e:
        log.warning("shutdown: %s", e)

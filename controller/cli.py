"""``p2r pipeline run|status|cancel``: the controller's command line.

All three take the same ``--config``: it names the run and where its state lives (a state file
under ``workdir`` locally, a ConfigMap on Kubernetes). Config problems are one line and exit 2
before anything starts; a run that fails or is cancelled exits 1 with its reason.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import click

from p2r.core.errors import UserError


class PipelineEnded(click.ClickException):
    """The run ended without succeeding: one line with the reason, exit 1."""

    exit_code = 1


def _load(config_path: Path) -> Any:
    from p2r.controller.config import ConfigError, load_pipeline_config

    try:
        return load_pipeline_config(config_path)
    except ConfigError as e:
        raise UserError(str(e)) from None


def open_backend(config: Any) -> tuple[Any, Any]:
    """(backend, store) for the config's backend."""
    if config.backend == "kubernetes":
        from p2r.controller.kube import KubeBackend, KubeError

        try:
            backend = KubeBackend(config)
        except KubeError as e:
            raise UserError(str(e)) from None
        return backend, backend.store()
    from p2r.controller.local import LocalBackend
    from p2r.controller.state import FileStore

    return LocalBackend(config), FileStore(config.workdir_path)


def _time(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _pct(value: float | None) -> str:
    """Accuracy x100 to one decimal; '-' for a category nothing could be graded in."""
    return "-" if value is None else f"{value:.1f}"


def _details(name: str, record: dict[str, Any]) -> str:
    out = record["outputs"]
    if record["error"] and record["status"] != "succeeded":
        return f"error: {record['error']}"
    parts: list[str] = []
    if "endpoints" in out:
        parts += [f"{role}={ep}" for role, ep in out["endpoints"].items()]
    for key in ("job", "checkpoint", "out"):
        if out.get(key):
            parts.append(f"{key}={out[key]}")
    if "overall" in out:
        parts += [f"overall={_pct(out['overall'])}"] + [f"{k}={_pct(v)}" for k, v in out["categories"].items()]
    if not parts and out.get("log"):
        parts.append(f"log={out['log']}")
    return " ".join(parts)


def format_status(state: dict[str, Any], where: str) -> str:
    lines = [f"run {state['name']} ({state['backend']}, state in {where}): {state['status']}"
             + (f" at {state['current']}" if state.get("current") and state["status"] != "succeeded" else "")
             + (f" - {state['reason']}" if state.get("reason") else "")]
    lines.append(f"{'STEP':<16}{'STATUS':<11}{'ATTEMPTS':<10}{'STARTED':<21}{'FINISHED':<21}{'SECONDS':<9}DETAILS")
    for name, r in state["steps"].items():
        seconds = f"{r['finished'] - r['started']:.1f}" if r["started"] and r["finished"] else "-"
        lines.append(f"{name:<16}{r['status']:<11}{r['attempts']!s:<10}{_time(r['started']):<21}"
                     f"{_time(r['finished']):<21}{seconds:<9}{_details(name, r)}")
    return "\n".join(lines)


@click.group("pipeline")
def pipeline() -> None:
    """The P2R pipeline: stage 1 -> checkpoint -> stage 2 -> eval, locally or on Kubernetes."""


@pipeline.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="pipeline.yaml (see examples/pipeline-local.yaml).")
def run(config_path: Path) -> None:
    """Run the pipeline, or resume it where its recorded state left off."""
    from p2r.controller.graph import StepFailed, run_pipeline
    from p2r.controller.state import SUCCEEDED

    config = _load(config_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    backend, store = open_backend(config)
    try:
        state = run_pipeline(config, backend, store)
    except StepFailed as e:
        raise UserError(str(e)) from None
    click.echo(format_status(state, store.describe()))
    report = state["steps"].get("report", {}).get("outputs", {})
    if report.get("rows"):  # the eval matrix's table, the reward trends and the claims
        from p2r.controller.report import format_outputs

        click.echo(f"\n{format_outputs(report)}\nreport: {report.get('report_html') or report.get('report')}")
    if state["status"] != SUCCEEDED:
        raise PipelineEnded(f"run {config.name} {state['status']}: {state['reason']}")


def _recorded(config_path: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Config, backend, state store and the recorded state of a run that has started."""
    config = _load(config_path)
    backend, store = open_backend(config)
    state = store.load()
    if state is None:
        raise UserError(f"run {config.name} has no state in {store.describe()} (not started)")
    return config, backend, store, state


@pipeline.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the whole state document.")
def status(config_path: Path, as_json: bool) -> None:
    """Show every step with its status, attempts, times, URIs and errors."""
    _, _, store, state = _recorded(config_path)
    click.echo(json.dumps(state, indent=1) if as_json else format_status(state, store.describe()))


def _controller_alive(config: Any, state: dict[str, Any]) -> bool:
    controller = state.get("controller") or {}
    if config.backend == "local":
        from p2r.controller.local import pid_alive

        return controller.get("host") == socket.gethostname() and pid_alive(controller.get("pid"), "pipeline")
    return True  # on Kubernetes the controller may run anywhere: wait for it, then act alone


@pipeline.command("cancel")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for a running controller to stop the run before doing it here.")
def cancel(config_path: Path, wait_s: float) -> None:
    """Stop the run cleanly: its current job or process is stopped and the run marked cancelled."""
    from p2r.controller.state import CANCELLED, FAILED, INTERRUPTED, PENDING, RUNNING, SUCCEEDED, now

    config, backend, store, state = _recorded(config_path)
    if state["status"] in (SUCCEEDED, FAILED, CANCELLED):
        click.echo(f"run {config.name} already {state['status']}; nothing to cancel")
        return
    store.request_cancel()
    if state["status"] == RUNNING and _controller_alive(config, state):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            state = store.load() or state
            if state["status"] != RUNNING:
                break
            time.sleep(0.5)
    if state["status"] in (RUNNING, INTERRUPTED, PENDING):  # no controller acted: do it here
        backend.cancel_detached(state)
        for record in state["steps"].values():
            if record["status"] == RUNNING:
                record.update(status=CANCELLED, finished=now(), error="cancelled by p2r pipeline cancel")
        state.update(status=CANCELLED, reason=f"cancelled at {state.get('current')}")
        store.save(state)
    click.echo(f"run {config.name} {state['status']}" + (f": {state['reason']}" if state.get("reason") else ""))

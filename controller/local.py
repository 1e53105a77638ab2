"""The local backend: every step is a process on this machine.

Role services are ``p2r serve`` processes on loopback ports (``launch.start_server``); roles that
serve the same model share one process and one engine (the frozen reasoner and the verifier both
run the base model in stage 1). Trainer and evaluation are ``p2r train`` / ``p2r eval`` child
processes; their output goes to ``WORKDIR/logs/STEP-attempt-N.log``.

Restart behaviour: trainer and eval children get ``PR_SET_PDEATHSIG`` so they die with a killed
controller, and the restarted controller reruns the stage with ``--resume auto`` (it continues
from its newest complete checkpoint). Server processes outlive a killed controller; their pid,
port and model are in the state, and a restarted controller adopts a server that still answers
``Admin.Status`` with the same roles and checkpoint instead of paying another engine start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from p2r.controller.config import PipelineConfig
from p2r.controller.graph import Context, StepFailed
from p2r.services.launch import ServerProc, start_server, stop_process
from p2r.trainer.state import METRICS

log = logging.getLogger("p2r.pipeline.local")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int | None, marker: str = "p2r.cli") -> bool:
    """True when ``pid`` runs and its command line contains ``marker`` (a recycled pid that now
    belongs to another program is not ours to adopt or kill)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return marker in cmdline and status != "Z"


def kill_pid(pid: int, timeout: float = 60) -> None:
    """SIGTERM, wait for the process to go, then SIGKILL (for processes that are not our children)."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] \
        if log_path.is_file() else []
    for line in reversed(lines):
        if "error" in line.lower():
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


class LocalBackend:
    name = "local"

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.workdir = config.workdir_path
        self.servers: dict[str, ServerProc] = {}  # service key -> process we started
        self.child: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------- services

    def _serve_config(self) -> Path:
        path = self.workdir / "serve.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config.serve))
        return path

    def _healthy(self, entry: dict[str, Any]) -> bool:
        if not pid_alive(entry.get("pid")):
            return False
        from p2r.services.client import Client

        try:
            with Client(entry["target"], timeout_s=10) as client:
                status = client.status()
        except Exception:
            return False
        return set(status.roles) == set(entry["roles"]) and status.checkpoint == entry["model"]

    def _start(self, ctx: Context, key: str, roles: list[str], model: str) -> dict[str, Any]:
        log.info("starting p2r serve %s on %s", " ".join(roles), model)
        cache = self.workdir / "cache" / "serve"
        try:
            server = start_server([*roles, "--model", model], env={"P2R_CHECKPOINT_CACHE": str(cache)},
                                  config=self._serve_config())
        except RuntimeError as e:
            raise StepFailed(f"p2r serve {' '.join(roles)} did not start: {str(e).strip().splitlines()[-1]}") \
                from None
        self.servers[key] = server
        entry = {"roles": roles, "model": model, "target": server.target, "pid": server.proc.pid,
                 "metrics_port": server.metrics_port}
        ctx.state["services"][key] = entry
        ctx.save()
        return entry

    def _stop(self, ctx: Context, key: str) -> None:
        entry = ctx.state["services"].pop(key, None)
        server = self.servers.pop(key, None)
        if server is not None:
            server.stop()
        elif entry is not None:
            kill_pid(entry["pid"])
        ctx.save()

    def _reap_strays(self, ctx: Context) -> None:
        """Stop servers of this workdir that the state does not know: a controller killed while
        a server was starting never recorded it."""
        known = {e["pid"] for e in ctx.state["services"].values()}
        marker = f"--config {self.workdir / 'serve.yaml'}"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in known or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "p2r.cli serve" in cmdline and marker in cmdline:
                log.warning("stopping stray p2r serve pid %s of this run", proc.name)
                kill_pid(int(proc.name))

    def serve(self, ctx: Context, models: dict[str, str]) -> dict[str, str]:
        self._reap_strays(ctx)
        by_model: dict[str, list[str]] = {}
        for role, model in models.items():
            by_model.setdefault(model, []).append(role)
        endpoints: dict[str, str] = {}
        for model, roles in by_model.items():
            key = "+".join(sorted(roles))
            entry = ctx.state["services"].get(key)
            if entry is not None and entry["model"] == model and self._healthy(entry):
                log.info("adopting running p2r serve %s (pid %d)", key, entry["pid"])
            else:
                # Any server holding one of these roles on another model goes first.
                for other, e in list(ctx.state["services"].items()):
                    if set(e["roles"]) & set(roles):
                        self._stop(ctx, other)
                entry = self._start(ctx, key, sorted(roles), model)
            endpoints.update({role: entry["target"] for role in roles})
        return endpoints

    def endpoint(self, ctx: Context, role: str) -> str:
        for key, entry in list(ctx.state["services"].items()):
            if role in entry["roles"]:
                if not self._healthy(entry):
                    log.warning("p2r serve %s is gone; starting it again", key)
                    self._stop(ctx, key)
                    entry = self._start(ctx, key, entry["roles"], entry["model"])
                return str(entry["target"])
        raise StepFailed(f"no {role} service recorded in the run state")

    def release(self, ctx: Context, keep: set[str]) -> None:
        for key, entry in list(ctx.state["services"].items()):
            if not set(entry["roles"]) & keep:
                log.info("stopping p2r serve %s (no later step needs it)", key)
                self._stop(ctx, key)

    # ---------------------------------------------------------------------------- work

    def train_workdir(self, stage: str) -> str:
        return str(self.workdir / stage)

    def _run(self, ctx: Context, args: list[str], what: str) -> tuple[str, Path]:
        """Run ``p2r ARGS`` as a child, polling for cancel; returns (stdout, log path)."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{ctx.step}-attempt-{ctx.attempt}.log"
        out_path = logs / f"{ctx.step}-attempt-{ctx.attempt}.out"
        stale = ctx.outputs(ctx.step).get("pid")
        if stale and pid_alive(stale, f"p2r.cli {what}"):  # a previous controller's child still running
            kill_pid(stale)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        with log_path.open("ab") as err, out_path.open("wb") as out:
            self.child = subprocess.Popen([sys.executable, "-m", "p2r.cli", what, *args], stdout=out, stderr=err,
                                          env=env, preexec_fn=_die_with_parent)
        ctx.record(pid=self.child.pid, log=str(log_path))
        deadline = time.monotonic() + (self.config.eval.timeout_s if what == "eval" else self.config.step_timeout_s)
        try:
            while self.child.poll() is None:
                if time.monotonic() > deadline:
                    raise StepFailed(f"p2r {what} ran past its timeout")
                ctx.sleep(1.0)
        finally:
            if self.child.poll() is None:
                self._stop_child()
        rc = self.child.returncode
        self.child = None
        if rc != 0:
            raise StepFailed(f"p2r {what} exited with {rc}: {_last_error(log_path)} (log: {log_path})")
        return out_path.read_text(), log_path

    def _stop_child(self) -> None:
        if self.child is not None:
            stop_process(self.child, timeout=30)

    def train(self, ctx: Context, stage: str, role: str, train_config: dict[str, Any]) -> dict[str, Any]:
        path = self.workdir / stage / "train.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in train_config.items()}))
        stdout, log_path = self._run(ctx, ["--role", role, "--config", str(path), "--resume", "auto"], "train")
        try:
            result = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise StepFailed(f"p2r train printed no result line (log: {log_path})") from None
        return {"checkpoint": result["checkpoint"], "steps": result["steps"], "param_digest": result["param_digest"],
                "config": str(path), "metrics": str(Path(train_config["workdir"]) / METRICS)}

    def evaluate(self, ctx: Context, args: list[str]) -> dict[str, Any]:
        _, log_path = self._run(ctx, args, "eval")
        return {"log": str(log_path)}

    def shutdown(self, ctx: Context, cancelled: bool) -> None:
        self._stop_child()
        self.child = None
        for key in list(ctx.state["services"]):
            self._stop(ctx, key)

    def cancel_detached(self, state: dict[str, Any]) -> None:
        """No controller alive: stop what a killed one left running (servers, a trainer)."""
        for entry in state.get("services", {}).values():
            kill_pid(entry.get("pid"))
        state["services"] = {}
        for record in state["steps"].values():
            if record["status"] == "running" and record["outputs"].get("pid"):
                kill_pid(record["outputs"]["pid"])

    def check_inputs(self, ctx: Context) -> dict[str, Any]:
        """Local inputs are checked when the config loads (or built by ``prepare``): nothing to wait for."""
        return {}

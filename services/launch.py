"""Starting ``p2r serve`` as a child process and waiting until it answers.

Used by the local pipeline, the benchmarks and the tests: the server prints one ready line
(``p2r serve ready: grpc=HOST:PORT metrics=PORT http=PORT``) once its model is loaded and its
health is SERVING, and that line is the handshake. Ports default to 0 (picked by the OS).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY = re.compile(r"p2r serve ready: grpc=(\S+) metrics=(\S+) http=(\S+)")
ADMIN = re.compile(r" admin=(\S+)")


@dataclass
class ServerProc:
    proc: subprocess.Popen[str]
    target: str
    metrics_port: int | None
    http_port: int | None
    log: list[str] = field(default_factory=list)
    admin_target: str | None = None
    """The admin port (``host:port``), where ``LoadCheckpoint`` is served; None when it is off."""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return stop_process(self.proc, sig, timeout)

    def rss(self) -> int:
        """Resident bytes of the server and all its descendants (vLLM's engine core runs in a
        child process), from /proc: what the server costs the machine."""
        return tree_rss(self.proc.pid)

    def peak_rss(self) -> int:
        """The server process's own peak resident bytes so far (VmHWM): what a burst cost it at
        its worst, even when the memory was handed back before anyone looked."""
        return proc_status_bytes(self.proc.pid, "VmHWM")


def proc_status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), in bytes; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc; vLLM's engine core is a child of the
    server)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def tree_rss(pid: int) -> int:
    """RSS bytes of ``pid`` and all its descendants (Linux /proc)."""
    return sum(proc_status_bytes(p, "VmRSS") for p in descendants(pid))


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Ask a child to stop (``sig``: servers drain, trainers save), kill it after ``timeout``
    seconds; returns its exit code. A child that already exited is left as it is."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode  # type: ignore[no-any-return]


def start_server(args: list[str], env: dict[str, str] | None = None, config: Path | None = None,
                 timeout: float = 240) -> ServerProc:
    """Run ``p2r serve ARGS...`` and return once it is ready (RuntimeError with its log if not)."""
    cmd = [sys.executable, "-m", "p2r.cli", "serve", *args, "--port", "0", "--metrics-port", "0",
           "--admin-port", "0"]
    if config is not None:
        cmd += ["--config", str(config)]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    log: list[str] = []
    found: list[re.Match[str]] = []
    admin: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            if not found and (m := READY.search(line)):
                found.append(m)
                admin.extend(a.group(1) for a in [ADMIN.search(line)] if a and a.group(1) != "None")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(log[-60:]))
        time.sleep(0.2)
    m = found[0]
    metrics_port = None if m.group(2) == "None" else int(m.group(2))
    http_port = None if m.group(3) == "None" else int(m.group(3))
    return ServerProc(proc, m.group(1), metrics_port, http_port, log, admin[0] if admin else None)

"""Pipeline state: which step, which checkpoint URIs, job names, attempts, times.

The state is one JSON document, saved after every transition, so a controller that is killed
and started again reads where the run was and continues: finished steps are skipped, a running
step is re-attached (Kubernetes: the job with the recorded name) or resumed (local: the trainer
restarts from its newest complete checkpoint). Cancellation is a separate flag, written by
``p2r pipeline cancel`` and only read by the controller, so the two never overwrite each other.

Stores: ``FileStore`` (local: ``WORKDIR/state.json`` written atomically, ``WORKDIR/cancel``) and,
in ``kube.py``, a ConfigMap.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
"""Step and run statuses. A run is ``running`` until it succeeds, fails (a step exhausted its
attempts) or is cancelled; ``interrupted`` marks a controller that stopped without cancelling."""
INTERRUPTED = "interrupted"


def now() -> float:
    return round(time.time(), 3)


def new_state(name: str, backend: str, steps: list[str]) -> dict[str, Any]:
    return {
        "name": name, "backend": backend, "status": PENDING, "reason": None, "created": now(), "updated": now(),
        "current": None, "controller": None, "services": {},
        "steps": {s: {"status": PENDING, "attempts": 0, "started": None, "finished": None, "error": None,
                      "next_attempt_at": None, "outputs": {}, "history": []} for s in steps},
    }


class Store(Protocol):
    """Where the state and the cancel flag live."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def request_cancel(self) -> None: ...

    def cancel_requested(self) -> bool: ...

    def clear_cancel(self) -> None: ...

    def describe(self) -> str: ...


class FileStore:
    """``state.json`` replaced atomically (write a temp file, fsync, rename): a crash mid-write
    leaves the previous state, never a torn one."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "state.json"
        self.cancel_path = workdir / "cancel"

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return json.loads(self.path.read_text())

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state["updated"] = now()
        tmp = self.path.with_name(f".state.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def request_cancel(self) -> None:
        self.cancel_path.parent.mkdir(parents=True, exist_ok=True)
        self.cancel_path.write_text(str(now()))

    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()

    def clear_cancel(self) -> None:
        self.cancel_path.unlink(missing_ok=True)

    def describe(self) -> str:
        return str(self.path)

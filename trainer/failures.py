"""One rank's failure stops the whole job within seconds, and every collective has a deadline
that fits its phase.

Without this a rank that raises leaves the others blocked in their next collective until the
process group's timeout (60 minutes), after which the job restarts, resumes and can hang again.
``JobWatch`` posts the failing rank and its error to the job's rendezvous store (the TCPStore
that ``init_process_group`` / torchrun already run); a thread on every rank polls that key and
ends its process (exit 1) as soon as it appears, logging which rank failed and why. A store that
stops answering means the rank hosting it is gone, which is a failure too - except while the
job is finishing normally, when ranks leave one by one.

Collectives get a per-phase timeout (``torch.distributed.set_timeout`` on the default group,
which FSDP's one-dimensional mesh uses): a step's collectives wait at most ``step_timeout_s``
(a rank can legitimately lag by one reward phase), a checkpoint's or a validation's at most
``checkpoint_timeout_s`` (uploads of tens of GiB).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("p2r.train")
FAILED_KEY = "p2r/failed-rank"
POLL_S = 0.5


def _stop_process(message: str) -> None:
    """End this process now: its main thread is blocked in a collective that will never end."""
    log.error(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


class JobWatch:
    """The failure channel and phase deadlines of one rank (module docstring)."""

    def __init__(self, rank: int, world: int, step_timeout_s: float, checkpoint_timeout_s: float) -> None:
        self.rank = rank
        self.timeouts = {"step": step_timeout_s, "checkpoint": checkpoint_timeout_s}
        self._finishing = threading.Event()
        self._stopped = threading.Event()
        self.store = dist.distributed_c10d._get_default_store() if world > 1 else None
        if self.store is not None:
            threading.Thread(target=self._watch, name="p2r-job-watch", daemon=True).start()

    def _watch(self) -> None:
        assert self.store is not None
        while not self._stopped.wait(POLL_S):
            try:
                failed = self.store.check([FAILED_KEY])
                if failed:
                    who = self.store.get(FAILED_KEY).decode(errors="replace")
                    _stop_process(f"rank {self.rank}: stopping, because {who}")
            except Exception as e:  # any store error means the job's store is gone
                if not self._finishing.is_set():
                    _stop_process(f"rank {self.rank}: stopping, the job's rendezvous store stopped answering "
                                  f"(the rank hosting it is gone): {type(e).__name__}: {e}")

    def fail(self, error: BaseException) -> None:
        """Tell every other rank that this one failed (they stop within ``POLL_S`` seconds)."""
        self._stopped.set()
        if self.store is None:
            return
        message = f"rank {self.rank} failed: {type(error).__name__}: {error}"
        log.error(message)
        try:
            self.store.set(FAILED_KEY, message[:4000])
        except Exception as e:  # the store is gone: the other ranks notice that instead
            log.error("rank %d: could not post the failure to the job's store (%s)", self.rank, e)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Collectives inside wait at most this phase's timeout."""
        if self.store is not None:
            dist.set_timeout(timedelta(seconds=self.timeouts[name]))
        yield

    def finish(self) -> None:
        """The job is ending normally: ranks leave one by one, so a silent store is no failure."""
        self._finishing.set()

    def stop(self) -> None:
        self._stopped.set()

"""Prometheus metrics of the pipeline controller (the Grafana pipeline dashboard reads these).

One label, ``step``, names a node of the step graph (``serve_reasoner``, ``stage1``, ...), so the
dashboard needs no per-step panels.
"""

from __future__ import annotations

from collections.abc import Iterator
from threading import Lock

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import InfoMetricFamily, Metric

# Steps run from seconds (tiny models) to days (GPU training).
_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)

STEP_DURATION = Histogram("p2r_pipeline_step_duration_seconds", "Wall time of a finished step attempt",
                          ["step", "outcome"], buckets=_BUCKETS)
CURRENT_STEP = Gauge("p2r_pipeline_current_step", "1 for the step the pipeline is running, else 0", ["step"])
STEP_ATTEMPTS = Gauge("p2r_pipeline_step_attempts", "Attempts made at a step in this run", ["step"])
STEP_FAILURES = Counter("p2r_pipeline_step_failures", "Failed step attempts", ["step"])
RUNS = Counter("p2r_pipeline_runs", "Pipeline runs that ended, by outcome", ["outcome"])
RUN_STATE = Gauge("p2r_pipeline_running", "1 while a pipeline run is in progress")


class _Checkpoints:
    """``p2r_checkpoint_info{role,deployment,uri}``: the checkpoint the controller made each
    role serve (the role servers export ``p2r_checkpoint_info{uri}`` for themselves). A custom
    collector that claims no name at registration: a process that also hosts a role server's
    metrics (the tests) would otherwise refuse the second ``p2r_checkpoint``."""

    def __init__(self) -> None:
        self._lock = Lock()
        self._served: dict[str, tuple[str, str]] = {}

    def set(self, role: str, deployment: str, uri: str) -> None:
        with self._lock:
            self._served[role] = (deployment, uri)

    def clear(self, role: str) -> None:
        with self._lock:
            self._served.pop(role, None)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            served = sorted(self._served.items())
        if served:
            family = InfoMetricFamily("p2r_checkpoint", "Checkpoint the pipeline made a role serve",
                                      labels=["role", "deployment"])
            for role, (deployment, uri) in served:
                family.add_metric([role, deployment], {"uri": uri})
            yield family


CHECKPOINTS = _Checkpoints()
REGISTRY.register(CHECKPOINTS)


def set_checkpoint(role: str, deployment: str, uri: str) -> None:
    CHECKPOINTS.set(role, deployment, uri)


def clear_checkpoint(role: str) -> None:
    CHECKPOINTS.clear(role)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the scrape endpoint in a background thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)

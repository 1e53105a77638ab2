"""How many CPUs this process may really use: the container's CPU quota, not the node's cores.

``os.sched_getaffinity`` reports every core of the node in a container without a cpuset
(96 of them on a 192-core node), while the pod may only *use* its quota (``limits.cpu`` -> the
cgroup's CFS quota). Sizing thread pools from the affinity mask there starts dozens of threads
that the quota throttles, which slows the engine loop beside them. So the quota wins when there
is one:

- cgroup v2: ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) of this process's cgroup
  and every ancestor (the tightest one applies);
- cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1`` = none) under the
  ``cpu`` controller's hierarchy;
- neither (no limit, not Linux): the affinity mask, else ``os.cpu_count()``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's ``cpu`` hierarchy (from
    ``/proc/self/cgroup``); ``"/"`` inside a cgroup namespace, as in most containers."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, path: str | None) -> list[Path]:
    """``root/path`` and each parent up to ``root`` itself (deepest first)."""
    parts = [p for p in (path or "/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(root: Path, path: str | None) -> float | None:
    quotas = []
    for directory in _ancestors(root, path):
        text = _read(directory / "cpu.max")
        if text is None:
            continue
        fields = text.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def _v1_quota(root: Path, path: str | None) -> float | None:
    quotas = []
    for hierarchy in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / hierarchy
        if not base.is_dir():
            continue
        for directory in _ancestors(base, path):
            quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
            try:
                q, p = int(quota or ""), int(period or "")
            except ValueError:
                continue
            if q > 0 and p > 0:
                quotas.append(q / p)
        if quotas:
            break
    return min(quotas) if quotas else None


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 4.0, 0.5), or None when unlimited."""
    v2_path, v1_path = _own_paths(proc_cgroup)
    quota = _v2_quota(cgroup_root, v2_path)
    return quota if quota is not None else _v1_quota(cgroup_root, v1_path)


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Whole CPUs this process can use: the cgroup quota (rounded up, at least 1) capped by the
    affinity mask; the affinity mask alone when there is no quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, proc_cgroup)
    if quota is None:
        return affinity
    return max(1, min(affinity, math.ceil(quota)))


def default_workers(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """``prepare_workers: 0``: half the usable CPUs (the engine's own threads take the other
    half on CPU; tokenisation and the event loop on GPU), at least 1."""
    return max(1, usable_cpus(cgroup_root, proc_cgroup) // 2)

"""``prepare_workers: 0`` sizing: the container's CPU quota (cgroup v2 ``cpu.max``, v1 CFS quota),
falling back to the affinity mask - read from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2r.services.cpus import cpu_quota, default_workers, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_v2_quota_in_a_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a cgroup namespace the pod's cgroup is the root: ``cpu.max`` there."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(192)))  # a 192-core node
    root, proc = _v2(tmp_path, "/", {"cpu.max": "400000 100000"})
    assert cpu_quota(root, proc) == 4.0
    assert usable_cpus(root, proc) == 4
    assert default_workers(root, proc) == 2  # half of the quota, not 96


def test_cgroup_v2_tightest_ancestor_and_fractions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    root, proc = _v2(tmp_path, "/kubepods/pod1/ctr", {
        "cpu.max": "max 100000",
        "kubepods/cpu.max": "800000 100000",
        "kubepods/pod1/cpu.max": "250000 100000",   # 2.5 CPUs: the pod's limit
        "kubepods/pod1/ctr/cpu.max": "max 100000",
    })
    assert cpu_quota(root, proc) == 2.5
    assert usable_cpus(root, proc) == 3  # rounded up
    root, proc = _v2(tmp_path / "half", "/", {"cpu.max": "50000 100000"})
    assert usable_cpus(root, proc) == 1 and default_workers(root, proc) == 1  # never 0


def test_cgroup_v1_cfs_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(192)))
    root = tmp_path / "cgroup"
    ctr = root / "cpu,cpuacct" / "kubepods" / "pod2"
    ctr.mkdir(parents=True)
    (ctr / "cpu.cfs_quota_us").write_text("600000\n")
    (ctr / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: unlimited
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:memory:/kubepods/pod2\n4:cpu,cpuacct:/kubepods/pod2\n")
    assert cpu_quota(root, proc) == 6.0
    assert default_workers(root, proc) == 3


def test_no_quota_falls_back_to_affinity(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {"cpu.max": "max 100000"})
    assert cpu_quota(root, proc) is None
    assert usable_cpus(root, proc) == AFFINITY
    assert usable_cpus(tmp_path / "absent", tmp_path / "absent-proc") == AFFINITY  # not Linux cgroups at all
    assert default_workers(root, proc) == max(1, AFFINITY // 2)
    # A quota above the cores the process may run on is capped by the affinity mask.
    root, proc = _v2(tmp_path / "big", "/", {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000"})
    assert usable_cpus(root, proc) == AFFINITY


def test_garbage_files_are_ignored(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {"cpu.max": "lots 100000"})
    assert cpu_quota(root, proc) is None

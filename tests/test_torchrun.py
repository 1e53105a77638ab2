"""Training launched as users launch it on one node (``torchrun --nproc_per_node 2``, gloo on
CPU) and as a PyTorchJob's pods launch it (one process each, ``WORLD_SIZE``/``RANK`` only): the
colocated engines under vLLM's external launcher, an uneven data set, and a rank that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_trainer import ROOT, _free_port, metrics, write_config

pytestmark = pytest.mark.engine


def _results(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"checkpoint"')]


def test_torchrun_two_ranks_on_an_uneven_data_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    """7 samples over 2 ranks: shards of 4 and 3 before padding, so without even shards rank 0
    takes a second step while rank 1 saves, and both hang. Each rank's engine samples its own
    prompts with its own seed, and after the push both engines hold the trained weights: their
    log-probs of the next rollouts equal the policy's."""
    from p2r.data.dataset import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, 7)
    config = write_config(
        tmp_path / "torchrun.yaml", role="perceiver", model=tiny_model_dir, data=data / "train.parquet",
        val_data=data / "train.parquet", val_before_train=False, val_batch_size=2,
        output=tmp_path / "out", workdir=tmp_path / "work", reward_plugin="tests.plugins:starts_with_digit",
        rollouts_per_prompt=4, prompts_per_step=4, learning_rate=0.005, kl_coef=0.01, max_response_tokens=4,
        dump_rollouts_every=1, seed=3)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "p2r.cli", "train", "--config", str(config), "--role", "perceiver"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = _results(out.stdout)
    assert len(results) == 2, out.stdout
    assert [r["steps"] for r in results] == [2, 2]  # 8 padded samples, 2 per rank per step
    assert results[0]["param_digest"] == results[1]["param_digest"]

    rows = metrics(tmp_path / "work")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["rollouts"] == 8 for r in steps)
    # Validation at the last step, over every sample once (7 across the two engines, in chunks of 2).
    assert [(r["step"], r["val/samples"]) for r in rows if "val/samples" in r] == [(2, 7)]
    # The engines' log-probs of step 2's rollouts (sampled after the first push) equal the
    # trained policy's on every rank (the max is over both ranks). What remains is the engine's
    # ban on vision tokens (~4 of the tiny vocabulary's mass, ~2.4e-3). A stale engine would be
    # off by the step's change itself: |delta log p| ~ sqrt(2 KL) to the untrained policy (~0.3).
    assert steps[1]["rollout_logprob_diff_max"] < 0.01, steps[1]
    assert steps[1]["rollout_logprob_diff_mean"] < 0.1 * (2 * steps[1]["kl"]) ** 0.5, steps[1]

    dumps = {rank: [json.loads(line) for line in (tmp_path / "work" / "rollouts" / f"step-1.rank{rank}.jsonl")
                    .read_text().splitlines()] for rank in (0, 1)}
    assert {d["index"] for d in dumps[0]}.isdisjoint({d["index"] for d in dumps[1]})
    assert [d["response"] for d in dumps[0]] != [d["response"] for d in dumps[1]]

    from transformers import Qwen3VLForConditionalGeneration

    from p2r.trainer.actor import params_digest

    untrained = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert params_digest(untrained) != results[0]["param_digest"]


def _wait_for(path: Path, text: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"{path.name} never said {text!r}:\n{path.read_text(errors='replace')[-3000:]}")


def test_a_failing_rank_stops_every_rank(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> None:
    """Two pods' processes (no torchrun agent to kill the survivor): rank 1 raises at step 2 while
    rank 0 waits in the update's collectives; both exit non-zero within seconds, and rank 0's
    log names rank 1 and its error."""
    config = write_config(
        tmp_path / "fail.yaml", role="perceiver", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "out", workdir=tmp_path / "work", reward_plugin="tests.plugins:fails_on_rank_1_at_step_2",
        rollouts_per_prompt=4, prompts_per_step=4, max_response_tokens=4, epochs=3)
    port = str(_free_port())
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    procs = []
    for rank in (0, 1):
        with logs[rank].open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "p2r.cli", "train", "--config", str(config), "--role", "perceiver"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "WORLD_SIZE": "2", "RANK": str(rank),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "P2R_TEST_CALLS_PER_STEP": "8"}))
    try:
        failed_at = _wait_for(logs[1], "injected failure on rank 1 at step 2", time.monotonic() + 540)
        exits = {}
        while len(exits) < 2 and time.monotonic() < failed_at + 60:
            for rank, p in enumerate(procs):
                if rank not in exits and p.poll() is not None:
                    exits[rank] = time.monotonic() - failed_at
            time.sleep(0.2)
        assert sorted(exits) == [0, 1], f"still running 60 s after the failure: {exits}"
        assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
        survivor = logs[0].read_text(errors="replace")
        assert "rank 1 failed: RuntimeError: injected failure on rank 1 at step 2" in survivor, survivor[-3000:]
        assert "step 1 reward" in survivor  # it did get past step 1: the failure was mid-run
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_tensor_parallel_rollouts_span_two_ranks(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> None:
    """``rollout_tensor_parallel_size: 2`` on 2 ranks: one engine sharded over both, fed the same
    prompts with the same seed, each rank updating on half of the groups. Its log-probs equal the
    policy's at step 1 and again at step 2, after the push reached both shards (a shard left
    stale, or ranks sampling different tokens into the one forward, gave a gap of ~0.07 mean)."""
    config = write_config(
        tmp_path / "tp.yaml", role="perceiver", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "out", workdir=tmp_path / "work", reward_plugin="tests.plugins:starts_with_digit",
        rollouts_per_prompt=4, prompts_per_step=4, learning_rate=0.005, kl_coef=0.01, max_response_tokens=4,
        epochs=2, rollout_tensor_parallel_size=2, dump_rollouts_every=1)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "p2r.cli", "train", "--config", str(config), "--role", "perceiver", "--max-steps", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["steps"] for r in _results(out.stdout)] == [2, 2]
    steps = [r for r in metrics(tmp_path / "work") if "loss" in r]
    assert [r["rollouts"] for r in steps] == [8, 8]  # rank 0's half of the engine's 4 prompts x 4
    for row in steps:
        assert row["rollout_logprob_diff_max"] < 0.01, row
        assert row["rollout_logprob_diff_mean"] < 0.1 * (2 * steps[1]["kl"]) ** 0.5, row
    # One engine, so its two ranks took disjoint halves of the same 4 prompts.
    halves = [{json.loads(line)["index"] for line in (tmp_path / "work" / "rollouts" / f"step-1.rank{rank}.jsonl")
               .read_text().splitlines()} for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 2 and halves[0].isdisjoint(halves[1])

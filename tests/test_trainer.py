"""PRA-GRPO stages end to end: learning with a plug-in reward, both stages against real role
services, and resume after SIGKILL (multi-rank runs: tests/test_torchrun.py)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2r.services.checkpoints import MANIFEST, complete_checkpoints
from p2r.services.launch import ServerProc

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, **values: Any) -> Path:
    base = {"max_pixels": 65536, "max_model_len": 2048, "kv_cache_gib": 1, "save_every": 1000,
            "reward_batch_size": 16, "reward_concurrency": 2}
    path.write_text(yaml.safe_dump({**base, **{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}}))
    return path


def train(config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "p2r.cli", "train", "--config", str(config), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def metrics(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_learning_with_a_plugin_reward(tmp_path: Path, tiny_model_dir: Path, synthetic_dir: Path) -> None:
    """Advantages, loss and weight sync working together: the mean reward rises clearly."""
    config = write_config(
        tmp_path / "learn.yaml", role="perceiver", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "out", workdir=tmp_path / "work", reward_plugin="tests.plugins:starts_with_digit",
        rollouts_per_prompt=8, prompts_per_step=4, learning_rate=0.005, kl_coef=0.0, max_response_tokens=2,
        epochs=100, seed=0, micro_batch_size=8, gradient_checkpointing=False)  # speed: both tested elsewhere
    result = train(config, "--role", "perceiver", "--max-steps", "30")
    rows = metrics(tmp_path / "work")
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2 and last > 0.85, [r["reward_mean"] for r in rows]
    assert result["checkpoint"].endswith("step-30")
    assert (tmp_path / "out" / "step-30" / MANIFEST).is_file()


def test_perceiver_stage_against_live_services(tmp_path: Path, role_server: ServerProc, tiny_model_dir: Path,
                                               synthetic_dir: Path) -> None:
    from p2r.services.client import Client

    config = write_config(
        tmp_path / "stage1.yaml", role="perceiver", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "stage1", workdir=tmp_path / "work1", reasoner_endpoint=role_server.target,
        verifier_endpoint=role_server.target, rollouts_per_prompt=4, prompts_per_step=3, learning_rate=1e-4,
        max_response_tokens=16, frozen_max_tokens=8, seed=1)
    result = train(config, "--role", "perceiver", "--max-steps", "2")
    rows = metrics(tmp_path / "work1")
    assert len(rows) == 2
    for r in rows:
        assert r["rollouts"] == 12 and r["kept"] + r["dropped"] == 12 and r["dropped"] == 0
        assert r["service_calls"] >= 1 and 0.0 <= r["reward_mean"] <= 1.0
        assert "bbox_count" in r and r["kl"] >= 0.0
    # The checkpoint is loaded back by the services, no conversion step.
    with Client(role_server.target, admin_target=role_server.admin_target) as client:
        assert client.load_checkpoint(result["checkpoint"]).uri == result["checkpoint"]
        client.load_checkpoint(str(tiny_model_dir))


def test_reasoner_stage_calls_the_perceiver_once_per_sample(tmp_path: Path, role_server: ServerProc,
                                                            tiny_model_dir: Path, synthetic_dir: Path) -> None:
    config = write_config(
        tmp_path / "stage2.yaml", role="reasoner", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=tmp_path / "stage2", workdir=tmp_path / "work2", perceiver_endpoint=role_server.target,
        verifier_endpoint=role_server.target, rollouts_per_prompt=2, prompts_per_step=3, learning_rate=1e-4,
        max_response_tokens=8, frozen_max_tokens=8, epochs=2, seed=2)
    result = train(config, "--role", "reasoner")
    rows = metrics(tmp_path / "work2")
    assert len(rows) == 4  # 6 samples, 3 per step, 2 epochs
    assert rows[-1]["perceiver_calls"] == 6  # each sample asked once, though seen twice
    assert [s for s, _ in complete_checkpoints(str(tmp_path / "stage2"))] == [4]
    assert result["steps"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Payload:
    """Pickled, this runs ``touch marker`` when loaded: what a replaced state file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_sigkill_then_resume_auto_refusing_tampered_state(tmp_path: Path, tiny_model_dir: Path,
                                                          synthetic_dir: Path) -> None:
    """SIGKILL mid-run, a torn upload beside the checkpoints. A copy of the last complete
    checkpoint whose ``trainer_state.json`` or ``train_state/.metadata`` was replaced by a pickle
    payload, with its manifest regenerated (so it verifies), is refused on resume with one line
    naming the file, exit 2, the payload never runs and metrics.jsonl is untouched. ``--resume
    auto`` then skips the torn uploads, continues from the last complete step, and drops the
    killed run's metric rows past it, so every step appears once."""
    import shutil

    from p2r.services.checkpoints import write_manifest

    output, work = tmp_path / "out", tmp_path / "work"
    config = write_config(
        tmp_path / "resume.yaml", role="perceiver", model=tiny_model_dir, data=synthetic_dir / "train.parquet",
        output=output, workdir=work, reward_plugin="tests.plugins:starts_with_digit", rollouts_per_prompt=4,
        prompts_per_step=2, learning_rate=0.005, kl_coef=0.0, max_response_tokens=2, save_every=2, epochs=100)
    proc = subprocess.Popen([sys.executable, "-m", "p2r.cli", "train", "--config", str(config), "--role", "perceiver",
                             "--max-steps", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    deadline = time.monotonic() + 300
    while not (output / "step-4" / MANIFEST).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "training did not reach step 4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # An upload interrupted halfway: weights there, manifest never written.
    (output / "step-98").mkdir()
    (output / "step-98" / "model.safetensors").write_bytes(b"half")
    # And the newest checkpoint's own upload torn too: the run resumes from the one before it,
    # so the killed run's metric rows past that step certainly exist (and must go).
    newest = max(s for s, _ in complete_checkpoints(str(output)))
    (output / f"step-{newest}" / MANIFEST).unlink()
    done = max(s for s, _ in complete_checkpoints(str(output)))
    assert done == newest - 2 >= 2 and max(r["step"] for r in metrics(work)) > done
    last = output / f"step-{done}"
    assert (last / "trainer_state.json").is_file() and not (last / "trainer_state.pt").exists()

    rows_before = metrics(work)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    for replaced in ("trainer_state.json", "train_state/.metadata"):
        bad = tmp_path / f"tampered-{replaced.replace('/', '-')}" / last.name
        shutil.copytree(last, bad)
        (bad / replaced).write_bytes(payload)
        (bad / MANIFEST).unlink()
        write_manifest(bad, step=done, role="perceiver")  # what someone with write access would do
        out = subprocess.run([sys.executable, "-m", "p2r.cli", "train", "--config", str(config), "--role",
                              "perceiver", "--max-steps", str(done + 1), "--resume", str(bad)], capture_output=True,
                             text=True, timeout=600, cwd=ROOT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        last_line = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and last_line.startswith("p2r: error: ") and replaced in last_line, \
            out.stderr[-2000:]
        assert "refused" in last_line and not marker.exists()
    assert metrics(work) == rows_before  # a refused resume changes nothing

    result = train(config, "--role", "perceiver", "--max-steps", str(done + 1), "--resume", "auto")
    assert result["steps"] == done + 1
    # Continued, not restarted; the killed run's rows past the resumed step are gone: every
    # step appears once.
    assert [r["step"] for r in metrics(work)] == list(range(1, done + 2))
    assert [s for s, _ in complete_checkpoints(str(output))][-1] == done + 1


def test_unreachable_reasoner_drops_samples_instead_of_scoring_zero(synthetic_dir: Path) -> None:
    """A reasoner that goes away after start-up: its samples are dropped (None), never scored 0;
    within ``max_dropped_fraction`` the step goes on (past it, tests/test_reward_pressure.py)."""
    from p2r.data.dataset import load_samples
    from p2r.trainer.config import TrainConfig
    from p2r.trainer.rewards import PerceiverReward
    from tests.grpc_support import loopback_server

    cfg = TrainConfig(role="perceiver", model="m", data=synthetic_dir / "train.parquet", output="o",
                      reasoner_endpoint="127.0.0.1:0", reward_retries=1, service_timeout_s=2,
                      max_dropped_fraction=1.0)
    with loopback_server() as target:  # reachable at start-up (no Status: limits as configured)
        reward = PerceiverReward(cfg.model_copy(update={"reasoner_endpoint": target}))
    samples = load_samples(synthetic_dir / "train.parquet")[:2]
    replies = [['[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]', '[{"bbox_2d": [1, 2, 3, 4]}]'],
               ["[]", '[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]']]
    rewards, stats = reward(samples, replies)
    # the unlabelled box is penalised without any call; everything else needed the reasoner
    assert rewards == [[None, 0.0], [None, None]]
    assert stats.dropped == 3 and stats.penalised == 1 and stats.service_calls == 1
    assert stats.failures and target in stats.failures[0] and "UNAVAILABLE" in stats.failures[0]


def test_overlong_prompts_filtered_and_validation_every_n_steps(tmp_path: Path, tiny_model_dir: Path,
                                                               synthetic_dir: Path) -> None:
    """A data set with over-long prompts trains on the rest (dropped at load and counted);
    validation runs before training and every ``val_every`` steps, with per-source and per-form
    accuracy; rollout dumps land every ``dump_rollouts_every`` steps."""
    from transformers import AutoTokenizer

    from p2r.core.images import MIN_PIXELS, PixelBounds
    from p2r.data.dataset import load_samples
    from p2r.trainer.lengths import PromptCounter

    data = synthetic_dir / "train.parquet"
    counter = PromptCounter(AutoTokenizer.from_pretrained(tiny_model_dir), 32)
    counts = sorted(counter.sample_tokens(s, "perceiver", PixelBounds(MIN_PIXELS, 65536)) for s in load_samples(data))
    limit = counts[len(counts) // 2]
    over = sum(n > limit for n in counts)
    assert 0 < over < len(counts)
    config = write_config(
        tmp_path / "val.yaml", role="perceiver", model=tiny_model_dir, data=data, val_data=data, val_every=2,
        output=tmp_path / "out", workdir=tmp_path / "work", reward_plugin="tests.plugins:starts_with_digit",
        rollouts_per_prompt=2, prompts_per_step=2, learning_rate=1e-4, max_response_tokens=4, max_prompt_tokens=limit,
        epochs=100, dump_rollouts_every=2)
    train(config, "--role", "perceiver", "--max-steps", "4")
    rows = metrics(tmp_path / "work")
    val = [r for r in rows if "val/accuracy" in r]
    steps = [r for r in rows if "val/accuracy" not in r]
    assert [r["step"] for r in val] == [0, 2, 4]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in val:
        assert r["val/samples"] == len(counts) - over and 0.0 <= r["val/accuracy"] <= 1.0
        assert any(k.startswith("val/accuracy/source/") for k in r)
        assert any(k.startswith("val/accuracy/form/") for k in r)
    assert all(r["overlong_dropped"] == over for r in steps)
    dumps = sorted(p.name for p in (tmp_path / "work" / "rollouts").iterdir())
    assert dumps == ["step-2.rank0.jsonl", "step-4.rank0.jsonl"]
    lines = [json.loads(x) for x in (tmp_path / "work" / "rollouts" / "step-2.rank0.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"index", "response", "bbox_count", "reward", "dropped"} <= set(lines[0])

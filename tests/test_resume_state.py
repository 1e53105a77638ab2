"""The trainer's resume state without pickle (trainer/state.py): JSON trainer state that restores
the scheduler and every RNG exactly, DCP train state read through the restricted reader, pickle
payloads refused before they run, and metrics.jsonl trimmed to the resumed step."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from p2r.services.checkpoints import CheckpointError
from p2r.trainer.state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    PositionState,
    SafeFileSystemReader,
    SafeLoadPlanner,
    TrainerState,
    capture_rng,
    check_train_state,
    read_state,
    restore_rng,
    trim_metrics,
    write_state,
)


class _Payload:
    """A pickle that, when loaded, creates ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _draws() -> tuple[list[float], float, list[float]]:
    return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist()


def _optimiser() -> tuple[torch.nn.Linear, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def test_json_state_restores_scheduler_and_rng_exactly(tmp_path: Path) -> None:
    _, opt, sched = _optimiser()
    for _ in range(3):
        opt.step()
        sched.step()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    _draws()
    write_state(tmp_path, TrainerState(position=PositionState(step=3, epoch=1, offset=2),
                                       scheduler=sched.state_dict(), rng=capture_rng(), world_size=2,
                                       skipped_steps=1))
    expected = _draws()
    expected_lr = [sched.get_last_lr()]
    opt.step()
    sched.step()
    expected_lr.append(sched.get_last_lr())

    assert not (tmp_path / LEGACY_STATE_FILE).exists()
    json.loads((tmp_path / STATE_FILE).read_text())  # plain JSON on disk
    state = read_state(tmp_path)
    assert state.position == PositionState(step=3, epoch=1, offset=2) and state.skipped_steps == 1
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(state.rng)
    assert _draws() == expected
    _, opt2, sched2 = _optimiser()
    sched2.load_state_dict(state.scheduler)
    assert [sched2.get_last_lr()] == expected_lr[:1]
    opt2.step()
    sched2.step()
    assert sched2.get_last_lr() == expected_lr[1]


def test_pickle_in_place_of_the_state_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: not a JSON trainer state \(it is a pickle\)"):
        read_state(tmp_path)
    (tmp_path / STATE_FILE).unlink()
    (tmp_path / LEGACY_STATE_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"holds only trainer_state\.pt, a pickle this trainer never loads"):
        read_state(tmp_path)
    assert not marker.exists()
    # Well-formed JSON with a wrong value names the field.
    good = TrainerState(position=PositionState(step=1, epoch=0, offset=1), scheduler={}, rng=capture_rng(),
                        world_size=1).model_dump(mode="json")
    good["position"]["step"] = "2; rm -rf /"
    (tmp_path / STATE_FILE).write_text(json.dumps(good))
    with pytest.raises(CheckpointError, match=r"field 'position\.step'"):
        read_state(tmp_path)
    good["position"]["step"], good["extra"] = 2, 1
    (tmp_path / STATE_FILE).write_text(json.dumps(good))
    with pytest.raises(CheckpointError, match="field 'extra'"):
        read_state(tmp_path)


def test_dcp_train_state_roundtrip_and_tampered_metadata(tmp_path: Path) -> None:
    """Model and AdamW state (tensors and param_groups) come back exactly through the safe
    reader; a pickle payload in ``.metadata`` is refused by name and never runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, _ = _optimiser()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    directory = tmp_path / "train_state"
    dcp.save({"model": model_sd, "optimiser": optim_sd}, checkpoint_id=str(directory), no_dist=True)
    check_train_state(directory)

    model2, opt2, _ = _optimiser()
    with torch.no_grad():
        model2.weight.add_(1.0)
    state = dict(zip(("model", "optimiser"), get_state_dict(model2, opt2), strict=True))
    dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(), no_dist=True)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optimiser"])
    torch.testing.assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for key, value in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][key], value, rtol=0, atol=0)

    marker = tmp_path / "ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: not torch.distributed.checkpoint metadata, refused"):
        check_train_state(directory)
    with pytest.raises(CheckpointException, match=r"'posix\.system' is not DCP metadata"):
        dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(),
                 no_dist=True)
    assert not marker.exists()


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    """Steps 1..6 written, resume at 4: rows 5 and 6 (and a torn last line) go, the step-4
    validation row stays; after the resumed run writes 5..7 every step appears once."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 0.1 * s} for s in range(1, 7)]
    rows.insert(4, {"step": 4, "val/accuracy": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    assert trim_metrics(path, 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4] and kept[-1] == {"step": 4, "val/accuracy": 0.5}
    with path.open("a") as f:
        for s in (5, 6, 7):
            f.write(json.dumps({"step": s}) + "\n")
    steps = [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "val/accuracy" not in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert trim_metrics(path, 7) == 0 and trim_metrics(tmp_path / "absent.jsonl", 3) == 0

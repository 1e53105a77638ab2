"""The trainer's resume state without pickle (trainer/state.py): JSON trainer state that restores
the scheduler and every RNG exactly, DCP train state read through the restricted reader, pickle
payloads refused before they run, and metrics.jsonl trimmed to the resumed step."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2r.services.checkpoints import CheckpointError
from p2r.trainer.dcp_reader import SafeFileSystemReader, SafeLoadPlanner, check_train_state
from p2r.trainer.state import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    PositionState,
    TrainerState,
    capture_rng,
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


def _state_json() -> dict[str, Any]:
    """A valid ``trainer_state.json`` as the trainer writes it (``write_state``), as JSON values."""
    _, _, sched = _optimiser()
    return TrainerState(position=PositionState(step=1, epoch=0, offset=1), scheduler=sched.state_dict(),
                        rng=capture_rng(), world_size=1).model_dump(mode="json", by_alias=True, exclude_none=True)


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
    sched2.load_state_dict(state.scheduler.state_dict())
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
    good = _state_json()
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


# ----------------------------------------------------------- tampered train state (issue 25)


def saved_train_state(directory: Path) -> Path:
    """``train_state/`` as the trainer writes it (``Actor.save_train_state``: ``dcp.save`` of
    the model and AdamW state dicts), for a small model after one step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, _ = _optimiser()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimiser": optim_sd}, checkpoint_id=str(directory), no_dist=True)
    return directory


def rewrite_storage(directory: Path, relative_path: str) -> None:
    """Point every storage item of ``.metadata`` at ``relative_path`` (what someone who can write
    the checkpoint, and regenerate its manifest, can do)."""
    import dataclasses

    metadata = pickle.loads((directory / ".metadata").read_bytes())  # our own file, just written
    metadata.storage_data = {k: dataclasses.replace(v, relative_path=relative_path)
                             for k, v in metadata.storage_data.items()}
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def load_into_fresh_state(directory: Path) -> None:
    """What ``Actor.load_train_state`` does, on a fresh model and optimiser."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from p2r.trainer.dcp_reader import load_train_state

    state = dict(zip(("model", "optimiser"), get_state_dict(*_optimiser()[:2]), strict=True))
    load_train_state(state, directory, no_dist=True)


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_dcp_reads_are_confined_to_the_train_state_directory(how: str, tmp_path: Path) -> None:
    """Issue 25 item 3: a ``relative_path`` of ``../../../outside/x.distcp`` (a real shard there,
    so stock DCP loads it and resumes), an absolute path, or a symlink out of the directory is
    refused by name from ``.metadata`` alone, before any shard is read."""
    directory = saved_train_state(tmp_path / "a" / "ckpt" / "train_state")
    outside = tmp_path / "outside" / "x.distcp"
    outside.parent.mkdir()
    shard = next(directory.glob("*.distcp"))
    outside.write_bytes(shard.read_bytes())
    if how == "relative":
        path, named = os.path.relpath(outside, directory), r"key '\.\./\.\./\.\./outside/x\.distcp' is not a safe"
    elif how == "absolute":
        path, named = str(outside), f"key '{outside}' is not a safe relative path"
    else:
        (directory / "link.distcp").symlink_to(outside)
        path, named = "link.distcp", f"key 'link.distcp' resolves outside {directory}"
    rewrite_storage(directory, path)
    with pytest.raises(CheckpointError, match=rf"\.metadata: storage item '.+' relative_path: {named}"):
        check_train_state(directory)
    with pytest.raises(CheckpointError, match=named):
        load_into_fresh_state(directory)


def test_a_truncated_or_corrupt_shard_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    """Issue 25 item 11: a shard cut short is refused from ``.metadata`` and the file's size,
    before anything is read; one of the right size holding garbage fails while it is read - both
    a CheckpointError naming the file (was: torch's RuntimeError inside a CheckpointException)."""
    directory = saved_train_state(tmp_path / "train_state")
    load_into_fresh_state(directory)  # intact: loads
    shard = next(directory.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated: storage item '.+' needs bytes up to \d+, "
                                              rf"the file has {len(data) // 2}"):
        check_train_state(directory)
    shard.write_bytes(bytes(len(data)))
    check_train_state(directory)  # the sizes agree: caught while reading
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable train-state shard \(\w+Error: "):
        load_into_fresh_state(directory)


def _tamper(path: str, value: Any) -> Any:
    def change(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = state
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


TAMPERED_STATES = {
    # name -> (change to a valid trainer_state.json, the field its error names)
    "garbage scheduler key": (_tamper("scheduler.garbage", 1), "scheduler.garbage"),
    "base_lrs NaN string": (_tamper("scheduler.base_lrs.0", "NaN-string"), "scheduler.base_lrs.0"),
    "base_lrs NaN": (_tamper("scheduler.base_lrs.0", float("nan")), "scheduler.base_lrs.0"),
    "negative last lr": (_tamper("scheduler._last_lr.0", -1.0), "scheduler._last_lr.0"),
    "lr_lambdas dict": (_tamper("scheduler.lr_lambdas.0", {"__code__": 1}), "scheduler.lr_lambdas.0"),
    "step 10**30": (_tamper("position.step", 10**30), "position.step"),
    "RNG word over 32 bits": (_tamper("rng.python.1.0", 2**40), "rng.python.1.0"),
    "RNG gauss inf": (_tamper("rng.numpy.4", float("inf")), "rng.numpy.4"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_STATES))
def test_trainer_state_has_a_closed_schema(case: str, tmp_path: Path) -> None:
    """Issue 25 item 11: unknown keys, strings or NaN where numbers go, and numbers out of range
    were resumed (or crashed the seeding); each is refused naming the field."""
    change, field = TAMPERED_STATES[case]
    state = _state_json()
    change(state)
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"trainer_state\.json: field '{re.escape(field)}'"):
        read_state(tmp_path)


def test_an_oversized_trainer_state_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps(_state_json()) + " " * (1 << 20))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: over 1048576 bytes"):
        read_state(tmp_path)

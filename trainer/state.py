"""The trainer's resume state, read without running anything a checkpoint file says.

A checkpoint is data from object storage; whoever can write there must not be able to run code
in the trainer, nor steer it with values no run writes. ``torch.load(weights_only=False)`` and
``pickle.load`` run code (a pickle calls whatever callable it names), and a manifest
regenerated next to the replaced file does not help. So ``trainer_state.json`` holds the data
position, the LR scheduler, the RNG states and the counters as JSON, checked against a closed
schema (``TrainerState``): every key known (an extra or misspelt one is refused), every number
finite and in range (a step of 10**30 used to crash the seeding; ``base_lrs: ['NaN-string']``
was resumed), each error naming the field. Anything that is not such JSON - a pickle, the old
``trainer_state.pt`` - is refused with a ``CheckpointError``, never unpickled.

``train_state/`` (fp32 model and AdamW shards) is read by trainer/dcp_reader.py.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from p2r.services.checkpoints import CheckpointError

STATE_FILE = "trainer_state.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle: never read
STATE_VERSION = 1


MAX_STATE_BYTES = 1 << 20
"""A trainer state is a few KiB (the RNG states dominate); a larger file is not one, unread."""
MAX_COUNT = 10**12
"""The bound on steps, epochs, offsets and counters: far past any run, and small enough that the
seeds derived from the step (``seed + 1000 * step``) stay inside the 64-bit range torch, NumPy
and vLLM take."""

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A word of a Mersenne Twister state (Python's and NumPy's generators)."""
LearningRate = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    """Closed (unknown keys refused), strict (no coercion from strings) and finite (no NaN or
    infinity in any float)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PositionState(_Strict):
    step: Count
    epoch: Count
    offset: Count


class SchedulerState(_Strict):
    """``LambdaLR.state_dict()`` (trainer/actor.py's scheduler), field by field. ``lr_lambdas``
    holds only None: a dict there would be copied into the lambda's ``__dict__`` on load."""

    base_lrs: list[LearningRate] = Field(max_length=1024)
    last_lr: list[LearningRate] = Field(alias="_last_lr", max_length=1024)
    last_epoch: int = Field(ge=-1, le=MAX_COUNT)
    step_count: Count = Field(alias="_step_count")
    is_initial: bool | None = Field(None, alias="_is_initial")
    get_lr_called_within_step: bool = Field(alias="_get_lr_called_within_step")
    verbose: bool | None = None
    lr_lambdas: list[None] = Field(max_length=1024)

    def state_dict(self) -> dict[str, Any]:
        """What ``LambdaLR.load_state_dict`` takes (the keys this torch wrote, no others)."""
        return self.model_dump(by_alias=True, exclude_none=True) | {"lr_lambdas": list(self.lr_lambdas)}


class RNGState(_Strict):
    torch: str = Field(max_length=1 << 16, description="torch.get_rng_state(), base64")
    cuda: list[Annotated[str, Field(max_length=1 << 12)]] = Field(
        default_factory=list, max_length=1024, description="torch.cuda.get_rng_state_all(), base64 each")
    python: tuple[Annotated[int, Field(ge=0, le=16)], list[U32], float | None] = Field(
        description="random.getstate()")
    numpy: tuple[str, list[U32], Annotated[int, Field(ge=0, le=1 << 16)], Annotated[int, Field(ge=0, le=1)], float] \
        = Field(description="np.random.get_state()")


class TrainerState(_Strict):
    """Everything a resume restores besides the DCP shards (``trainer_state.json``)."""

    version: int = STATE_VERSION
    position: PositionState
    scheduler: SchedulerState
    rng: RNGState
    world_size: int = Field(ge=1, le=1 << 20)
    skipped_steps: Count = 0
    overlong_dropped: Count = 0
    unreadable_dropped: Count = 0
    overlong_fallbacks: Count = 0


# ------------------------------------------------------------------------------------ RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def capture_rng() -> RNGState:
    """This process's torch (CPU and CUDA), Python and NumPy generator states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return RNGState(torch=_b64(torch.get_rng_state()), cuda=cuda, python=(version, list(internal), gauss),
                    numpy=(str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)))


def restore_rng(rng: RNGState) -> None:
    """Set every generator back to ``rng`` (CUDA only where the same number of devices is)."""
    try:
        torch.set_rng_state(_unb64(rng.torch))
        if rng.cuda and torch.cuda.is_available() and len(rng.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in rng.cuda])
        version, internal, gauss = rng.python
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = rng.numpy
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{STATE_FILE}: field 'rng' is not a valid generator state: {e}") from None


# ------------------------------------------------------------------------------- the file


def write_state(checkpoint: Path, state: TrainerState) -> None:
    """``trainer_state.json`` into a checkpoint directory being staged."""
    (checkpoint / STATE_FILE).write_text(state.model_dump_json(indent=1, by_alias=True, exclude_none=True))


def read_state(checkpoint: Path) -> TrainerState:
    """``trainer_state.json`` of a checkpoint directory, validated; a ``CheckpointError`` naming
    the file (and the field) for anything else - nothing in it is ever executed."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        if (checkpoint / LEGACY_STATE_FILE).is_file():
            raise CheckpointError(f"{checkpoint}: holds only {LEGACY_STATE_FILE}, a pickle this trainer never loads "
                                  f"(it could run code); resume from a checkpoint written with {STATE_FILE}")
        raise CheckpointError(f"{checkpoint}: no {STATE_FILE}; not a training checkpoint (resume needs one)")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: over {MAX_STATE_BYTES} bytes; not a trainer state, refused unread")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        kind = " (it is a pickle)" if raw[:1] == b"\x80" else ""
        raise CheckpointError(f"{path}: not a JSON trainer state{kind}, refused without reading it further: "
                              f"{e}") from None
    try:
        state = TrainerState.model_validate_json(text)  # JSON mode: arrays are the tuples
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: field '{'.'.join(str(p) for p in first['loc'])}': {first['msg']}") from None
    if state.version != STATE_VERSION:
        raise CheckpointError(f"{path}: field 'version': {state.version}, this trainer reads {STATE_VERSION}")
    return state


# ------------------------------------------------------------------------- metrics.jsonl

METRICS = "metrics.jsonl"
"""The trainer's per-step record in its workdir: one JSON object per line, a training step's
(``reward_mean``, ``dropped``, ``skipped_steps``, ...) or a validation's (``val/...``) - read
back by the pipeline's report (controller/report.py)."""


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one step's (or validation's) row: one line, flushed at once, so a killed trainer
    leaves at most one torn last line (which ``trim_metrics`` and ``read_metrics`` drop)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The training steps' rows of ``metrics.jsonl`` (validation rows left out), in step order;
    a torn line is skipped. A missing file is no rows."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row and "reward_mean" in row:
            rows.append(row)
    return sorted(rows, key=lambda r: int(r["step"]))


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` past ``step`` (a resume's step): the run that wrote them
    died before its next checkpoint, and the resumed run writes those steps again, so without
    this a step appears twice (``1..6, 5, 6, 7``). A torn last line (killed mid-write) goes too.
    The file is replaced atomically; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
    return dropped

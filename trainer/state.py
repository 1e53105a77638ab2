"""The trainer's resume state, read without running anything a checkpoint file says.

A checkpoint is data from object storage; whoever can write there must not be able to run code
in the trainer. ``torch.load(weights_only=False)`` and ``pickle.load`` do exactly that (a pickle
calls whatever callable it names), and a manifest regenerated next to the replaced file does
not help. So:

- ``trainer_state.json`` holds the data position, the LR scheduler, the RNG states and the
  counters as JSON, checked against ``TrainerState`` (a wrong or extra field is an error naming
  it). Anything that is not such JSON - a pickle, the old ``trainer_state.pt`` - is refused
  with a ``CheckpointError``, never unpickled.
- ``train_state/`` (fp32 model and AdamW shards) stays a ``torch.distributed.checkpoint``
  directory (any world size), but is read through ``SafeFileSystemReader`` and
  ``SafeLoadPlanner``: stock DCP unpickles ``.metadata`` with ``pickle.load`` and every
  non-tensor item with ``torch.load(weights_only=False)``. Here ``.metadata`` goes through an
  unpickler that only builds DCP's own metadata classes (the "restricting globals" recipe of
  the ``pickle`` docs) and the non-tensor items through ``torch.load(weights_only=True)``;
  tensors DCP already reads with ``weights_only=True``.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from p2r.services.checkpoints import CheckpointError

STATE_FILE = "trainer_state.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle: never read
STATE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PositionState(_Strict):
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    offset: int = Field(ge=0)


class RNGState(_Strict):
    torch: str = Field(description="torch.get_rng_state(), base64")
    cuda: list[str] = Field(default_factory=list, description="torch.cuda.get_rng_state_all(), base64 each")
    python: tuple[int, list[int], float | None] = Field(description="random.getstate()")
    numpy: tuple[str, list[int], int, int, float] = Field(description="np.random.get_state()")


class TrainerState(_Strict):
    """Everything a resume restores besides the DCP shards (``trainer_state.json``)."""

    version: int = STATE_VERSION
    position: PositionState
    scheduler: dict[str, Any] = Field(description="the LR scheduler's state_dict (plain JSON values)")
    rng: RNGState
    world_size: int = Field(ge=1)
    skipped_steps: int = Field(0, ge=0)
    overlong_dropped: int = Field(0, ge=0)
    unreadable_dropped: int = Field(0, ge=0)
    overlong_fallbacks: int = Field(0, ge=0)


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
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{STATE_FILE}: field 'rng' is not a valid generator state: {e}") from None


# ------------------------------------------------------------------------------- the file


def write_state(checkpoint: Path, state: TrainerState) -> None:
    """``trainer_state.json`` into a checkpoint directory being staged."""
    (checkpoint / STATE_FILE).write_text(state.model_dump_json(indent=1))


def read_state(checkpoint: Path) -> TrainerState:
    """``trainer_state.json`` of a checkpoint directory, validated; a ``CheckpointError`` naming
    the file (and the field) for anything else - nothing in it is ever executed."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        if (checkpoint / LEGACY_STATE_FILE).is_file():
            raise CheckpointError(f"{checkpoint}: holds only {LEGACY_STATE_FILE}, a pickle this trainer never loads "
                                  f"(it could run code); resume from a checkpoint written with {STATE_FILE}")
        raise CheckpointError(f"{checkpoint}: no {STATE_FILE}; not a training checkpoint (resume needs one)")
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


# ---------------------------------------------------------------------- DCP without pickle

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, set[str]] = {
    _DCP_METADATA: {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata objects, torch sizes / dtypes / layouts and paths; any other
    global (``os.system``, ``builtins.eval``, ...) stops the load before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, set()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, ImportError) as e:
            raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata, refused: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata "
                                  f"(a {type(metadata).__name__}), refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor items (AdamW's param_groups: numbers, tuples,
    names) with ``torch.load(weights_only=True)`` instead of ``weights_only=False``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"train_state item '{read_item.dest_index.fqn}' refused: {e}") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def check_train_state(directory: Path) -> None:
    """Read ``train_state/.metadata`` the safe way now (before any engine starts), so a tampered
    one is refused in seconds with its name."""
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: no .metadata; not a torch.distributed.checkpoint train state")
    SafeFileSystemReader(str(directory)).read_metadata()


# ------------------------------------------------------------------------- metrics.jsonl


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

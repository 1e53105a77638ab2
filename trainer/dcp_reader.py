"""A checkpoint's ``train_state/`` (fp32 model and AdamW shards, ``torch.distributed.checkpoint``)
read without running or reading anything the files name beyond the directory itself.

A checkpoint is data from object storage: whoever can write there, and regenerate the manifest,
controls every byte of ``train_state/``. Stock DCP trusts those bytes three ways, each closed
here:

- ``.metadata`` is unpickled with ``pickle.load``, and every non-tensor item with
  ``torch.load(weights_only=False)``: either runs any callable a pickle names. ``.metadata`` goes
  through ``_MetadataUnpickler`` (only DCP's own metadata classes: the "restricting globals"
  recipe of the ``pickle`` docs), non-tensor items through ``torch.load(weights_only=True)``
  (``SafeLoadPlanner``); tensors DCP already reads with ``weights_only=True``.
- Each storage item's ``relative_path`` is joined to the directory as it stands: a tampered
  ``../../../outside/x.distcp``, an absolute path or a symlink out of the directory made a
  resume read that file (and exit 0). ``check_storage`` resolves every path with
  ``checkpoints.destination`` - the check that confines S3 keys - before anything is read.
- An item whose bytes lie past its file's end (a truncated shard) failed deep inside
  ``torch.load`` with a RuntimeError; ``check_storage`` compares every item with its file's size
  first, and anything else failing in a shard is a CheckpointError naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from p2r.services.checkpoints import CheckpointError, destination

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


def check_storage(root: Path, metadata: Any, where: str) -> None:
    """Every storage item of ``metadata`` names a file inside ``root`` (resolved, symlinks
    included: ``destination``) that holds its bytes (``offset + length`` within the file's
    size). A CheckpointError names the item's path, or the file, before anything is read."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{where}: no storage_data; not torch.distributed.checkpoint metadata, refused")
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", index)
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where}: storage item {fqn!r} is a {type(info).__name__}, not a _StorageInfo; "
                                  "refused")
        rel = os.fspath(info.relative_path) if isinstance(info.relative_path, (str, PurePath)) else None
        if rel is None:
            raise CheckpointError(f"{where}: storage item {fqn!r} has no relative_path; refused")
        if rel not in sizes:
            path = destination(root, rel, f"{where}: storage item {fqn!r} relative_path")
            if not path.is_file():
                raise CheckpointError(f"{root / rel}: missing (storage item {fqn!r} is in it); refused")
            sizes[rel] = path.stat().st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{where}: storage item {fqn!r} has offset {offset!r} / length {length!r}; refused")
        if offset + length > sizes[rel]:
            raise CheckpointError(f"{root / rel}: truncated: storage item {fqn!r} needs bytes up to "
                                  f"{offset + length}, the file has {sizes[rel]}; refused")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through ``_MetadataUnpickler`` and whose
    storage items are confined to the directory and checked against their files
    (``check_storage``) before any is read; a shard that fails to read is a CheckpointError
    naming the file."""

    _reading: str = ""

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
        check_storage(Path(self.path), metadata, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # Every rank, not only the one that read .metadata: each checks the files it will read.
        check_storage(Path(self.path), metadata, str(self._get_metadata_path(kwargs.get("rank"))))
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        self._reading = os.fspath(sinfo.relative_path)  # which file a failure below is in
        return super()._slice_file(file, sinfo)

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as e:  # torch.load's RuntimeError / UnpicklingError, a size mismatch, EOF
            raise CheckpointError(f"{Path(self.path) / self._reading}: not a readable train-state shard "
                                  f"({_why(e)}); refused") from None


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
    one - a pickle payload, a path out of the directory, a truncated shard - is refused in
    seconds with its name."""
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: no .metadata; not a torch.distributed.checkpoint train state")
    SafeFileSystemReader(str(directory)).read_metadata()


def load_train_state(state: dict[str, Any], directory: Path, **kwargs: Any) -> None:
    """``dcp.load`` of ``state`` from ``directory`` through the safe reader and planner. DCP
    wraps a failure in ``CheckpointException`` (a BaseException listing each rank's error): the
    first CheckpointError among them is raised as it is, anything else as a CheckpointError
    naming the directory, so the trainer's CLI prints one line instead of a traceback."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:
        errors = [failure[0] for failure in e.failures.values()]
        first = next((x for x in errors if isinstance(x, CheckpointError)), errors[0] if errors else e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CheckpointError(f"{directory}: train state could not be read ({_why(first)})") from None


def _why(error: BaseException) -> str:
    """An exception's type and the first line of its message: one line for the CLI."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"

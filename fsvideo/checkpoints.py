"""Reading checkpoints safely, and finding the checkpoint of a run directory.

A checkpoint is either one file (``torch.save`` of Lightning's checkpoint dict) or a *distributed checkpoint*
folder, written by ``ModelParallelStrategy(save_distributed_checkpoint=True)`` (``callbacks.checkpoint_io``):
every rank writes its own shards of the weights and optimizer state with ``torch.distributed.checkpoint``
(DCP: ``.metadata`` + ``__<rank>_<n>.distcp`` files, tensor names ``state_dict.<name>`` and
``optimizer_<i>.…``), and rank 0 writes the rest of the checkpoint dict (manifest, loops, data position, RNG
states) to ``meta.pt``. ``DistributedCheckpointWeights`` reads such a folder's weights in one process, without
a process group, tensor by tensor.

Everything here loads with ``torch.load(weights_only=True)``: no checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

RUN_CONFIG = "config.yaml"
"""Name of the resolved config that ``fsvideo fit`` writes in every run directory."""
DISTRIBUTED_META_FILE = "meta.pt"
"""The file of a distributed checkpoint folder that holds all but the weights and optimizer state (the name
Lightning's ``ModelParallelStrategy`` gives it)."""
DCP_METADATA_FILE = ".metadata"
"""DCP's index of a distributed checkpoint folder (tensor names, shapes, which file holds which shard); its
coordinator writes it after every rank has written its shards."""
WEIGHTS_PREFIX = "state_dict."
"""Prefix of the LightningModule's tensors among a distributed checkpoint's names (the optimizer's are
``optimizer_<i>.``)."""


def safe_torch_load(
    path: str | os.PathLike, map_location: Any = "cpu", expected: str = "a checkpoint"
) -> Any:
    """``torch.load(weights_only=True)`` with an error that names the file and what was expected.

    The file is memory-mapped: tensors are read from disk when used, so taking a few tensors (or one shard
    of each) out of a large checkpoint does not read all of it into memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}. Check the path in your config.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(
            f"{path} could not be read as {expected} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "The file is truncated, corrupt, or not a PyTorch checkpoint; use an earlier checkpoint "
            "or re-export the weights."
        ) from error


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (it has a ``meta.pt``; see the module docstring)."""
    return Path(path).is_dir() and (Path(path) / DISTRIBUTED_META_FILE).is_file()


def check_distributed_checkpoint(path: str | Path) -> None:
    """Raise a one-line error when the distributed checkpoint folder ``path`` lacks a file it needs."""
    path = Path(path)
    for name in (DISTRIBUTED_META_FILE, DCP_METADATA_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path}: no {name}; the distributed checkpoint folder is incomplete (a save that did not "
                "finish, or a partial copy). Use an earlier checkpoint."
            )
    shard_files = {info.relative_path for info in _read_dcp_metadata(path).storage_data.values()}
    missing = sorted(name for name in shard_files if not (path / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"{path}: shard files {missing[:4]} of {len(shard_files)} are missing; the distributed checkpoint "
            "folder is incomplete (copy all of it, or use an earlier checkpoint)."
        )


def _read_dcp_metadata(path: Path):
    try:
        return FileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(
            f"{path / DCP_METADATA_FILE} could not be read as a distributed checkpoint index ({error}); the "
            "checkpoint is corrupt: use an earlier one."
        ) from None


def load_checkpoint_metadata(path: str | Path, expected: str = "a checkpoint") -> dict[str, Any]:
    """A checkpoint's dict: all of it for a file (tensors memory-mapped), ``meta.pt`` (everything but weights
    and optimizer state) for a distributed checkpoint folder, whose completeness is checked first."""
    path = Path(path)
    if is_distributed_checkpoint(path):
        check_distributed_checkpoint(path)
        return safe_torch_load(path / DISTRIBUTED_META_FILE, expected=f"the metadata of {expected}")
    return safe_torch_load(path, expected=expected)


class DistributedCheckpointWeights(Mapping[str, torch.Tensor]):
    """The tensors of a distributed checkpoint folder whose names start with ``prefix``, by name without it;
    each is read whole (its shards from every rank's file) when asked for, in this process, with no process
    group."""

    def __init__(self, folder: str | Path, prefix: str = WEIGHTS_PREFIX) -> None:
        self.folder = Path(folder)
        metadata = _read_dcp_metadata(self.folder)
        self._tensors = {
            name[len(prefix) :]: (name, entry)
            for name, entry in metadata.state_dict_metadata.items()
            if name.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        name, entry = self._tensors[key]
        state = {name: torch.empty(entry.size, dtype=entry.properties.dtype)}
        with (
            warnings.catch_warnings()
        ):  # DCP warns that no process group means one process: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=FileSystemReader(str(self.folder)), no_dist=True)
        return state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def find_run_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a run directory (its ``checkpoints/last.ckpt``, a file or a distributed checkpoint
    folder), or ``path`` itself when it is a checkpoint."""
    path = Path(path)
    if path.is_file() or is_distributed_checkpoint(path):
        return path
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
        if checkpoint.is_file() or is_distributed_checkpoint(checkpoint):
            return checkpoint
        found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
        raise FileNotFoundError(
            f"{checkpoint}: no such file (checkpoints there: {found or 'none'}); pass the checkpoint path itself."
        )
    raise FileNotFoundError(f"{path}: no such saved-model folder, run directory or checkpoint.")

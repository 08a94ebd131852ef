"""Crash-safe checkpoints: atomic writes and loads that never unpickle arbitrary objects.

``AtomicCheckpointIO`` writes one-file checkpoints; ``AtomicModelParallelStrategy`` writes distributed
checkpoint folders (``ModelParallelStrategy(save_distributed_checkpoint=True)``, ``fsvideo.checkpoints``): each
rank its own shards, no gather on rank 0. ``cli.py`` puts it in place of every ``ModelParallelStrategy``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from fsvideo.checkpoints import (
    DISTRIBUTED_META_FILE,
    check_distributed_checkpoint,
    is_distributed_checkpoint,
    safe_torch_load,
)

DCP_STAGING = ".dcp-staging"
"""Folder beside the checkpoints where a distributed checkpoint is written before it is renamed into place.
Its name must not contain "last": ModelCheckpoint resumes ``--ckpt_path last`` from the newest entry so named."""
DCP_REPLACED = ".dcp-replaced"
"""Where the checkpoint a save replaces (``last.ckpt``) waits between the two renames of the swap."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A process killed at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes local files atomically and loads them with ``weights_only``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if is_distributed_checkpoint(path):
            raise ValueError(
                f"{path} is a distributed checkpoint folder: resume it with trainer.strategy: "
                "lightning.pytorch.strategies.ModelParallelStrategy and model.init_args.parallel.fsdp: true (on any "
                "number of processes, one included), or turn it into saved-model folders with `fsvideo export`."
            )
        return safe_torch_load(path, map_location=map_location or "cpu", expected="a Lightning checkpoint")


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose distributed checkpoints are whole or absent.

    With ``save_distributed_checkpoint=True`` every rank writes its shards of the weights and optimizer state
    (DCP; nothing is gathered) into a staging folder and rank 0 writes ``meta.pt`` (manifest, loops, data
    position, RNG states) there atomically; once all of it is on disk, rank 0 renames the folder to the
    checkpoint's name. A checkpoint that already exists under that name (``last.ckpt``) is first renamed aside
    and deleted after the swap: a crash between those two renames leaves the previous checkpoint complete in
    ``checkpoints/.dcp-replaced`` (rename it back to resume). Loading checks the folder is complete and reads
    every tensor resharded to this run's process count (DCP), so a run resumes on another number of processes;
    the data position is re-split then (``datamodules.streaming``). With ``save_distributed_checkpoint=False``
    it is ``ModelParallelStrategy`` unchanged (one file gathered on rank 0, ``AtomicCheckpointIO``).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options.")
        path = Path(self.broadcast(filepath))  # rank 0's path: every rank writes into one folder
        staging = path.parent / DCP_STAGING
        if self.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
            staging.mkdir(parents=True)
        self.barrier()
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        # returns once every rank's files are written and synced and the coordinator wrote .metadata
        dcp.save(shards, checkpoint_id=staging)
        if self.is_global_zero:
            atomic_torch_save(checkpoint, staging / DISTRIBUTED_META_FILE)
            swap_in_checkpoint(staging, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if is_distributed_checkpoint(checkpoint_path):
            check_distributed_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)


def swap_in_checkpoint(staging: Path, path: Path) -> None:
    """Rename the complete folder ``staging`` to ``path``, replacing what ``path`` was (see the class)."""
    replaced = path.parent / DCP_REPLACED
    shutil.rmtree(replaced, ignore_errors=True)
    if path.is_file() or path.is_symlink():  # a one-file checkpoint of an earlier configuration of the run
        path.unlink()
    elif path.exists():
        os.replace(path, replaced)
    os.replace(staging, path)
    _fsync_folder(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

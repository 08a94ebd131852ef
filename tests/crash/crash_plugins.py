"""Faults injected into a real `fsvideo fit` subprocess (imported there through PYTHONPATH)."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import lightning as L
import torch

from callbacks.checkpoint_io import AtomicCheckpointIO


class KillDuringSave(AtomicCheckpointIO):
    """On the checkpoint save number ``kill_at_save`` (1-based), write half of the file, then SIGKILL."""

    def __init__(self, kill_at_save: int) -> None:
        super().__init__()
        self.kill_at_save = kill_at_save
        self.saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves < self.kill_at_save:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        with open(path.with_name(f".{path.name}.tmp-{os.getpid()}"), "wb") as partial:
            partial.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            partial.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(L.Callback):
    """SIGKILL the process right after optimizer step ``step``, mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

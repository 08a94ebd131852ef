"""Speed and memory on the dashboard: samples/s, latent tokens/s, step time, peak memory and the share of
wall time spent waiting for data, so a slow input pipeline shows up next to the loss."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch

SPATIAL, TEMPORAL = 64, 4
"""FSAE compression: a ``B×3×T×H×W`` clip becomes ``(1 + (T-1)/4)·(H/64)·(W/64)`` latent tokens."""


def latent_tokens(batch: dict[str, Any]) -> int:
    """Latent tokens in a batch: counted from ``latent`` (``B×C×t×h×w``) or from the pixel ``video``."""
    if "latent" in batch:
        b, _, t, h, w = batch["latent"].shape
        return b * t * h * w
    b, _, frames, height, width = batch["video"].shape
    return b * (1 + (frames - 1) // TEMPORAL) * (height // SPATIAL) * (width // SPATIAL)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput(L.Callback):
    """Logs ``perf/samples_per_s``, ``perf/tokens_per_s``, ``perf/step_s``, ``perf/data_wait_fraction`` and
    ``perf/peak_memory_gib`` every ``log_every_n_steps`` training batches (averaged over them).

    Data wait is the time from the end of one training batch to the start of the next (the DataLoader),
    step time from the start of a batch to its end (forward, backward, optimizer). No device sync is
    added: on GPU, step times are those the host sees.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be at least 1.")
        self.log_every_n_steps = log_every_n_steps
        self._reset()
        self._last_end: float | None = None

    def _reset(self) -> None:
        self.batches = self.samples = self.tokens = 0
        self.step_seconds = self.wait_seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the gap across an epoch boundary (validation, …) is not data wait

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self.wait_seconds += self._start - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = time.perf_counter()
        self.step_seconds += end - self._start
        self._last_end = end
        self.batches += 1
        self.samples += len(batch["video"] if "video" in batch else batch["latent"])
        self.tokens += latent_tokens(batch)
        if self.batches < self.log_every_n_steps:
            return
        total = self.step_seconds + self.wait_seconds
        pl_module.log_dict(
            {
                "perf/samples_per_s": self.samples / total,
                "perf/tokens_per_s": self.tokens / total,
                "perf/step_s": self.step_seconds / self.batches,
                "perf/data_wait_fraction": self.wait_seconds / total,
                "perf/peak_memory_gib": peak_memory_gib(pl_module.device),
            },
            on_step=True,
            on_epoch=False,
        )
        self._reset()

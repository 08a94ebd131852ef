"""Per-step training loss of a run in ``<run>/loss_history.csv``, and Figure 7(a): loss curves of runs in one plot.

The csv has a header ``step,loss``; ``step`` is the optimizer step the row's loss led to (``global_step``
after the update), ``loss`` the mean over ranks. A resumed run keeps the rows before its checkpoint's step and
appends after them, so the file always describes one continuous run.

Public API:
    LossHistory(key="loss")             the callback
    read_loss_history(run_dir) -> (steps, losses)   numpy arrays
    plot_loss_curves(run_dirs, out_png, labels=None, smoothing=0.9) -> Path
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HISTORY_FILE = "loss_history.csv"
HEADER = ("step", "loss")


class LossHistory(L.Callback):
    """Appends each training step's loss to ``<trainer.default_root_dir>/loss_history.csv``.

    Args:
        key: entry of the ``training_step`` output holding the loss (a returned tensor is ``"loss"``).
    """

    def __init__(self, key: str = "loss") -> None:
        self.key = key

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / HISTORY_FILE

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= trainer.global_step]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            writer.writerows((row["step"], row["loss"]) for row in kept)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get(self.key) if isinstance(outputs, dict) else outputs
        if loss is None:
            raise ValueError(
                f"LossHistory found no '{self.key}' in the training_step output; return the loss from training_step."
            )
        loss = trainer.strategy.reduce(torch.as_tensor(loss).detach().float(), reduce_op="mean")
        if trainer.is_global_zero:
            with open(self.path(trainer), "a", newline="") as f:
                csv.writer(f).writerow((trainer.global_step, f"{loss.item():.8g}"))


def read_loss_history(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` of a run directory (or of a ``loss_history.csv`` path)."""
    path = Path(run_dir)
    path = path / HISTORY_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no loss history; train the run with the callbacks.loss_history.LossHistory callback."
        )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no training steps yet.")
    return np.array([int(r["step"]) for r in rows]), np.array([float(r["loss"]) for r in rows])


def _smooth(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing); NaNs are skipped."""
    out, average, weight = np.empty_like(values), 0.0, 0.0
    for i, value in enumerate(values):
        if math.isfinite(value):
            average = smoothing * average + (1 - smoothing) * value
            weight = smoothing * weight + (1 - smoothing)
        out[i] = average / weight if weight else math.nan
    return out


def plot_loss_curves(
    run_dirs: Sequence[str | Path],
    out_png: str | Path,
    labels: Sequence[str] | None = None,
    smoothing: float = 0.9,
) -> Path:
    """Training-loss curves of several runs in one figure (Figure 7(a)); returns the PNG path.

    Args:
        run_dirs: run directories, each with a ``loss_history.csv``.
        out_png: output image.
        labels: legend entries; default the run directories' names.
        smoothing: EMA factor in [0, 1) of the bold curve; the raw per-step loss is drawn faintly behind it.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory.")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, run_dir in enumerate(run_dirs):
        steps, losses = read_loss_history(run_dir)
        label = labels[index] if labels is not None else Path(run_dir).name
        (line,) = axes.plot(steps, _smooth(losses, smoothing), linewidth=1.8, label=label)
        axes.plot(steps, losses, linewidth=0.6, alpha=0.3, color=line.get_color())
    axes.set_xlabel("training step")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss" + (f" (EMA {smoothing:g})" if smoothing else ""))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png

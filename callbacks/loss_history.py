"""Per-step training loss of a run in ``<run>/loss_history.csv``, and Figure 7: loss curves of runs in one plot
(seeds of a variant as mean and min–max band, held-out validation loss beside).

The csv has a header ``step,loss``; ``step`` is the optimizer step the row's loss led to (``global_step``
after the update), ``loss`` the mean over ranks. A resumed run keeps the rows before its checkpoint's step and
appends after them, so the file always describes one continuous run.

Public API:
    LossHistory(key="loss")             the callback
    read_loss_history(run_dir) -> (steps, losses)   numpy arrays
    plot_loss_curves(run_dirs, out_png, labels=None, smoothing=0.9, val_key="val/loss") -> Path
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

from callbacks.metrics_table import has_metric_history, read_metric_history

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


def _group(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> dict[str, list[Path]]:
    """Runs by label, in order of first appearance; runs that share a label are seeds of one variant."""
    groups: dict[str, list[Path]] = {}
    for index, run_dir in enumerate(run_dirs):
        label = labels[index] if labels is not None else Path(run_dir).name
        groups.setdefault(label, []).append(Path(run_dir))
    return groups


def _common(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values R×S)`` at the steps every run has (seeds of one variant may stop at different steps)."""
    steps = curves[0][0]
    for other, _ in curves[1:]:
        steps = np.intersect1d(steps, other)
    if not len(steps):
        raise ValueError("runs of one label share no step; give them different labels.")
    return steps, np.stack([values[np.isin(s, steps)] for s, values in curves])


def _draw(axes, steps: np.ndarray, values: np.ndarray, label: str, marker: str | None = None) -> None:
    """Mean over runs (rows of ``values``), a min–max band behind it when there are several."""
    count = values.shape[0]
    suffix = f" (mean, min–max of {count} runs)" if count > 1 else ""
    (line,) = axes.plot(
        steps, values.mean(0), linewidth=1.8, marker=marker, markersize=3, label=label + suffix
    )
    if count > 1:
        axes.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)


def plot_loss_curves(
    run_dirs: Sequence[str | Path],
    out_png: str | Path,
    labels: Sequence[str] | None = None,
    smoothing: float = 0.9,
    val_key: str = "val/loss",
) -> Path:
    """Training-loss curves of runs in one figure (Figure 7); returns the PNG path.

    Runs with the same label are seeds of one variant: their (smoothed) curves are drawn as the mean with a
    min–max band. A single run keeps its raw per-step loss drawn faintly behind the smoothed curve. When the
    runs recorded validation metrics (``metrics_table.jsonl`` of ``callbacks.metrics_table.MetricsTable``), a
    second panel shows ``val_key`` against the step, the same way.

    Args:
        run_dirs: run directories, each with a ``loss_history.csv``.
        out_png: output image.
        labels: legend entries (one per run; repeat a label to group runs); default the run directories' names.
        smoothing: EMA factor in [0, 1) of the training curves.
        val_key: validation metric of the second panel.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory.")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    groups = _group(run_dirs, labels)
    validation = {
        label: [read_metric_history(run, val_key) for run in runs]
        for label, runs in groups.items()
        if all(has_metric_history(run, val_key) for run in runs)
    }
    figure = Figure(figsize=(11 if validation else 7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if validation else 1, 1)
    for label, runs in groups.items():
        histories = [read_loss_history(run) for run in runs]
        steps, smoothed = _common([(s, _smooth(losses, smoothing)) for s, losses in histories])
        _draw(axes, steps, smoothed, label)
        if len(runs) == 1:
            axes.plot(*histories[0], linewidth=0.6, alpha=0.3, color=axes.lines[-1].get_color())
    axes.set_xlabel("training step")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss" + (f" (EMA {smoothing:g})" if smoothing else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if validation:
        val_axes = figure.add_subplot(1, 2, 2)
        for label, curves in validation.items():
            _draw(val_axes, *_common(curves), label, marker="o")
        val_axes.set_xlabel("training step")
        val_axes.set_ylabel(val_key)
        val_axes.set_title(f"Held-out {val_key} (EMA weights, fixed σ and noise)")
        val_axes.grid(alpha=0.3)
        val_axes.legend(fontsize=8)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png

"""Prints the validation metrics of a run as one markdown table row (e.g. the spec's Table 2) and
appends it, with the step and checkpoint, to ``<run dir>/<filename>``.

Public API:
    MetricsTable(keys=None, label=None, filename="metrics_table.md")   the callback
    has_metric_history(run_dir, key) -> bool
    read_metric_history(run_dir, key) -> (steps, values)   numpy arrays, from the ``.jsonl`` twin
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np

JSONL_FILE = "metrics_table.jsonl"
"""The machine-readable twin of the default table."""


class MetricsTable(L.Callback):
    """After each validation run, one row: ``| label | key1 | key2 | … |``.

    Args:
        keys: logged metric names, in column order; a metric that was not logged shows as ``—``.
        label: row label; defaults to the run folder's name.
        filename: markdown file in the run directory that rows are appended to; a ``.jsonl`` twin
            beside it keeps the same numbers machine-readable.
    """

    def __init__(
        self,
        keys: list[str] | None = None,
        label: str | None = None,
        filename: str = "metrics_table.md",
    ) -> None:
        self.keys = keys or ["val/ssim", "val/psnr", "val/lpips", "val/fvd"]
        self.label = label
        self.filename = filename

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {
            key: float(trainer.callback_metrics[key]) for key in self.keys if key in trainer.callback_metrics
        }
        label = self.label or Path(trainer.default_root_dir).name
        header = "| run | step | " + " | ".join(k.split("/")[-1].upper() for k in self.keys) + " |"
        cells = [f"{values[k]:.4f}" if k in values and math.isfinite(values[k]) else "—" for k in self.keys]
        row = f"| {label} | {trainer.global_step} | " + " | ".join(cells) + " |"
        print(f"\n{header}\n|{'---|' * (len(self.keys) + 2)}\n{row}\n")
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(f"{header}\n|{'---|' * (len(self.keys) + 2)}\n")
        with path.open("a") as table:
            table.write(row + "\n")
        with path.with_suffix(".jsonl").open("a") as jsonl:
            jsonl.write(json.dumps({"label": label, "step": trainer.global_step, **values}) + "\n")


def _metric_rows(run_dir: str | Path, key: str) -> list[dict]:
    path = Path(run_dir) / JSONL_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if key in row]


def has_metric_history(run_dir: str | Path, key: str) -> bool:
    """Whether the run's ``metrics_table.jsonl`` holds ``key`` at some step."""
    return bool(_metric_rows(run_dir, key))


def read_metric_history(run_dir: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` at each validation of a run (``metrics_table.jsonl``); a step validated
    twice (a resumed run) keeps its last row."""
    rows = {row["step"]: row[key] for row in _metric_rows(run_dir, key)}
    if not rows:
        raise FileNotFoundError(
            f"{Path(run_dir) / JSONL_FILE} holds no '{key}'; add callbacks.metrics_table.MetricsTable with that key."
        )
    steps = np.array(sorted(rows))
    return steps, np.array([rows[step] for step in steps], dtype=float)

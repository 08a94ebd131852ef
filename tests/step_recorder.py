"""A callback the exact-resume tests add to a real `fsvideo fit` (imported by class path)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class StepRecorder(L.Callback):
    """Appends one json line per training step to ``<default_root_dir>/steps.jsonl``: the step, every
    ``train/*`` value logged in it and the keys of the samples it trained on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("train/") and not name.endswith("_epoch")
        }
        row = {"step": trainer.global_step, "metrics": metrics, "keys": list(batch["meta"]["key"])}
        with open(Path(trainer.default_root_dir) / "steps.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

"""Saved-model folders written when a fit ends, so the next stage or the pipeline can name them directly.

    trainer:
      callbacks:
        - class_path: callbacks.export.ExportNetworks
          init_args: {folder: export}      # → runs/<name>/export/<network>/ (config.json + safetensors)

The same folders ``fsvideo export RUN --out FOLDER`` writes from any checkpoint later (``fsvideo.export``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import TrainingStage


class ExportNetworks(L.Callback):
    """At the end of ``fit``, writes every network the stage trains as a saved-model folder.

    Args:
        folder: where, relative to the run directory (``trainer.default_root_dir``) unless absolute.
        raw: the trained weights instead of their EMA twin (EMA is the default where the stage keeps it).
    """

    def __init__(self, folder: str = "export", raw: bool = False) -> None:
        self.folder = folder
        self.raw = raw

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, TrainingStage):
            raise ValueError(f"ExportNetworks exports TrainingStage modules, got {type(pl_module).__name__}.")
        out = Path(trainer.default_root_dir) / self.folder
        for name, path in pl_module.export_networks(out, self.raw).items():
            rank_zero_info(f"exported {name} to {path}")

"""Writes the videos a module keeps from validation (reconstructions now, generated samples later)
as mp4 files beside the checkpoints and logs them to wandb."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from fsvideo.video_io import side_by_side, to_uint8_frames, write_mp4


class ValidationVideos(L.Callback):
    """At the end of each validation, saves ``pl_module.val_examples`` side by side.

    The module sets ``val_examples`` to a tuple of ``B×3×T×H×W`` tensors in [-1, 1] (e.g. ground
    truth and reconstruction); one mp4 per sample goes to ``<run dir>/videos/step-XXXXXXX/`` and, when
    wandb logs the run, to ``val/videos`` as ``wandb.Video``.

    Args:
        fps: frame rate of the written files.
        folder: sub-folder of the run directory.
    """

    def __init__(self, fps: float = 24.0, folder: str = "videos") -> None:
        self.fps = fps
        self.folder = folder

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "val_examples", None)
        if examples is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        out_dir = Path(trainer.default_root_dir) / self.folder / f"step-{trainer.global_step:07d}"
        paths = []
        for index in range(examples[0].shape[0]):
            video = side_by_side(*(tensor[index] for tensor in examples))
            paths.append(write_mp4(out_dir / f"{index:02d}.mp4", to_uint8_frames(video), fps=self.fps))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {"val/videos": [wandb.Video(str(p), format="mp4") for p in paths]},
                    step=trainer.global_step,
                )
        pl_module.val_examples = None

"""Videos kept from validation (FSAE reconstructions, DiT samples), written as mp4 files beside the
checkpoints and logged to wandb: ``save_videos`` does both, ``ValidationVideos`` feeds it the module's
``val_examples``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from fsvideo.video_io import side_by_side, to_uint8_frames, write_mp4


def save_videos(
    trainer: L.Trainer,
    videos: Sequence[torch.Tensor],
    folder: str | Path,
    key: str,
    captions: Sequence[str] | None = None,
    fps: float = 24.0,
) -> list[Path]:
    """Write ``videos`` (each ``3×T×H×W`` in [-1, 1], H and W even) to ``folder/NN.mp4`` and, when wandb logs
    the run, log them under ``key`` as ``wandb.Video`` at the trainer's global step, with ``captions``.

    Returns the paths of the files, in the order of ``videos``.
    """
    if captions is not None and len(captions) != len(videos):
        raise ValueError(f"{len(captions)} captions for {len(videos)} videos; give one caption per video.")
    folder = Path(folder)
    paths = [
        write_mp4(folder / f"{index:02d}.mp4", to_uint8_frames(video), fps=fps)
        for index, video in enumerate(videos)
    ]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            labels = captions if captions is not None else [None] * len(paths)
            logger.experiment.log(
                {key: [wandb.Video(str(p), caption=c, format="mp4") for p, c in zip(paths, labels)]},
                step=trainer.global_step,
            )
    return paths


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
        videos = [
            side_by_side(*(tensor[index] for tensor in examples)) for index in range(examples[0].shape[0])
        ]
        save_videos(trainer, videos, out_dir, "val/videos", fps=self.fps)
        pl_module.val_examples = None

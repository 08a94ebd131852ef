"""``VideoDataModule``: WebDataset shards of videos and stills → bucketed ``B×3×T×H×W`` batches in [-1, 1].

Workers ship videos as uint8 (a quarter of the bytes); they become float in [-1, 1] after the batch reaches
its device (``on_after_batch_transfer``, so on the GPU when training on one), or, when a loader is iterated
outside a Trainer, in the loader itself. Either way the consumer sees float in [-1, 1].

How skip counts reach the logs: workers are separate processes, so each batch carries its worker's running
counts in ``batch["meta"]["skipped"]`` (and its stream position in ``meta["cursor"]``). The DataModule's
loaders keep the latest of each per worker, and ``skipped_counts()`` sums them into ``data/skipped_*``
values that a LightningModule or callback logs (``sync_dist=True, reduce_fx="sum"`` adds up the ranks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from datamodules.buckets import BucketConfig, check_num_frames
from datamodules.pipeline import BucketedClipDataset, normalize_video
from datamodules.streaming import StreamDataModule, TrackingLoader

log = logging.getLogger(__name__)


def _normalize_batch(batch: dict[str, Any]) -> dict[str, Any]:
    batch["video"] = normalize_video(batch["video"])
    return batch


class VideoDataModule(StreamDataModule):
    """Videos (``KEY.mp4``) and stills (``KEY.jpg``/``KEY.png``), each with ``KEY.json`` (``caption``; optional
    ``fps``, ``width``, ``height``, scores), from WebDataset tar shards, cut into clips and batched by
    aspect-ratio bucket.

    A batch is ``{"video": B×3×T×H×W float in [-1, 1], "caption": list[str], "is_image": bool tensor (B,),
    "meta": dict}``; all its samples share one bucket (T, H, W); a still is a 1-frame clip, so its batch has
    T = 1. The first frame for image conditioning is ``video[:, :, 0]``. Under DDP every rank and worker reads
    different shards, and every rank yields exactly ``batches_per_epoch`` batches per epoch.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 2,
        num_workers: int = 2,
        num_frames: int = 17,
        fps: float | None = 24.0,
        buckets: BucketConfig = BucketConfig(),
        image_fraction: float | None = None,
        batches_per_epoch: int = 100,
        val_batches: int = 4,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_shards: Training shards: paths, brace patterns (``data/train-{000000..000099}.tar``) or
                ``pipe:`` URLs, or a list of them.
            val_shards: Validation shards in the same forms; None disables validation.
            batch_size: Samples per batch (per rank).
            num_workers: DataLoader worker processes per rank (0 reads in the main process).
            num_frames: Frames per video clip at the main bucket size; must be 1 + 4k (17, 61, 121, …).
            fps: Frame rate clips are cut at (source frames are repeated or dropped); None keeps the source rate.
            buckets: Aspect-ratio buckets: target area (``size``, about 256² pixels by default), ratios, the
                64-pixel grid, mixed-resolution entries.
            image_fraction: Share of batches made of stills; None takes images and videos as they come.
            batches_per_epoch: Training batches each rank yields per epoch (the stream cycles over the shards).
            val_batches: Validation batches each rank yields per validation run (always the same ones).
            seed: Seeds shard order, clip starts, crops and image/video choice (with pass, rank and worker).
        """
        super().__init__()
        check_num_frames(num_frames)
        if fps is not None and fps <= 0:
            raise ValueError(f"fps={fps} must be positive, or None to keep each video's own frame rate.")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 or more.")
        if min(batch_size, batches_per_epoch, val_batches) < 1:
            raise ValueError(
                f"batch_size={batch_size}, batches_per_epoch={batches_per_epoch} and val_batches={val_batches} "
                "must each be at least 1."
            )
        if image_fraction is not None and not 0 <= image_fraction <= 1:
            raise ValueError(
                f"image_fraction={image_fraction} must be in [0, 1], or None for the data's own mix."
            )
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_frames = num_frames
        self.fps = fps
        self.buckets = buckets
        self.bucket_set = self.buckets.bucket_set(num_frames)
        self.image_fraction = image_fraction
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = seed

    def _dataset(self, shards: str | list[str], batches: int, train: bool) -> BucketedClipDataset:
        rank, world_size = self.rank_and_world()
        return BucketedClipDataset(
            shards,
            self.bucket_set,
            batch_size=self.batch_size,
            batches=batches,
            fps=self.fps,
            train=train,
            image_fraction=self.image_fraction,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start=self.resume_cursors(rank, world_size) if train else None,
        )

    def _loader(self, stage: str, dataset: BucketedClipDataset) -> TrackingLoader:
        # Under a Trainer, on_after_batch_transfer normalises on the training device instead.
        return self.make_loader(stage, dataset, transform=_normalize_batch if self.trainer is None else None)

    def train_dataloader(self) -> TrackingLoader:
        return self._loader("train", self._dataset(self.train_shards, self.batches_per_epoch, train=True))

    def val_dataloader(self) -> TrackingLoader | list:
        if self.val_shards is None:
            return []
        return self._loader("val", self._dataset(self.val_shards, self.val_batches, train=False))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if batch["video"].dtype == torch.uint8:
            batch["video"] = normalize_video(batch["video"])
        return batch

"""The bucketed clip stream: an IterableDataset that yields whole batches, each of one bucket.

Each DataLoader worker of each rank reads its own part of the shards (``shards.plan_pass``), decodes samples
into clips, and groups them by bucket; a batch is yielded when a bucket has ``batch_size`` clips. Every rank
yields exactly ``batches`` batches per iteration (the stream cycles through the shards as often as needed),
so no rank waits for another at the end of an epoch.

Determinism: the shard order of pass ``p`` depends on (seed, p); a sample's randomness (clip start, crop,
resolution entry) on (seed, p, shard, sample index); the kind of batch ``b`` (image or video) on
(seed, rank, worker, b). A worker's position is a ``streaming.Cursor`` that travels back in every batch, so a
run resumes exactly where it stopped (``VideoDataModule.state_dict``). The training stream of a worker
persists across epochs (persistent workers), so epoch ``e + 1`` continues where epoch ``e`` ended.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from datamodules.buckets import BucketSet
from datamodules.samples import Clip, SampleDecoder, media_kind
from datamodules.shards import WorkerSlot
from datamodules.streaming import BucketStream, WorkerStreamDataset


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 → contiguous float32 in [-1, 1] (0 and 255 map exactly to -1 and 1), on the tensor's device."""
    return video.to(torch.float32, memory_format=torch.contiguous_format).sub_(127.5).div_(127.5)


def stack_clips(clips: list[Clip]) -> torch.Tensor:
    """Clips of one bucket → ``B×3×T×H×W`` uint8 (one copy)."""
    return torch.stack([clip.frames.transpose(0, 1) for clip in clips])


class _ClipStream(BucketStream):
    """Decodes raw video / image samples into clips cut to their bucket."""

    def __init__(self, ds: BucketedClipDataset, slot: WorkerSlot, cursor: dict[str, Any]) -> None:
        in_worker = get_worker_info() is not None
        self.decoder = SampleDecoder(ds.buckets, ds.fps, train=ds.train, threads=not in_worker)
        super().__init__(ds, slot, cursor)

    def peek_kind(self, raw: dict[str, Any]) -> str | None:
        return media_kind(raw)

    def decode(self, raw: dict[str, Any], rng: np.random.Generator) -> Clip:
        return self.decoder(raw, rng)

    def collate(self, clips: list[Clip]) -> dict[str, Any]:
        fps = [self.ds.fps or float(c.info.get("fps") or 0) for c in clips]
        return {
            "video": stack_clips(clips),  # uint8: workers ship a quarter of the bytes of float32
            "caption": [c.caption for c in clips],
            "is_image": torch.tensor([c.is_image for c in clips]),
            "meta": {
                "key": [c.key for c in clips],
                "url": [c.url for c in clips],
                "start": [c.start for c in clips],
                "fps": fps,
                "info": [c.info for c in clips],
                "bucket": clips[0].bucket.name,
            },
        }


class BucketedClipDataset(WorkerStreamDataset):
    """Yields ready batches (``batch_size=None`` in the DataLoader), ``batches`` per rank per iteration.

    A batch is ``{"video": B×3×T×H×W uint8, "caption": list[str], "is_image": bool B, "meta": {...}}``;
    every sample of a batch has the same bucket (T, H, W). Images are 1-frame clips. ``normalize_video`` turns
    the video into float in [-1, 1] (``VideoDataModule`` does it after the batch reaches its device).
    """

    stream_class = _ClipStream

    def __init__(
        self,
        shards: str | list[str],
        buckets: BucketSet,
        batch_size: int,
        batches: int,
        fps: float | None,
        train: bool,
        image_fraction: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(shards, batch_size, batches, train, image_fraction, seed, rank, world_size, start)
        self.buckets = buckets
        self.fps = fps

"""The bucketed clip stream: an IterableDataset that yields whole batches, each of one bucket.

Each DataLoader worker of each rank reads its own part of the shards (``shards.plan_pass``), decodes samples
into clips, and groups them by bucket; a batch is yielded when a bucket has ``batch_size`` clips. Every rank
yields exactly ``batches`` batches per iteration (the stream cycles through the shards as often as needed),
so no rank waits for another at the end of an epoch.

Determinism: the shard order of pass ``p`` depends on (seed, p); a sample's randomness (clip start, crop,
resolution entry) on (seed, p, shard, sample index); the kind of batch ``b`` (image or video) on
(seed, rank, worker, b). A worker's position is a ``Cursor`` that travels back in every batch, so a run can
be resumed where it stopped (``VideoDataModule.state_dict``). The training stream of a worker persists
across epochs (persistent workers), so epoch ``e + 1`` continues where epoch ``e`` ended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from datamodules.buckets import Bucket, BucketSet
from datamodules.samples import Clip, SampleDecoder, media_kind
from datamodules.shards import WorkerSlot, expand_shards, plan_pass, read_shard
from datamodules.skips import SkipCounter, SkipSample
from datamodules.streaming import WorkerStreamDataset

KINDS = ("image", "video")


@dataclass
class Cursor:
    """A worker's position in its stream: the next sample to read and the number of batches yielded."""

    pass_index: int = 0
    shard_position: int = 0
    """Index into the worker's shard list of the current pass."""
    sample_index: int = 0
    """Samples already read from that shard."""
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 → contiguous float32 in [-1, 1] (0 and 255 map exactly to -1 and 1), on the tensor's device."""
    return video.to(torch.float32, memory_format=torch.contiguous_format).sub_(127.5).div_(127.5)


def stack_clips(clips: list[Clip]) -> torch.Tensor:
    """Clips of one bucket → ``B×3×T×H×W`` uint8 (one copy)."""
    return torch.stack([clip.frames.transpose(0, 1) for clip in clips])


class _WorkerStream:
    """Batches for one worker: reads samples, decodes them, fills per-bucket buffers, picks the batch kind."""

    def __init__(self, dataset: BucketedClipDataset, slot: WorkerSlot, cursor: Cursor) -> None:
        self.ds = dataset
        self.slot = slot
        self.cursor = Cursor(**cursor.as_dict())
        self.counter = SkipCounter(f" (rank {slot.rank}, worker {slot.worker})")
        in_worker = get_worker_info() is not None
        self.decoder = SampleDecoder(dataset.buckets, dataset.fps, train=dataset.train, threads=not in_worker)
        self.pending: dict[Bucket, list[Clip]] = {}
        self.ready: dict[str, deque[list[Clip]]] = {kind: deque() for kind in KINDS}
        # Full batches of the kind not asked for wait here (at most one); a kind with no share is never decoded.
        p = dataset.image_fraction
        self.max_ready = {"image": int(p is None or p > 0), "video": int(p is None or p < 1)}
        self.samples = self._samples()
        self.fruitless_passes = 0
        self.progress = False
        self.wanted: str | None = None

    def _samples(self) -> Iterator[tuple[dict[str, Any], np.random.Generator]]:
        """Raw samples of this worker, forever, each with its own RNG; advances the cursor."""
        ds, cur = self.ds, self.cursor
        while True:
            plan = plan_pass(ds.urls, self.slot, ds.seed, cur.pass_index, shuffle=ds.train)
            while cur.shard_position < len(plan.urls):
                position, resume_at = cur.shard_position, cur.sample_index
                for index, raw in enumerate(read_shard(plan.urls[position], self.counter)):
                    if index < resume_at:
                        continue
                    cur.sample_index = index + 1
                    if plan.keeps(position, index):
                        seed = [ds.seed, int(ds.train), cur.pass_index, plan.shard_ids[position], index]
                        yield raw, np.random.default_rng(seed)
                cur.shard_position, cur.sample_index = position + 1, 0
            cur.pass_index, cur.shard_position = cur.pass_index + 1, 0
            self.fruitless_passes = 0 if self.progress else self.fruitless_passes + 1
            self.progress = False
            # The first pass may have started mid-way (resume); a second whole pass without progress is final.
            if self.fruitless_passes >= 2:
                self._fail()

    def _fail(self) -> None:
        kind = {None: "", "image": "image ", "video": "video "}[self.wanted]
        urls = plan_pass(self.ds.urls, self.slot, self.ds.seed, 0, False).urls
        shown = ", ".join(urls[:3]) + (", …" if len(urls) > 3 else "")
        raise RuntimeError(
            f"no usable {kind}sample in a whole pass over the {len(urls)} shard(s) of rank {self.slot.rank} "
            f"worker {self.slot.worker} ({shown}); skipped so far: {dict(self.counter.counts)}. Check the "
            "shards with `fsvideo data inspect`, or change image_fraction if that kind is simply absent."
        )

    def _choose_kind(self) -> str | None:
        p = self.ds.image_fraction
        if p is None:
            return None
        rng = np.random.default_rng([self.ds.seed, self.slot.rank, self.slot.worker, self.cursor.batches])
        return "image" if rng.random() < p else "video"

    def next_batch(self) -> dict[str, Any]:
        self.wanted = self._choose_kind()
        clips = self._next_clips()
        self.cursor.batches += 1
        self.progress = True
        return self._collate(clips)

    def _next_clips(self) -> list[Clip]:
        if self.wanted is not None and self.ready[self.wanted]:
            return self.ready[self.wanted].popleft()
        while True:
            raw, rng = next(self.samples)
            kind = media_kind(raw)
            if kind is not None and kind != self.wanted and len(self.ready[kind]) >= self.max_ready[kind]:
                continue  # throttled to keep the image/video ratio: not bad data, not counted
            try:
                clip = self.decoder(raw, rng)
            except SkipSample as skip:
                self.counter.record(skip, raw.get("__key__", ""), raw.get("__url__", ""))
                continue
            if self.wanted is None or clip.is_image == (self.wanted == "image"):
                self.progress = True
            bucket = self.pending.setdefault(clip.bucket, [])
            bucket.append(clip)
            if len(bucket) < self.ds.batch_size:
                continue
            del self.pending[clip.bucket]
            if self.wanted is None or kind == self.wanted:
                return bucket
            self.ready[kind].append(bucket)

    def _collate(self, clips: list[Clip]) -> dict[str, Any]:
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
                "stage": "train" if self.ds.train else "val",
                "rank": self.slot.rank,
                "worker": self.slot.worker,
                "cursor": self.cursor.as_dict(),
                "skipped": self.counter.snapshot(),
            },
        }


class BucketedClipDataset(WorkerStreamDataset):
    """Yields ready batches (``batch_size=None`` in the DataLoader), ``batches`` per rank per iteration.

    A batch is ``{"video": B×3×T×H×W uint8, "caption": list[str], "is_image": bool B, "meta": {...}}``;
    every sample of a batch has the same bucket (T, H, W). Images are 1-frame clips. ``normalize_video`` turns
    the video into float in [-1, 1] (``VideoDataModule`` does it after the batch reaches its device).
    """

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
        start: dict[int, dict[str, int]] | None = None,
    ) -> None:
        super().__init__(batch_size, batches, train, image_fraction, rank, world_size, start)
        self.urls = expand_shards(shards)
        self.buckets = buckets
        self.fps = fps
        self.seed = seed

    def open_stream(self, slot: WorkerSlot, cursor: dict[str, int]) -> _WorkerStream:
        return _WorkerStream(self, slot, Cursor(**cursor))

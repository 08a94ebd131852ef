"""DataModules of the DiT stages: batches of FSAE latents with their text and image tokens.

Two sources, chosen by the config's ``data.class_path``; both give the same batch and the same attributes:

    LatentDataModule           reads a latent cache written by ``fsvideo data encode`` (the fast path).
    EncodingVideoDataModule    reads video shards like ``VideoDataModule`` and encodes each batch on the
                               training device (``on_after_batch_transfer``) with the frozen FSAE and encoders.

A batch is ``{"latent": B×C×t×h×w float32 (not normalised), "text_tokens": B×L×D float32 (zero past the
prompt), "text_mask": B×L bool, "image_tokens": B×M×D' float32 (of frame 0), "caption": list[str],
"is_image": bool B, "meta": dict}``; its samples share one bucket, so a batch is all stills (t = 1) or all clips.
After ``setup`` both expose ``latent_stats`` (``LatentStats``, the per-channel mean / std the DiT normalises
with) and ``empty_text`` (tokens ``1×L×D``, mask ``1×L``: the empty prompt, what CFG dropout substitutes).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from datamodules.latent_cache import (
    LatentCache,
    LatentSample,
    LatentStats,
    check_same_latent_space,
    pad_text,
    unpack_sample,
)
from datamodules.latent_encoder import EncoderPaths, LatentEncoder
from datamodules.pipeline import Cursor
from datamodules.shards import WorkerSlot, plan_pass, read_shard
from datamodules.skips import SkipCounter, SkipSample
from datamodules.streaming import StreamDataModule, WorkerStreamDataset
from datamodules.video import TrackingLoader, VideoDataModule

log = logging.getLogger(__name__)

KINDS = ("image", "video")


class _LatentStream:
    """Batches for one worker: reads cached samples, fills per-bucket buffers, picks the kind of each batch.

    With ``image_fraction`` p, batch b is a batch of stills with probability p (drawn from seed, rank, worker
    and b); a full batch of the other kind waits (at most one), and further samples of that kind are passed
    over while it waits, as ``VideoDataModule`` does.
    """

    def __init__(self, ds: LatentBatchDataset, slot: WorkerSlot, cursor: Cursor) -> None:
        self.ds = ds
        self.slot = slot
        self.cursor = Cursor(**cursor.as_dict())
        self.counter = SkipCounter(f" (rank {slot.rank}, worker {slot.worker})")
        self.pending: dict[str, list[LatentSample]] = {}
        self.ready: dict[str, deque[list[LatentSample]]] = {kind: deque() for kind in KINDS}
        p = ds.image_fraction
        self.max_ready = {"image": int(p is None or p > 0), "video": int(p is None or p < 1)}
        self.wanted: str | None = None
        self.progress = False
        self.samples = self._samples()

    def _samples(self) -> Iterator[LatentSample]:
        ds, cur = self.ds, self.cursor
        fruitless_passes = 0
        while True:
            plan = plan_pass(ds.urls, self.slot, ds.seed, cur.pass_index, shuffle=ds.train)
            while cur.shard_position < len(plan.urls):
                position, resume_at = cur.shard_position, cur.sample_index
                for index, raw in enumerate(read_shard(plan.urls[position], self.counter)):
                    if index < resume_at:
                        continue
                    cur.sample_index = index + 1
                    if not plan.keeps(position, index):
                        continue
                    try:
                        yield unpack_sample(raw)
                    except SkipSample as skip:
                        self.counter.record(skip, raw.get("__key__", ""), raw.get("__url__", ""))
                cur.shard_position, cur.sample_index = position + 1, 0
            cur.pass_index, cur.shard_position = cur.pass_index + 1, 0
            fruitless_passes = 0 if self.progress else fruitless_passes + 1
            self.progress = False
            # The first pass may have started mid-way (resume); a second whole pass without progress is final.
            if fruitless_passes >= 2:
                kind = f"{self.wanted} " if self.wanted else ""
                raise RuntimeError(
                    f"no usable {kind}sample in a whole pass over the {len(plan.urls)} latent shard(s) of rank "
                    f"{self.slot.rank} worker {self.slot.worker}; skipped so far: {dict(self.counter.counts)}. "
                    "Check the cache, or change image_fraction if that kind is absent from it."
                )

    def next_batch(self) -> dict[str, Any]:
        p = self.ds.image_fraction
        if p is not None:
            rng = np.random.default_rng([self.ds.seed, self.slot.rank, self.slot.worker, self.cursor.batches])
            self.wanted = "image" if rng.random() < p else "video"
        samples = self._next_samples()
        self.cursor.batches += 1
        self.progress = True
        return self._collate(samples)

    def _next_samples(self) -> list[LatentSample]:
        if self.wanted is not None and self.ready[self.wanted]:
            return self.ready[self.wanted].popleft()
        while True:
            sample = next(self.samples)
            kind = "image" if sample.is_image else "video"
            if kind != self.wanted and len(self.ready[kind]) >= self.max_ready[kind]:
                continue  # throttled to keep the image/video ratio: not bad data, not counted
            if self.wanted is None or kind == self.wanted:
                self.progress = True
            group = self.pending.setdefault(sample.bucket, [])
            group.append(sample)
            if len(group) < self.ds.batch_size:
                continue
            del self.pending[sample.bucket]
            if self.wanted is None or kind == self.wanted:
                return group
            self.ready[kind].append(group)

    def _collate(self, samples: list[LatentSample]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "latent": torch.stack([s.latent for s in samples]),
            "caption": [s.caption for s in samples],
            "is_image": torch.tensor([s.is_image for s in samples]),
            "meta": {
                "key": [s.meta.get("source_key", "") for s in samples],
                "bucket": samples[0].bucket,
                "stage": "train" if self.ds.train else "val",
                "rank": self.slot.rank,
                "worker": self.slot.worker,
                "cursor": self.cursor.as_dict(),
                "skipped": self.counter.snapshot(),
            },
        }
        if samples[0].text_tokens is not None:
            batch["text_tokens"], batch["text_mask"] = pad_text(
                [s.text_tokens for s in samples], self.ds.text_len
            )
            batch["image_tokens"] = torch.stack([s.image_tokens.float() for s in samples])
        return batch


class LatentBatchDataset(WorkerStreamDataset):
    """Yields ready batches of one latent cache (``batch_size=None`` in the DataLoader), ``batches`` per rank
    per iteration; shards are split across ranks and workers and cycled as in ``BucketedClipDataset``."""

    def __init__(
        self,
        cache: LatentCache,
        batch_size: int,
        batches: int,
        train: bool,
        image_fraction: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: dict[int, dict[str, int]] | None = None,
    ) -> None:
        super().__init__(batch_size, batches, train, image_fraction, rank, world_size, start)
        self.urls = cache.urls
        self.text_len = cache.text_len
        self.seed = seed

    def open_stream(self, slot: WorkerSlot, cursor: dict[str, int]) -> _LatentStream:
        return _LatentStream(self, slot, Cursor(**cursor))


class LatentDataModule(StreamDataModule):
    """Batches from latent caches written by ``fsvideo data encode`` (see the module docstring for the batch).

    Buckets, frames and fps are those the cache was encoded with; the train and validation caches must share
    one latent space (same FSAE weights and encoders, checked from their fingerprints). ``latent_stats`` are
    the training cache's. Under DDP every rank and worker reads different shards and every rank yields exactly
    ``batches_per_epoch`` batches per epoch; the training position is saved in checkpoints and restored.
    """

    def __init__(
        self,
        train_cache: str,
        val_cache: str | None = None,
        batch_size: int = 2,
        num_workers: int = 2,
        image_fraction: float | None = None,
        batches_per_epoch: int = 100,
        val_batches: int = 4,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_cache: Directory of the training latent cache (the ``--out`` of ``fsvideo data encode``).
            val_cache: Directory of the validation latent cache (encoded with ``--validation``); None disables
                validation.
            batch_size: Samples per batch (per rank).
            num_workers: DataLoader worker processes per rank (0 reads in the main process).
            image_fraction: Share of batches made of stills: 1 for the image stage, 0 for video-only stages,
                None takes stills and clips as they come.
            batches_per_epoch: Training batches each rank yields per epoch (the stream cycles over the shards).
            val_batches: Validation batches each rank yields per validation run (always the same ones).
            seed: Seeds the shard order and the image/video choice (with pass, rank and worker).
        """
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 or more.")
        self.save_hyperparameters()
        self.train_cache = train_cache
        self.val_cache = val_cache
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_fraction = image_fraction
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = seed
        self.caches: dict[str, LatentCache] = {}
        self.latent_stats: LatentStats | None = None
        self.empty_text: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.caches:
            return
        self.caches["train"] = LatentCache.open(self.train_cache)
        if self.val_cache is not None:
            self.caches["val"] = LatentCache.open(self.val_cache)
            check_same_latent_space(self.caches["train"], self.caches["val"])
        train = self.caches["train"]
        self.latent_stats = train.stats
        self.empty_text = train.empty_text() if train.has_conditions else None

    def _loader(self, stage: str, batches: int) -> TrackingLoader:
        self.setup()
        rank, world_size = self.rank_and_world()
        train = stage == "train"
        dataset = LatentBatchDataset(
            self.caches[stage],
            self.batch_size,
            batches,
            train=train,
            image_fraction=self.image_fraction,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start=self.resume_cursors(rank, world_size) if train else None,
        )
        loader = TrackingLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            normalize=False,
        )
        self.loaders[stage] = loader
        return loader

    def train_dataloader(self) -> TrackingLoader:
        return self._loader("train", self.batches_per_epoch)

    def val_dataloader(self) -> TrackingLoader | list:
        return [] if self.val_cache is None else self._loader("val", self.val_batches)


class EncodingVideoDataModule(VideoDataModule):
    """``VideoDataModule`` whose batches are encoded on the training device into DiT batches (see the module
    docstring): no cache needed, at the price of running the FSAE and both encoders every step.

    Args:
        encoders: the FSAE run and the text / image encoder folders (both encoders required).
        latent_stats: ``stats.json`` (or a latent cache directory holding one) with the per-channel latent
            mean / std the DiT normalises with; a cache of the same FSAE gives them.
        **kwargs: the ``VideoDataModule`` arguments (shards, buckets, frames, fps, batch sizes, …).
    """

    def __init__(self, encoders: EncoderPaths, latent_stats: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not encoders.has_conditions:
            raise ValueError(
                "EncodingVideoDataModule needs encoders.text_encoder and encoders.image_encoder: the DiT is "
                "conditioned on both."
            )
        self.encoders = encoders
        self.latent_stats_path = latent_stats
        self.encoder: LatentEncoder | None = None
        self.latent_stats: LatentStats | None = None
        self.empty_text: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is not None:
            return
        encoder = LatentEncoder.from_paths(self.encoders)
        stats = LatentStats.read(self.latent_stats_path)
        channels = encoder.autoencoder.config.latent_channels
        if stats.channels != channels:
            raise ValueError(
                f"latent_stats {self.latent_stats_path} has {stats.channels} channels but the FSAE at "
                f"{self.encoders.autoencoder} makes {channels}; use statistics of this FSAE's latents."
            )
        self.encoder, self.latent_stats, self.empty_text = encoder, stats, encoder.empty_text()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Replaces ``video`` by the encoded ``latent`` and condition tokens, on the batch's device."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        video = batch["video"]
        if self.encoder.device != video.device:
            self.encoder.to(video.device)
        encoded = self.encoder(video, batch["caption"])
        return {**{k: v for k, v in batch.items() if k != "video"}, **encoded}

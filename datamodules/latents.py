"""DataModules of the DiT stages: batches of FSAE latents with their text and image tokens.

Two sources, chosen by the config's ``data.class_path``; both give the same batch and the same attributes:

    LatentDataModule           reads a latent cache written by ``fsvideo data encode`` (the fast path).
    EncodingVideoDataModule    reads video shards like ``VideoDataModule`` and encodes each batch on the
                               training device (``on_after_batch_transfer``) with the frozen FSAE and encoders.

A batch is ``{"latent": B×C×t×h×w float32 (not normalised), "text_tokens": B×L×D float32 (zero past the
prompt), "text_mask": B×L bool, "image_tokens": B×M×D' float32 (of frame 0), "caption": list[str],
"is_image": bool B, "meta": dict}``; its samples share one bucket, so a batch is all stills (t = 1) or all clips.
Both are ``LatentData``: the declared interface through which a stage learns the data's latent statistics,
latent space and empty prompt.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from datamodules.latent_cache import (
    LatentCache,
    LatentSample,
    check_same_latent_space,
    pad_text,
    unpack_sample,
)
from datamodules.latent_encoder import EncoderPaths, LatentEncoder
from datamodules.streaming import BucketStream, StreamDataModule, TrackingLoader, WorkerStreamDataset
from datamodules.video import VideoDataModule
from fsvideo.latent_space import LatentSpace, LatentStats
from fsvideo.upsampler import downsample_video

log = logging.getLogger(__name__)


class LatentData:
    """What a DataModule of latents offers the stage that trains on it, set by its ``setup``."""

    latent_stats: LatentStats | None = None
    """Per-channel mean / std of the latents, which the DiT normalises with."""
    latent_space: LatentSpace | None = None
    """Which FSAE encoder, condition encoders and text length made the data; a DiT refuses data of another."""
    empty_text: tuple[torch.Tensor, torch.Tensor] | None = None
    """Tokens ``1×L×D`` and mask ``1×L`` of the empty prompt: what CFG dropout substitutes (None without text)."""

    def encoder_paths(self) -> EncoderPaths | None:
        """Where the FSAE and text / image encoders that made the latents live; None when no encoders are named."""
        raise NotImplementedError

    def held_out_shards(self) -> list[str] | str | None:
        """The video shards of the held-out set (for in-training samples); None when unknown."""
        raise NotImplementedError

    def skipped_counts(self, stage: str = "train") -> dict[str, int]:
        """Samples skipped so far by reason, ``data/skipped_*`` (the stream DataModules' count)."""
        raise NotImplementedError


class _LatentStream(BucketStream):
    """Unpacks cached samples; batches pad the prompts' tokens to the cache's text length."""

    def decode(self, raw: dict[str, Any], rng: np.random.Generator) -> LatentSample:
        return unpack_sample(raw)

    def collate(self, samples: list[LatentSample]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "latent": torch.stack([s.latent for s in samples]),
            "caption": [s.caption for s in samples],
            "is_image": torch.tensor([s.is_image for s in samples]),
            "meta": {"key": [s.meta.get("source_key", "") for s in samples], "bucket": samples[0].bucket},
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

    stream_class = _LatentStream

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
        start: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            cache.urls, batch_size, batches, train, image_fraction, seed, rank, world_size, start
        )
        self.text_len = cache.text_len


class LatentDataModule(StreamDataModule, LatentData):
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
        self.latent_space = train.latent_space

    def encoder_paths(self) -> EncoderPaths | None:
        """The encoders the training cache's fingerprint names (the paths given to `fsvideo data encode`)."""
        self.setup()
        cache = self.caches["train"]
        if not cache.has_conditions:
            return None
        encoders = cache.fingerprint["encoders"]
        return EncoderPaths(
            autoencoder=encoders["autoencoder"]["path"],
            text_encoder=encoders["text_encoder"],
            image_encoder=encoders["image_encoder"],
            text_len=cache.text_len,
            dtype=encoders["dtype"],
        )

    def held_out_shards(self) -> list[str] | str | None:
        """The video shards the validation cache was encoded from."""
        self.setup()
        cache = self.caches.get("val")
        return None if cache is None else cache.fingerprint.get("shards")

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
        return self.make_loader(stage, dataset)

    def train_dataloader(self) -> TrackingLoader:
        return self._loader("train", self.batches_per_epoch)

    def val_dataloader(self) -> TrackingLoader | list:
        return [] if self.val_cache is None else self._loader("val", self.val_batches)


class EncodingVideoDataModule(VideoDataModule, LatentData):
    """``VideoDataModule`` whose batches are encoded on the training device into DiT batches (see the module
    docstring): no cache needed, at the price of running the FSAE and both encoders every step.

    Args:
        encoders: the FSAE run and the text / image encoder folders (both encoders required).
        latent_stats: ``stats.json`` (or a latent cache directory holding one) with the per-channel latent
            mean / std the DiT normalises with; a cache of the same FSAE gives them.
        low_resolution_latents: also encode each clip downsampled ×2 (bicubic, ``fsvideo.upsampler.
            downsample_video``) as ``latent_low`` ``B×C×t×(h/2)×(w/2)``: the paired latents the refiner
            (§2.4.2) trains on. Bucket sides must then be multiples of 128.
        **kwargs: the ``VideoDataModule`` arguments (shards, buckets, frames, fps, batch sizes, …).
    """

    def __init__(
        self, encoders: EncoderPaths, latent_stats: str, low_resolution_latents: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.low_resolution_latents = low_resolution_latents
        if not encoders.has_conditions:
            raise ValueError(
                "EncodingVideoDataModule needs encoders.text_encoder and encoders.image_encoder: the DiT is "
                "conditioned on both."
            )
        self.encoders = encoders
        self.latent_stats_path = latent_stats
        self.encoder: LatentEncoder | None = None

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
        self.latent_space = self.encoders.latent_space(encoder.autoencoder)

    def encoder_paths(self) -> EncoderPaths | None:
        return self.encoders

    def held_out_shards(self) -> list[str] | str | None:
        return self.val_shards

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Replaces ``video`` by the encoded ``latent`` and condition tokens, on the batch's device."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        video = batch["video"]
        if self.encoder.device != video.device:
            self.encoder.to(video.device)
        encoded = self.encoder(video, batch["caption"])
        if self.low_resolution_latents:
            encoded["latent_low"] = self.encoder.encode_latent(downsample_video(video))
        return {**{k: v for k, v in batch.items() if k != "video"}, **encoded}

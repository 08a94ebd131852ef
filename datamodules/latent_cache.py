"""Latent cache: encode video shards once with the frozen FSAE and condition encoders; the DiT trains on the result.

Clips are cut by the same code as ``VideoDataModule`` (``SampleDecoder`` with the stage's ``BucketConfig``,
frame count and fps, and the per-sample RNG of the training stream's first pass), so a cached latent is the
latent of the clip that stream would give. A cache directory holds:

    latents-000000.tar …     WebDataset shards. Per sample ``KEY.safetensors``: ``latent`` ``C×t×h×w`` float32
                             (the first-frame latent is ``latent[:, :1]``: the FSAE encodes frame 0 alone) and,
                             when conditions were encoded, ``text_tokens`` ``n×D`` (the prompt's n real tokens;
                             padding is restored on reading) and ``image_tokens`` ``M×D'`` of frame 0, in
                             ``token_dtype``; ``KEY.json``: caption, bucket, is_image and where the clip came from.
                             Shard k holds the ``samples_per_shard`` clips read after shard k − 1 was closed.
    empty_text.safetensors   ``text_tokens`` ``n×D`` of the empty prompt (the unconditional branch of CFG).
    stats.json               per-channel latent mean / std over every latent element (``LatentStats``).
    fingerprint.json         what made the cache: its ``latent_space`` (``LatentSpace``: FSAE encoder hash and
                             the config fields that shape the latent, text / image encoder folder hashes, text
                             length), then for information the encoders' paths, whole-FSAE weights hash and
                             config, encoder dtype; and the bucket rules, frames, fps, seed, source shards,
                             token dtype.
    index.json               written last (its absence marks an incomplete cache): shard names, sample and
                             bucket counts, skipped samples by reason.

``datamodules.latent_writer.encode_shards`` writes caches (and resumes interrupted writes); this module reads them.

Encoding into a directory that holds a cache with another fingerprint is refused; ``LatentCache.open`` and
``check_same_latent_space`` let readers refuse caches that do not share one latent space, and saved DiTs
record theirs (``fsvideo.latent_space.LatentSpace``, which with ``LatentStats`` lives in ``fsvideo/``).

Public API:
    LatentCache.open(path) -> LatentCache       .urls, .stats, .fingerprint, .latent_space, .index, .text_len,
                                                 .empty_text()
    LatentSample, unpack_sample(raw) -> LatentSample
    check_same_latent_space(a, b)
    read_cache_samples(cache) -> Iterator[LatentSample]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from datamodules.shards import read_shard
from datamodules.skips import SkipCounter, SkipSample
from fsvideo.latent_space import LatentSpace, LatentStats

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the layout; 2: ``latent_space`` holds the FSAE encoder's identity, not the whole FSAE's."""
SHARD_NAME = "latents-%06d.tar"
PROGRESS_NAME = "latents-%06d.progress.json"
PARTIAL_SUFFIX = ".partial"
"""A file being written; renamed to its name without the suffix once complete."""
FINGERPRINT_FILE = "fingerprint.json"
INDEX_FILE = "index.json"
EMPTY_TEXT_FILE = "empty_text.safetensors"


# ---- samples -------------------------------------------------------------------------------------------


@dataclass
class LatentSample:
    """One cached sample as read back."""

    latent: torch.Tensor
    """``C×t×h×w`` float32."""
    text_tokens: torch.Tensor | None
    """``n×D`` real prompt tokens (no padding), or None in a latents-only cache."""
    image_tokens: torch.Tensor | None
    """``M×D'`` image-encoder tokens of frame 0, or None."""
    caption: str
    bucket: str
    is_image: bool
    meta: dict[str, Any]
    """The json member: source key / url, clip start, fps, source json."""


def unpack_sample(raw: Mapping[str, Any]) -> LatentSample:
    """A raw WebDataset sample of a latent shard → ``LatentSample``; raises SkipSample when it is damaged."""
    if "safetensors" not in raw:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise SkipSample("no_media", f"no safetensors member (has {members})")
    try:
        meta = json.loads(raw["json"])
        caption, bucket, is_image = meta["caption"], meta["bucket"], bool(meta["is_image"])
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("json", f"latent sample json unreadable: {type(e).__name__}: {e}") from e
    try:
        tensors = load_safetensors(raw["safetensors"])
        latent = tensors["latent"].float()
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types on damaged bytes
        raise SkipSample("decode", f"latent tensors unreadable: {type(e).__name__}: {e}") from e
    return LatentSample(
        latent, tensors.get("text_tokens"), tensors.get("image_tokens"), caption, bucket, is_image, meta
    )


def pad_text(tokens: list[torch.Tensor], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_i×D`` prompt tokens → (``B×text_len×D`` float32, zero past each prompt; mask ``B×text_len`` bool)."""
    out = torch.zeros(len(tokens), text_len, tokens[0].shape[-1])
    mask = torch.zeros(len(tokens), text_len, dtype=torch.bool)
    for i, t in enumerate(tokens):
        n = min(t.shape[0], text_len)
        out[i, :n] = t[:n].float()
        mask[i, :n] = True
    return out, mask


# ---- reading a cache -----------------------------------------------------------------------------------


@dataclass
class LatentCache:
    """A finished cache directory: its shards, statistics, fingerprint and index."""

    root: Path
    index: dict[str, Any]
    fingerprint: dict[str, Any]
    stats: LatentStats

    @classmethod
    def open(cls, path: str | Path) -> LatentCache:
        root = Path(path)
        if not (root / INDEX_FILE).is_file():
            state = "an incomplete cache (encoding did not finish)" if root.is_dir() else "missing"
            raise FileNotFoundError(
                f"{root} is {state}: no {INDEX_FILE}. Write the cache with `fsvideo data encode --out {root}`."
            )
        index = json.loads((root / INDEX_FILE).read_text())
        fingerprint = json.loads((root / FINGERPRINT_FILE).read_text())
        if fingerprint.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{root} has cache format {fingerprint.get('format')}, this code reads {CACHE_FORMAT}; re-encode it."
            )
        return cls(root, index, fingerprint, LatentStats.read(root))

    @property
    def urls(self) -> list[str]:
        return [str(self.root / name) for name in self.index["shards"]]

    @property
    def latent_space(self) -> LatentSpace:
        return LatentSpace(self.fingerprint["latent_space"], f"latent cache {self.root}")

    @property
    def has_conditions(self) -> bool:
        return self.fingerprint["latent_space"]["text_encoder"] is not None

    @property
    def text_len(self) -> int:
        return int(self.fingerprint["latent_space"]["text_len"])

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's tokens ``1×text_len×D`` (float32) and mask ``1×text_len``."""
        if not self.has_conditions:
            raise ValueError(
                f"{self.root} is a latents-only cache (no text / image tokens); the DiT needs them: re-encode "
                "with --text-encoder and --image-encoder."
            )
        tokens = load_safetensors((self.root / EMPTY_TEXT_FILE).read_bytes())["text_tokens"]
        return pad_text([tokens], self.text_len)


def check_same_latent_space(a: LatentCache, b: LatentCache) -> None:
    """Raises a ValueError unless both caches come from the same FSAE encoder and condition encoders."""
    a.latent_space.check_same(b.latent_space, fix="encode both with the same FSAE run and encoders.")


def read_cache_samples(cache: LatentCache) -> Iterator[LatentSample]:
    """Every sample of a cache in order (for inspection and tests; training reads through ``LatentDataModule``)."""
    counter = SkipCounter(f" ({cache.root})")
    for url in cache.urls:
        for raw in read_shard(url, counter):
            yield unpack_sample(raw)

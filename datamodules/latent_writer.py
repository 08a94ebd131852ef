"""Writing a latent cache (layout: ``datamodules.latent_cache``): ``encode_shards`` runs the frozen FSAE and
condition encoders over video shards once.

Resumable: while encoding, ``latents-00000k.progress.json`` is committed (atomically) after shard k: where the
input stops, the running statistics and counts. Re-running an interrupted encode keeps the committed shards and
continues after them (a shard cut short is written again); the result equals an uninterrupted encode.

Public API:
    encode_shards(autoencoder, shards, out, text_encoder=None, image_encoder=None, ..., restart=False)
        -> LatentCache
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from webdataset import TarWriter

from datamodules.buckets import BucketConfig
from datamodules.latent_cache import (
    CACHE_FORMAT,
    EMPTY_TEXT_FILE,
    FINGERPRINT_FILE,
    INDEX_FILE,
    PARTIAL_SUFFIX,
    PROGRESS_NAME,
    SHARD_NAME,
    LatentCache,
)
from datamodules.latent_encoder import EncoderPaths, LatentEncoder, parse_dtype
from datamodules.pipeline import normalize_video, stack_clips
from datamodules.samples import Clip, SampleDecoder
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SkipCounter, SkipSample
from fsvideo.latent_space import STATS_FILE, LatentStats, differences, jsonable, weights_sha256

log = logging.getLogger(__name__)


class _RunningStats:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.) in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, latent: torch.Tensor) -> None:
        """latent: ``B×C×t×h×w``."""
        values = latent.detach().double().transpose(0, 1).flatten(1)  # (C, B·t·h·w)
        n = values.shape[1]
        mean = values.mean(1)
        m2 = (values - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta.square() * self.count * n / total
        self.count = total

    def state(self) -> dict[str, Any]:
        """json-able state; Python floats survive json exactly, so a resumed run continues bit for bit."""
        return {
            "count": self.count,
            "mean": None if self.mean is None else self.mean.tolist(),
            "m2": None if self.m2 is None else self.m2.tolist(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _RunningStats:
        stats = cls()
        stats.count = state["count"]
        if state["mean"] is not None:
            stats.mean = torch.tensor(state["mean"], dtype=torch.float64)
            stats.m2 = torch.tensor(state["m2"], dtype=torch.float64)
        return stats

    def result(self) -> LatentStats:
        if self.mean is None:
            raise ValueError("no latents were encoded, so there are no statistics; check the shards.")
        std = (self.m2 / self.count).sqrt().clamp_min(1e-6)
        return LatentStats(self.mean.tolist(), std.tolist(), self.count)


def make_fingerprint(
    paths: EncoderPaths,
    encoder: LatentEncoder,
    buckets: BucketConfig,
    num_frames: int,
    fps: float | None,
    validation: bool,
    seed: int,
    urls: list[str],
    token_dtype: str,
) -> dict[str, Any]:
    """What made a cache. ``latent_space`` alone decides whether caches can be mixed or a DiT can use them;
    ``encoders`` is for information (paths, the whole FSAE with its decoder, the encoders' dtype)."""
    autoencoder = encoder.autoencoder
    return jsonable(
        {
            "format": CACHE_FORMAT,
            "latent_space": paths.latent_space(autoencoder).fields,
            "encoders": {
                "autoencoder": {
                    "path": str(paths.autoencoder),
                    "weights_sha256": weights_sha256(autoencoder),
                    "config": asdict(autoencoder.config),
                },
                "text_encoder": paths.text_encoder,
                "image_encoder": paths.image_encoder,
                "dtype": paths.dtype,
            },
            "clips": {
                "buckets": asdict(buckets),
                "num_frames": num_frames,
                "fps": fps,
                "validation": validation,
                "seed": seed,
            },
            "shards": urls,
            "token_dtype": token_dtype,
        }
    )


def _pack_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": key,
        "safetensors": save_safetensors({k: v.contiguous() for k, v in tensors.items()}),
        "json": json.dumps(meta).encode(),
    }


def _clips(
    urls: list[str],
    decoder: SampleDecoder,
    seed: int,
    validation: bool,
    counter: SkipCounter,
    start: tuple[int, int] = (0, 0),
) -> Iterator[tuple[Clip, tuple[int, int]]]:
    """Every usable clip of the shards from raw sample ``start`` = (shard, index) on, in order, with the
    per-sample RNG of the stream's first pass, each with the position of the raw sample after it."""
    first_shard, first_index = start
    for shard_id in range(first_shard, len(urls)):
        url = urls[shard_id]
        skip_before = first_index if shard_id == first_shard else 0
        for index, raw in enumerate(read_shard(url, counter)):
            if index < skip_before:
                continue
            rng = np.random.default_rng([seed, int(not validation), 0, shard_id, index])
            try:
                yield decoder(raw, rng), (shard_id, index + 1)
            except SkipSample as skip:
                counter.record(skip, raw.get("__key__", ""), raw.get("__url__", ""))
        log.info(
            "read shard %d/%d: %s (skipped so far: %d)", shard_id + 1, len(urls), url, counter.counts.total()
        )


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or all of ``data``, whenever the process dies."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


@dataclass
class _Progress:
    """State of an encode after its first ``shards`` output shards: enough to go on as if never stopped."""

    shards: int
    """Output shards committed."""
    shard_bytes: int
    """Size of the last of them (a shorter file was cut off while being written)."""
    next_input: list[int]
    """(input shard, raw sample index) to read next."""
    samples: int
    buckets: dict[str, int]
    skipped: dict[str, int]
    stats: dict[str, Any]
    """``_RunningStats.state()``."""
    settings: dict[str, int]
    """``batch_size`` and ``samples_per_shard``: batches and shard bounds depend on them."""


_OUTPUT_FILE = re.compile(r"latents-(\d{6})\.(?:tar|progress\.json)")


def _resume_point(out: Path, settings: dict[str, int]) -> _Progress | None:
    """The progress after the last committed shard whose file is whole (None: start from the beginning);
    removes every output file after it."""
    progress = None
    while True:
        shard = 0 if progress is None else progress.shards
        tar, record = out / (SHARD_NAME % shard), out / (PROGRESS_NAME % shard)
        if not (tar.is_file() and record.is_file()):
            break
        state = _Progress(**json.loads(record.read_text()))
        if tar.stat().st_size != state.shard_bytes:
            log.warning(
                "%s is cut short (%d of %d bytes): it is encoded again",
                tar,
                tar.stat().st_size,
                state.shard_bytes,
            )
            break
        progress = state
    if progress is not None and progress.settings != settings:
        raise ValueError(
            f"{out} holds a partial cache encoded with {progress.settings}, not {settings}: resume with the same "
            "--batch-size and --samples-per-shard, or pass --restart to encode it all again."
        )
    _remove_outputs(out, keep=0 if progress is None else progress.shards)
    return progress


def _prepare_out(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a directory that holds another cache or other files; a new one gets the fingerprint."""
    previous = out / FINGERPRINT_FILE
    if previous.is_file():
        written = json.loads(previous.read_text())
        if written.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{out} holds a latent cache of format {written.get('format')}; this code writes format "
                f"{CACHE_FORMAT}. Delete that directory (or choose another --out) and re-encode."
            )
        diff = differences(written, fingerprint)
        if diff:
            raise ValueError(
                f"{out} already holds a latent cache made differently (fingerprint differs in {diff}); choose "
                "another --out, or delete that directory to replace it."
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"{out} is not empty and holds no latent cache; choose an empty or new --out directory."
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(previous, (json.dumps(fingerprint, indent=1) + "\n").encode())


def _remove_outputs(out: Path, keep: int = 0) -> None:
    """Removes the shards and progress records from number ``keep`` on, and every partly written file."""
    for path in out.iterdir():
        match = _OUTPUT_FILE.fullmatch(path.name.removesuffix(PARTIAL_SUFFIX))
        if match and (path.name.endswith(PARTIAL_SUFFIX) or int(match[1]) >= keep):
            path.unlink()


class _ShardEncoder:
    """Encodes clips, batches of one bucket at a time, into output shards of ``samples_per_shard`` clips (the
    last may hold fewer). A shard holds the clips read since the previous shard was closed: its partly filled
    batches are encoded before it closes, so shard bounds and batches are the same wherever a run started.
    Closing a shard renames it into place, then commits the state to continue from (``_Progress``) beside it.
    """

    def __init__(
        self,
        out: Path,
        encoder: LatentEncoder,
        settings: dict[str, int],
        store_dtype: torch.dtype,
        fps: float | None,
        device: str,
        counter: SkipCounter,
        progress: _Progress | None,
        on_shard: Callable[[int], None] | None,
    ) -> None:
        self.out, self.encoder, self.settings = out, encoder, settings
        self.store_dtype, self.fps, self.device = store_dtype, fps, device
        self.counter, self.on_shard = counter, on_shard
        self.stats = _RunningStats() if progress is None else _RunningStats.from_state(progress.stats)
        self.bucket_counts: Counter[str] = Counter({} if progress is None else progress.buckets)
        self.shards = 0 if progress is None else progress.shards
        self.pending: dict[Any, list[Clip]] = {}
        self.clips_in_shard = 0
        self.file: BinaryIO | None = None
        self.writer: TarWriter | None = None

    def add(self, clip: Clip, next_input: tuple[int, int]) -> None:
        group = self.pending.setdefault(clip.bucket, [])
        group.append(clip)
        if len(group) == self.settings["batch_size"]:
            self._encode(self.pending.pop(clip.bucket))
        self.clips_in_shard += 1
        if self.clips_in_shard == self.settings["samples_per_shard"]:
            self._commit(next_input)

    def finish(self, end: tuple[int, int]) -> None:
        if self.clips_in_shard:
            self._commit(end)

    def _encode(self, clips: list[Clip]) -> None:
        if self.writer is None:
            self.file = open(self._path(SHARD_NAME + PARTIAL_SUFFIX), "wb")
            self.writer = TarWriter(self.file)
        video = normalize_video(stack_clips(clips).to(self.device))
        encoded = {k: v.cpu() for k, v in self.encoder(video, [c.caption for c in clips]).items()}
        self.stats.update(encoded["latent"])
        for i, clip in enumerate(clips):
            tensors = {"latent": encoded["latent"][i]}
            if "text_tokens" in encoded:
                tensors["text_tokens"] = encoded["text_tokens"][i, encoded["text_mask"][i]].to(
                    self.store_dtype
                )
                tensors["image_tokens"] = encoded["image_tokens"][i].to(self.store_dtype)
            meta = {
                "caption": clip.caption,
                "bucket": clip.bucket.name,
                "is_image": clip.is_image,
                "source_key": clip.key,
                "source_url": clip.url,
                "start": clip.start,
                "fps": self.fps or float(clip.info.get("fps") or 0),
                "info": clip.info,
            }
            self.writer.write(_pack_sample(f"{sum(self.bucket_counts.values()):09d}", tensors, meta))
            self.bucket_counts[clip.bucket.name] += 1

    def _path(self, pattern: str) -> Path:
        return self.out / (pattern % self.shards)

    def _commit(self, next_input: tuple[int, int]) -> None:
        for group in self.pending.values():
            self._encode(group)
        self.pending.clear()
        self.writer.close()  # the tar's end blocks; the file stays open
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tar = self._path(SHARD_NAME)
        os.replace(self._path(SHARD_NAME + PARTIAL_SUFFIX), tar)
        progress = _Progress(
            shards=self.shards + 1,
            shard_bytes=tar.stat().st_size,
            next_input=list(next_input),
            samples=sum(self.bucket_counts.values()),
            buckets=dict(self.bucket_counts),
            skipped=self.counter.snapshot(),
            stats=self.stats.state(),
            settings=self.settings,
        )
        _write_atomic(self._path(PROGRESS_NAME), json.dumps(asdict(progress)).encode())
        self.writer = self.file = None
        self.shards += 1
        self.clips_in_shard = 0
        if self.on_shard is not None:
            self.on_shard(self.shards)


def encode_shards(
    autoencoder: str | Path,
    shards: str | list[str],
    out: str | Path,
    text_encoder: str | Path | None = None,
    image_encoder: str | Path | None = None,
    text_len: int = 512,
    buckets: BucketConfig | None = None,
    num_frames: int = 121,
    fps: float | None = 24.0,
    validation: bool = False,
    seed: int = 0,
    batch_size: int = 4,
    samples_per_shard: int = 512,
    token_dtype: str = "bfloat16",
    encoder_dtype: str = "float32",
    device: str = "cpu",
    restart: bool = False,
    on_shard: Callable[[int], None] | None = None,
) -> LatentCache:
    """Encode every usable sample of ``shards`` into a latent cache at ``out`` (layout: module docstring).

    Args:
        autoencoder: FSAE run directory or a checkpoint inside one.
        shards: video shards (paths, brace patterns, ``pipe:`` URLs, or a list).
        out: cache directory: new, empty, or holding a cache with the same fingerprint, which is returned as it
            is when complete and continued after its committed shards when interrupted.
        text_encoder, image_encoder: local UMT5 / CLIP folders; both None writes a latents-only cache.
        text_len: prompt length in tokens (padding / truncation), as the DiT stage will use it.
        buckets, num_frames, fps, seed: the clip rules of the stage, exactly as in ``VideoDataModule``.
        validation: cut clips as the validation stream does (start 0, centred crop) instead of the training
            stream's random start and crop.
        batch_size: clips per encoder call (clips of one bucket).
        samples_per_shard: samples per output tar.
        token_dtype: storage dtype of text / image tokens (float32, bfloat16, float16); latents stay float32.
        encoder_dtype: weights of the text / image encoders.
        device: where the encoders run ("cuda" for real data).
        restart: encode everything again even when ``out`` holds a complete or partial cache of this fingerprint.
        on_shard: called with the number of output shards committed so far after each commit (progress reports;
            the tests interrupt an encode by raising from it).
    """
    store_dtype = parse_dtype(token_dtype, "token_dtype")
    buckets = buckets or BucketConfig()
    paths = EncoderPaths(
        str(autoencoder),
        None if text_encoder is None else str(text_encoder),
        None if image_encoder is None else str(image_encoder),
        text_len=text_len,
        dtype=encoder_dtype,
    )
    if batch_size < 1 or samples_per_shard < 1:
        raise ValueError(f"batch_size={batch_size} and samples_per_shard={samples_per_shard} must be >= 1.")
    urls = expand_shards(shards)
    decoder = SampleDecoder(buckets.bucket_set(num_frames), fps, train=not validation)
    encoder = LatentEncoder.from_paths(paths).to(device)
    out = Path(out)
    fingerprint = make_fingerprint(
        paths, encoder, buckets, num_frames, fps, validation, seed, urls, token_dtype
    )
    _prepare_out(out, fingerprint)
    if restart:
        for name in (INDEX_FILE, STATS_FILE, EMPTY_TEXT_FILE):
            (out / name).unlink(missing_ok=True)
        _remove_outputs(out)
    elif (out / INDEX_FILE).is_file():
        log.info("latent cache %s is already complete; pass --restart to encode it again", out)
        return LatentCache.open(out)
    settings = {"batch_size": batch_size, "samples_per_shard": samples_per_shard}
    progress = _resume_point(out, settings)

    counter = SkipCounter(" (latent cache)")
    start = (0, 0)
    if progress is not None:
        counter.counts.update(progress.skipped)
        start = tuple(progress.next_input)
        log.info(
            "resuming %s after %d shard(s), %d samples (input shard %d, sample %d)",
            out,
            progress.shards,
            progress.samples,
            *start,
        )
    writer = _ShardEncoder(out, encoder, settings, store_dtype, fps, device, counter, progress, on_shard)
    for clip, next_input in _clips(urls, decoder, seed, validation, counter, start):
        writer.add(clip, next_input)
    writer.finish((len(urls), 0))

    if not writer.bucket_counts:
        raise ValueError(
            f"no usable sample in {len(urls)} shard(s) (skipped: {dict(counter.counts)}); check them with "
            "`fsvideo data inspect` and the bucket size / frame count."
        )
    writer.stats.result().write(out)
    if paths.has_conditions:
        tokens, mask = encoder.empty_text()
        (out / EMPTY_TEXT_FILE).write_bytes(
            save_safetensors({"text_tokens": tokens[0, mask[0]].to(store_dtype).cpu().contiguous()})
        )
    index = {
        "shards": [SHARD_NAME % i for i in range(writer.shards)],
        "samples": sum(writer.bucket_counts.values()),
        "buckets": dict(sorted(writer.bucket_counts.items())),
        "skipped": counter.snapshot(),
    }
    _write_atomic(out / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())
    for i in range(writer.shards):  # the index supersedes them
        (out / (PROGRESS_NAME % i)).unlink()
    log.info("latent cache %s: %d samples in %d shard(s)", out, index["samples"], writer.shards)
    return LatentCache.open(out)

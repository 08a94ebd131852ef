"""Latent cache: encode video shards once with the frozen FSAE and condition encoders; the DiT trains on the result.

Clips are cut by the same code as ``VideoDataModule`` (``SampleDecoder`` with the stage's ``BucketConfig``,
frame count and fps, and the per-sample RNG of the training stream's first pass), so a cached latent is the
latent of the clip that stream would give. A cache directory holds:

    latents-000000.tar …     WebDataset shards. Per sample ``KEY.safetensors``: ``latent`` ``C×t×h×w`` float32
                             (the first-frame latent is ``latent[:, :1]``: the FSAE encodes frame 0 alone) and,
                             when conditions were encoded, ``text_tokens`` ``n×D`` (the prompt's n real tokens;
                             padding is restored on reading) and ``image_tokens`` ``M×D'`` of frame 0, in
                             ``token_dtype``; ``KEY.json``: caption, bucket, is_image and where the clip came from.
    empty_text.safetensors   ``text_tokens`` ``n×D`` of the empty prompt (the unconditional branch of CFG).
    stats.json               per-channel latent mean / std over every latent element (``LatentStats``).
    fingerprint.json         what made the cache: FSAE weights hash and config, encoder folder hashes, text
                             length, bucket rules, frames, fps, crops, seed, source shards, token dtype.
    index.json               written last (its absence marks an incomplete cache): shard names, sample and
                             bucket counts, skipped samples by reason.

Encoding into a directory that holds a cache with another fingerprint is refused; ``LatentCache.open`` and
``check_same_latent_space`` let readers refuse caches that do not share one latent space.

Public API:
    encode_shards(autoencoder, shards, out, text_encoder=None, image_encoder=None, ...) -> LatentCache
    LatentCache.open(path) -> LatentCache       .urls, .stats, .fingerprint, .index, .text_len, .empty_text()
    LatentStats                                  per-channel mean / std; .read(path), .write(directory)
    LatentSample, unpack_sample(raw) -> LatentSample
    check_same_latent_space(a, b)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from webdataset import ShardWriter

from datamodules.buckets import BucketConfig
from datamodules.latent_encoder import EncoderPaths, LatentEncoder, parse_dtype
from datamodules.pipeline import normalize_video, stack_clips
from datamodules.samples import Clip, SampleDecoder
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SkipCounter, SkipSample

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SHARD_NAME = "latents-%06d.tar"
STATS_FILE = "stats.json"
FINGERPRINT_FILE = "fingerprint.json"
INDEX_FILE = "index.json"
EMPTY_TEXT_FILE = "empty_text.safetensors"


# ---- statistics ----------------------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Per-channel mean and standard deviation of a cache's latents; the DiT trains on ``(z − mean) / std``."""

    mean: list[float]
    std: list[float]
    elements_per_channel: int
    """Latent values per channel the statistics were computed over."""

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean ({len(self.mean)}) and std ({len(self.std)}) need one value per channel.")
        if min(self.std) <= 0:
            raise ValueError(f"latent std must be positive in every channel, got min {min(self.std)}.")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def read(cls, path: str | Path) -> LatentStats:
        """From a ``stats.json`` or a cache directory holding one."""
        path = Path(path)
        path = path / STATS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no latent statistics; `fsvideo data encode` writes {STATS_FILE} into its --out directory."
            )
        return cls(**json.loads(path.read_text()))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / STATS_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


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

    def result(self) -> LatentStats:
        if self.mean is None:
            raise ValueError("no latents were encoded, so there are no statistics; check the shards.")
        std = (self.m2 / self.count).sqrt().clamp_min(1e-6)
        return LatentStats(self.mean.tolist(), std.tolist(), self.count)


# ---- fingerprint ---------------------------------------------------------------------------------------


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash of every tensor's name, dtype, shape and bytes: the weights' identity, whatever file held them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_sha256(path: str | Path) -> str:
    """Hash of every file's relative path and bytes under ``path``."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Tuples become lists, as they do in the json file, so a fresh fingerprint compares equal to a read one."""
    return json.loads(json.dumps(value))


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
    """What made a cache. ``latent_space`` alone decides whether two caches can be mixed in one run."""
    autoencoder = encoder.autoencoder
    return _jsonable(
        {
            "format": CACHE_FORMAT,
            "latent_space": {
                "autoencoder": {
                    "path": str(paths.autoencoder),
                    "weights_sha256": state_dict_sha256(autoencoder),
                    "config": asdict(autoencoder.config),
                },
                "text_encoder": None
                if paths.text_encoder is None
                else {"path": str(paths.text_encoder), "sha256": folder_sha256(paths.text_encoder)},
                "image_encoder": None
                if paths.image_encoder is None
                else {"path": str(paths.image_encoder), "sha256": folder_sha256(paths.image_encoder)},
                "text_len": paths.text_len,
                "encoder_dtype": paths.dtype,
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


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            out += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}")
    return out


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


def _pack_sample(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "__key__": key,
        "safetensors": save_safetensors({k: v.contiguous() for k, v in tensors.items()}),
        "json": json.dumps(meta).encode(),
    }


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
    """Raises a ValueError unless both caches come from the same FSAE weights and condition encoders."""
    diff = _differences(a.fingerprint["latent_space"], b.fingerprint["latent_space"])
    diff = [d for d in diff if not d.endswith(".path")]  # the same weights may sit at two paths
    if diff:
        raise ValueError(
            f"latent caches {a.root} and {b.root} were made by different encoders (fingerprint differs in "
            f"{diff}); encode both with the same FSAE run and encoders."
        )


# ---- writing a cache -----------------------------------------------------------------------------------


def _clips(
    urls: list[str], decoder: SampleDecoder, seed: int, validation: bool, counter: SkipCounter
) -> Iterator[Clip]:
    """Every usable clip of the shards, in order, with the per-sample RNG of the stream's first pass."""
    for shard_id, url in enumerate(urls):
        for index, raw in enumerate(read_shard(url, counter)):
            rng = np.random.default_rng([seed, int(not validation), 0, shard_id, index])
            try:
                yield decoder(raw, rng)
            except SkipSample as skip:
                counter.record(skip, raw.get("__key__", ""), raw.get("__url__", ""))
        log.info(
            "read shard %d/%d: %s (skipped so far: %d)", shard_id + 1, len(urls), url, counter.counts.total()
        )


def _prepare_out(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a directory that holds another cache; clear a previous (or interrupted) run of the same one."""
    previous = out / FINGERPRINT_FILE
    if previous.is_file():
        diff = _differences(json.loads(previous.read_text()), fingerprint)
        if diff:
            raise ValueError(
                f"{out} already holds a latent cache made differently (fingerprint differs in {diff}); choose "
                "another --out, or delete that directory to replace it."
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"{out} is not empty and holds no latent cache; choose an empty or new --out directory."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)
    for stale in out.glob("latents-*.tar"):
        stale.unlink()
    previous.write_text(json.dumps(fingerprint, indent=1) + "\n")


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
) -> LatentCache:
    """Encode every usable sample of ``shards`` into a latent cache at ``out`` (layout: module docstring).

    Args:
        autoencoder: FSAE run directory or a checkpoint inside one.
        shards: video shards (paths, brace patterns, ``pipe:`` URLs, or a list).
        out: cache directory (new, empty, or a previous cache with the same fingerprint, which is replaced).
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

    counter = SkipCounter(" (latent cache)")
    stats = _RunningStats()
    bucket_counts: Counter[str] = Counter()
    pending: dict[Any, list[Clip]] = {}
    with ShardWriter(str(out / SHARD_NAME), maxcount=samples_per_shard, verbose=0) as writer:

        def flush(clips: list[Clip]) -> None:
            video = normalize_video(stack_clips(clips).to(device))
            encoded = {k: v.cpu() for k, v in encoder(video, [c.caption for c in clips]).items()}
            stats.update(encoded["latent"])
            for i, clip in enumerate(clips):
                tensors = {"latent": encoded["latent"][i]}
                if "text_tokens" in encoded:
                    tensors["text_tokens"] = encoded["text_tokens"][i, encoded["text_mask"][i]].to(
                        store_dtype
                    )
                    tensors["image_tokens"] = encoded["image_tokens"][i].to(store_dtype)
                meta = {
                    "caption": clip.caption,
                    "bucket": clip.bucket.name,
                    "is_image": clip.is_image,
                    "source_key": clip.key,
                    "source_url": clip.url,
                    "start": clip.start,
                    "fps": fps or float(clip.info.get("fps") or 0),
                    "info": clip.info,
                }
                writer.write(_pack_sample(f"{sum(bucket_counts.values()):09d}", tensors, meta))
                bucket_counts[clip.bucket.name] += 1

        for clip in _clips(urls, decoder, seed, validation, counter):
            group = pending.setdefault(clip.bucket, [])
            group.append(clip)
            if len(group) == batch_size:
                flush(pending.pop(clip.bucket))
        for group in pending.values():
            flush(group)
        num_shards = writer.shard

    if not bucket_counts:
        raise ValueError(
            f"no usable sample in {len(urls)} shard(s) (skipped: {dict(counter.counts)}); check them with "
            "`fsvideo data inspect` and the bucket size / frame count."
        )
    stats.result().write(out)
    if paths.has_conditions:
        tokens, mask = encoder.empty_text()
        (out / EMPTY_TEXT_FILE).write_bytes(
            save_safetensors({"text_tokens": tokens[0, mask[0]].to(store_dtype).cpu().contiguous()})
        )
    index = {
        "shards": [SHARD_NAME % i for i in range(num_shards)],
        "samples": sum(bucket_counts.values()),
        "buckets": dict(sorted(bucket_counts.items())),
        "skipped": counter.snapshot(),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    log.info("latent cache %s: %d samples in %d shard(s)", out, index["samples"], num_shards)
    return LatentCache.open(out)


def read_cache_samples(cache: LatentCache) -> Iterator[LatentSample]:
    """Every sample of a cache in order (for inspection and tests; training reads through ``LatentDataModule``)."""
    counter = SkipCounter(f" ({cache.root})")
    for url in cache.urls:
        for raw in read_shard(url, counter):
            yield unpack_sample(raw)

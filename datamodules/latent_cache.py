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

While encoding, ``latents-00000k.progress.json`` is committed (atomically) after shard k: where the input
stops, the running statistics and counts. Re-running an interrupted encode keeps the committed shards and
continues after them (a shard cut short is written again); the result equals an uninterrupted encode.

Encoding into a directory that holds a cache with another fingerprint is refused; ``LatentCache.open`` and
``check_same_latent_space`` let readers refuse caches that do not share one latent space, and DiT
checkpoints record theirs (``LatentSpace.record``).

Public API:
    encode_shards(autoencoder, shards, out, text_encoder=None, image_encoder=None, ..., restart=False)
        -> LatentCache
    LatentCache.open(path) -> LatentCache       .urls, .stats, .fingerprint, .latent_space, .index, .text_len,
                                                 .empty_text()
    LatentSpace.of(paths, encoder)               the latent space of an FSAE run and encoders; .check_same(other)
    LatentStats                                  per-channel mean / std; .read(path), .write(directory)
    LatentSample, unpack_sample(raw) -> LatentSample
    check_same_latent_space(a, b)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from webdataset import TarWriter

from datamodules.buckets import BucketConfig
from datamodules.latent_encoder import EncoderPaths, LatentEncoder, parse_dtype
from datamodules.pipeline import normalize_video, stack_clips
from datamodules.samples import Clip, SampleDecoder
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SkipCounter, SkipSample
from fsvideo.latent_space import fsae_latent_space, weights_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the layout; 2: ``latent_space`` holds the FSAE encoder's identity, not the whole FSAE's."""
SHARD_NAME = "latents-%06d.tar"
PROGRESS_NAME = "latents-%06d.progress.json"
PARTIAL_SUFFIX = ".partial"
"""A file being written; renamed to its name without the suffix once complete."""
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


# ---- fingerprint ---------------------------------------------------------------------------------------


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


@dataclass
class LatentSpace:
    """What gives latents and condition tokens their meaning, so that a DiT trained on one set of them works
    with another: the FSAE *encoder* (its weights' hash and the config fields that shape the latent; not the
    decoder, so the Standard / Lite decoders that keep the encoder frozen share their FSAE's latent space),
    the text and image encoders (hashes of their folders) and the text length. Caches hold it in their
    fingerprint, DiT checkpoints record it (``record()``), and both are compared on it alone."""

    fields: dict[str, Any]
    """json-able identity: ``autoencoder`` (``fsvideo.latent_space.fsae_latent_space``), ``text_encoder`` and
    ``image_encoder`` (``{"sha256": …}`` or None for a latents-only cache) and ``text_len``."""
    source: str = field(default="", compare=False)
    """Where it comes from (a cache directory, encoders, a checkpoint), for error messages."""

    @classmethod
    def of(cls, paths: EncoderPaths, encoder: LatentEncoder) -> LatentSpace:
        """The latent space of ``encoder``, loaded from ``paths``: the one way caches and on-the-fly encoding
        describe theirs. Hashes the FSAE encoder's weights (~1.5 s for the paper FSAE) and the encoder folders."""
        fields = {
            "autoencoder": fsae_latent_space(encoder.autoencoder),
            "text_encoder": None
            if paths.text_encoder is None
            else {"sha256": folder_sha256(paths.text_encoder)},
            "image_encoder": None
            if paths.image_encoder is None
            else {"sha256": folder_sha256(paths.image_encoder)},
            "text_len": paths.text_len,
        }
        encoders = (
            "" if paths.text_encoder is None else f", encoders {paths.text_encoder}, {paths.image_encoder}"
        )
        return cls(_jsonable(fields), f"FSAE {paths.autoencoder}{encoders}")

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str) -> LatentSpace:
        """From a checkpoint's ``record()``; ``where`` names the checkpoint."""
        return cls(dict(record["fields"]), f"{where} (trained on {record['source']})")

    def record(self) -> dict[str, Any]:
        """What a DiT checkpoint stores (``fsvideo.latent_space.LATENT_SPACE_KEY``)."""
        return {"fields": self.fields, "source": self.source}

    def differences(self, other: LatentSpace) -> list[str]:
        """Dotted names of the fields that differ (``autoencoder.encoder_sha256``, ``text_len``, …)."""
        return _differences(self.fields, other.fields)

    def check_same(self, other: LatentSpace, fix: str) -> None:
        """Raise a ValueError naming both sources, the differing fields and ``fix`` unless they are equal."""
        differing = self.differences(other)
        if differing:
            raise ValueError(
                f"{self.source} and {other.source} are in different latent spaces ({differing} differ: another "
                f"FSAE encoder, text / image encoder or text length); {fix}"
            )


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
    return _jsonable(
        {
            "format": CACHE_FORMAT,
            "latent_space": LatentSpace.of(paths, encoder).fields,
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


# ---- writing a cache -----------------------------------------------------------------------------------


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
        diff = _differences(written, fingerprint)
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


def read_cache_samples(cache: LatentCache) -> Iterator[LatentSample]:
    """Every sample of a cache in order (for inspection and tests; training reads through ``LatentDataModule``)."""
    counter = SkipCounter(f" ({cache.root})")
    for url in cache.urls:
        for raw in read_shard(url, counter):
            yield unpack_sample(raw)

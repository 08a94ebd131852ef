"""``fsvideo data inspect``: what training would make of a set of shards, before a week of training does.

Every sample goes through the same decoder and bucket rule as validation (clip from 0 s, centre crop), so
the report's bad samples are exactly the ones training would skip, and its buckets the ones it would use.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from datamodules.buckets import BucketConfig, check_num_frames
from datamodules.samples import SampleDecoder, media_kind
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SKIP_REASONS, SkipCounter, SkipSample


@dataclass
class ShardReport:
    """Counts over a set of shards; ``format()`` (or ``str()``) renders it for a terminal."""

    shards: list[str]
    samples_per_shard: dict[str, int] = field(default_factory=dict)
    videos: int = 0
    images: int = 0
    usable: int = 0
    """Samples that decode into a clip of their bucket."""
    video_seconds: float = 0.0
    """Total duration of the usable videos."""
    buckets: Counter[str] = field(default_factory=Counter)
    """Usable samples per bucket name ``TxHxW``."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Bad samples (and unreadable shards, as "shard") per reason."""
    examples: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(shard, key, reason, message) of the first bad ones of each reason."""

    @property
    def samples(self) -> int:
        return sum(self.samples_per_shard.values())

    def format(self) -> str:
        bad = sum(n for reason, n in self.skipped.items() if reason != "shard")
        lines = [
            f"{len(self.shards)} shard(s), {self.samples} samples: {self.videos} videos, {self.images} images, "
            f"{self.usable} usable, {bad} bad",
        ]
        if self.video_seconds:
            lines.append(f"usable video: {self.video_seconds / 60:.1f} min")
        if self.buckets:
            lines.append("buckets (frames x height x width):")
            widest = max(self.buckets.values())
            for name, n in sorted(self.buckets.items(), key=lambda item: -item[1]):
                lines.append(f"  {name:>14} {n:7d}  {'#' * max(1, round(30 * n / widest))}")
        if self.skipped:
            lines.append("skipped:")
            for reason, n in self.skipped.most_common():
                lines.append(f"  {reason:>8} {n:7d}  {SKIP_REASONS[reason]}")
        if self.examples:
            lines.append("first problems:")
            lines.extend(
                f"  {url} {key or '(shard)'}: {reason}: {message}"
                for url, key, reason, message in self.examples
            )
        return "\n".join(lines)

    __str__ = format


def inspect_shards(
    shards: str | list[str],
    buckets: BucketConfig | None = None,
    num_frames: int = 17,
    fps: float | None = 24.0,
    max_samples: int | None = None,
    max_examples: int = 3,
) -> ShardReport:
    """Reads every sample of ``shards`` (or the first ``max_samples``) the way validation would.

    ``buckets``, ``num_frames`` and ``fps`` should match the stage to be trained: a clip too short for
    ``num_frames`` at ``fps``, or smaller than its bucket, counts as bad. ``max_examples`` problems of each
    reason are kept with their messages.
    """
    check_num_frames(num_frames)
    urls = expand_shards(shards)
    decoder = SampleDecoder((buckets or BucketConfig()).bucket_set(num_frames), fps, train=False)
    counter = SkipCounter(warn=False, keep_examples=max_examples)
    report = ShardReport(shards=urls)
    for url in urls:
        if max_samples is not None and report.samples >= max_samples:
            break
        report.samples_per_shard[url] = 0
        for index, raw in enumerate(read_shard(url, counter)):
            if max_samples is not None and report.samples >= max_samples:
                break
            report.samples_per_shard[url] += 1
            kind = media_kind(raw)
            report.videos += kind == "video"
            report.images += kind == "image"
            try:
                clip = decoder(raw, np.random.default_rng([0, index]))
            except SkipSample as skip:
                counter.record(skip, raw.get("__key__", ""), url)
                continue
            report.usable += 1
            report.buckets[clip.bucket.name] += 1
            if not clip.is_image and math.isfinite(clip.duration):
                report.video_seconds += clip.duration
    report.skipped = Counter({reason: n for reason, n in counter.counts.items() if n})
    report.examples = counter.examples
    return report

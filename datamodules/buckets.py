"""Aspect-ratio buckets (§2.2.1 footnote 2): the one rule that maps a sample to a training shape.

A bucket set is built from a target pixel area (``size²``) and a list of aspect ratios; every bucket side
is a multiple of ``multiple`` (64, the FSAE spatial factor). A sample goes to the bucket whose aspect ratio
is nearest to its own (in log space), and a batch only ever holds samples of one bucket. Mixed-resolution
training (§2.2.1 stage 3) adds more ``Resolution`` entries that trade frames for pixels; a video picks one
entry per sample, by weight, among those its length and frame size can fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from datamodules.skips import SkipSample

DEFAULT_ASPECT_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


def check_num_frames(num_frames: int, what: str = "num_frames") -> None:
    """Raises a ValueError unless ``num_frames`` is ``1 + 4k`` (the FSAE's causal 4× time compression)."""
    if num_frames < 1 or (num_frames - 1) % 4 != 0:
        lower = 1 + 4 * max(0, (num_frames - 1) // 4)
        raise ValueError(
            f"{what}={num_frames} is not 1 + 4k: the FSAE encodes the first frame alone and then groups of 4; "
            f"use {lower} or {lower + 4}."
        )


@dataclass(frozen=True)
class Bucket:
    """One training shape: every sample of a batch is cut to exactly this size."""

    num_frames: int
    """T: frames per sample (1 for a still image)."""
    height: int
    """H in pixels, a multiple of the bucket set's ``multiple``."""
    width: int
    """W in pixels, a multiple of the bucket set's ``multiple``."""

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    @property
    def name(self) -> str:
        """``TxHxW``, the label used in logs and histograms."""
        return f"{self.num_frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Resolution:
    """One extra pixel area for mixed-resolution video training (§2.2.1 stage 3)."""

    size: int
    """Side of a square with the target pixel area (buckets keep ``size²`` pixels, varying the ratio)."""
    num_frames: int | None = None
    """Frames per video clip at this size (1 + 4k); None: as many as the main entry's token budget allows."""
    weight: float = 1.0
    """Relative probability that a video is cut at this resolution (the main entry has weight 1)."""

    def __post_init__(self) -> None:
        if self.num_frames is not None:
            check_num_frames(self.num_frames, f"Resolution(size={self.size}).num_frames")
        if self.weight <= 0:
            raise ValueError(f"Resolution(size={self.size}).weight={self.weight} must be positive.")


def frames_for_token_budget(size: int, base_size: int, base_frames: int, multiple: int = 64) -> int:
    """Largest ``1 + 4k`` frame count whose latent tokens at ``size²`` fit the budget of ``base_frames``
    frames at ``base_size²``; tokens = (1 + (T-1)/4)·(size/multiple)² (FSAE 4× time, ``multiple``× space)."""
    check_num_frames(base_frames, "base_frames")
    budget = (1 + (base_frames - 1) // 4) * (base_size / multiple) ** 2
    latent_frames = math.floor(budget / (size / multiple) ** 2 + 1e-9)
    if latent_frames < 1:
        raise ValueError(
            f"size {size} does not fit one frame in the token budget of {base_frames} frames at {base_size}²; "
            "use a smaller size or give its num_frames explicitly."
        )
    return 1 + 4 * (latent_frames - 1)


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio bucketing of images and videos (one rule for every stage)."""

    size: int = 256
    """Side of a square with the target pixel area: 256 means buckets of about 256·256 pixels."""
    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    """Width/height ratios to build buckets for; ratios that round to the same shape share a bucket."""
    multiple: int = 64
    """Every bucket side is a multiple of this (64: the FSAE's spatial compression)."""
    area_tolerance: float = 0.25
    """Largest relative deviation of a bucket's area from ``size²``."""
    mixed: tuple[Resolution, ...] = field(default_factory=tuple)
    """Extra (size, num_frames, weight) entries for mixed-resolution video training (§2.2.1 stage 3)."""

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.size < self.multiple:
            raise ValueError(f"BucketConfig.size={self.size} must be at least multiple={self.multiple}.")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ValueError(
                f"BucketConfig.aspect_ratios={self.aspect_ratios} must be positive width/height ratios."
            )
        if not 0 < self.area_tolerance < 1:
            raise ValueError(f"BucketConfig.area_tolerance={self.area_tolerance} must be in (0, 1).")
        object.__setattr__(self, "aspect_ratios", tuple(float(r) for r in self.aspect_ratios))
        object.__setattr__(
            self, "mixed", tuple(r if isinstance(r, Resolution) else Resolution(**r) for r in self.mixed)
        )

    def shapes(self, size: int) -> list[tuple[int, int]]:
        """Distinct (height, width) shapes for the target area ``size²``, sorted by aspect ratio."""
        area, m = size * size, self.multiple
        low, high = area * (1 - self.area_tolerance), area * (1 + self.area_tolerance)
        candidates = [
            (h, w)
            for h in range(m, int(high // m) + 1, m)
            for w in range(math.ceil(low / h / m) * m, int(high / h // m) * m + 1, m)
            if w >= m
        ]
        if not candidates:
            raise ValueError(
                f"no H×W with sides multiples of {m} lies within {self.area_tolerance:.0%} of {size}²; "
                "raise size or area_tolerance."
            )

        def cost(shape: tuple[int, int], ratio: float) -> tuple[float, float]:
            h, w = shape
            ratio_error = abs(math.log(w / h / ratio))
            # Rounded so that exact ties (common on a 64-pixel grid) go to the truer ratio, not to float noise.
            return round(abs(math.log(h * w / area)) + ratio_error, 9), round(ratio_error, 9)

        chosen = {min(candidates, key=lambda s: cost(s, r)) for r in self.aspect_ratios}
        return sorted(chosen, key=lambda s: s[1] / s[0])

    def bucket_set(self, num_frames: int) -> BucketSet:
        """The buckets for videos of ``num_frames`` at ``size`` (plus the mixed entries) and for images."""
        check_num_frames(num_frames)
        entries = [(self.size, num_frames, 1.0)] + [
            (
                e.size,
                e.num_frames or frames_for_token_budget(e.size, self.size, num_frames, self.multiple),
                e.weight,
            )
            for e in self.mixed
        ]
        return BucketSet(
            video=[[Bucket(frames, h, w) for h, w in self.shapes(size)] for size, frames, _ in entries],
            weights=[weight for _, _, weight in entries],
            image=[Bucket(1, h, w) for h, w in self.shapes(self.size)],
        )


@dataclass(frozen=True)
class BucketSet:
    """The concrete buckets of one stage: per resolution entry for videos, one list for images."""

    video: list[list[Bucket]]
    """Video buckets per resolution entry (entry 0 is the main one)."""
    weights: list[float]
    """Sampling weight of each video resolution entry."""
    image: list[Bucket]
    """Buckets for still images (1 frame, main size)."""

    @property
    def all(self) -> list[Bucket]:
        """Every distinct bucket, videos first."""
        seen = [b for entry in self.video for b in entry] + self.image
        return list(dict.fromkeys(seen))

    @staticmethod
    def nearest(buckets: list[Bucket], width: int, height: int) -> Bucket:
        """The bucket whose aspect ratio is nearest to ``width/height`` in log space."""
        log_ratio = math.log(width / height)
        return min(buckets, key=lambda b: abs(math.log(b.aspect) - log_ratio))

    def for_image(self, width: int, height: int) -> Bucket:
        """The image bucket for a ``width × height`` still; raises SkipSample("small") if it would upscale."""
        bucket = self.nearest(self.image, width, height)
        if cover_scale(bucket, width, height) > 1.0:
            raise SkipSample("small", f"{width}x{height} image is smaller than bucket {bucket.name}")
        return bucket

    def for_video(self, width: int, height: int, available_frames: int, rng: np.random.Generator) -> Bucket:
        """A video bucket for a ``width × height`` clip with ``available_frames`` frames at the target fps.

        The resolution entry is drawn by weight among those the clip can fill (enough frames, no upscaling);
        raises SkipSample("short" or "small") when none can.
        """
        candidates = [(self.nearest(entry, width, height), w) for entry, w in zip(self.video, self.weights)]
        long_enough = [(b, w) for b, w in candidates if b.num_frames <= available_frames]
        if not long_enough:
            need = min(b.num_frames for b, _ in candidates)
            raise SkipSample("short", f"clip has {available_frames} frames at the target fps, needs {need}")
        fitting = [(b, w) for b, w in long_enough if cover_scale(b, width, height) <= 1.0]
        if not fitting:
            names = ", ".join(b.name for b, _ in long_enough)
            raise SkipSample("small", f"{width}x{height} video is smaller than bucket {names}")
        p = np.asarray([w for _, w in fitting]) / sum(w for _, w in fitting)
        return fitting[int(rng.choice(len(fitting), p=p))][0]


def cover_scale(bucket: Bucket, width: int, height: int) -> float:
    """Scale that makes a ``width × height`` frame just cover the bucket (resize the short side, then crop)."""
    return max(bucket.width / width, bucket.height / height)

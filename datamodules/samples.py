"""One WebDataset sample (``KEY.mp4`` or ``KEY.jpg``/``KEY.png`` plus ``KEY.json``) → a bucket-shaped clip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from datamodules.buckets import Bucket, BucketSet
from datamodules.decode import CropPlan, VideoReader, image_frames, read_image
from datamodules.skips import SkipSample

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def media_kind(sample: dict[str, Any]) -> str | None:
    """``"video"``, ``"image"`` or None (no media member), from the member names alone."""
    if any(ext in sample for ext in VIDEO_EXTENSIONS):
        return "video"
    if any(ext in sample for ext in IMAGE_EXTENSIONS):
        return "image"
    return None


def parse_json(raw: bytes | None) -> dict[str, Any]:
    """The sample's metadata; raises SkipSample("json") unless it is an object with a caption string."""
    if raw is None:
        raise SkipSample("json", "no json member")
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("json", f"malformed json: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("caption"), str) or not info["caption"].strip():
        raise SkipSample("json", "json has no non-empty 'caption' string")
    return info


@dataclass
class Clip:
    """A decoded sample, cut and cropped to its bucket."""

    frames: torch.Tensor
    """``T×3×H×W`` uint8 RGB (any memory layout)."""
    bucket: Bucket
    caption: str
    is_image: bool
    key: str
    url: str
    start: float
    """Clip start in seconds (0 for images)."""
    info: dict[str, Any]
    """The sample's json."""
    duration: float
    """Length of the source video in seconds (0 for images)."""


class SampleDecoder:
    """Turns raw WebDataset samples into clips: json, bucket choice, decode, resize and crop.

    ``train`` draws the clip start, the crop and the mixed-resolution entry from the sample's RNG; otherwise
    the clip starts at 0 and the crop is centred (the entry is still drawn, from a fixed-seed RNG).
    ``threads``: decode with FFmpeg frame threads (right in a single process, not in DataLoader workers).
    """

    def __init__(self, buckets: BucketSet, fps: float | None, train: bool, threads: bool = True) -> None:
        self.buckets = buckets
        self.fps = fps
        self.train = train
        self.threads = threads

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> Clip:
        kind = media_kind(sample)
        if kind is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise SkipSample("no_media", f"no video or image member (has {members})")
        info = parse_json(sample.get("json"))
        key, url = sample.get("__key__", ""), sample.get("__url__", "")
        if kind == "image":
            data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
            image = read_image(data)
            bucket = self.buckets.for_image(*image.size)
            frames = image_frames(image, bucket, rng if self.train else None)
            return Clip(frames, bucket, info["caption"], True, key, url, 0.0, info, 0.0)
        data = next(sample[ext] for ext in VIDEO_EXTENSIONS if ext in sample)
        with VideoReader(data, fallback_fps=info.get("fps"), threads=self.threads) as video:
            bucket = self.buckets.for_video(video.width, video.height, video.available_frames(self.fps), rng)
            start = float(rng.uniform(0, video.max_start(bucket.num_frames, self.fps))) if self.train else 0.0
            plan = CropPlan.cover(video.width, video.height, bucket, rng if self.train else None)
            frames = video.read(start, bucket.num_frames, self.fps, plan)
            duration = video.duration
        return Clip(frames, bucket, info["caption"], False, key, url, start, info, duration)

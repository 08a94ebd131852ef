"""Media decoding: cut a clip from an mp4 with PyAV, or read a still with PIL, resized and cropped to a bucket.

Only the frames a clip needs are converted to RGB, and they are scaled by swscale (PyAV ``reformat``) straight
to the size that covers the bucket, so a step never pays for full-resolution RGB frames it throws away.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from datamodules.buckets import Bucket, cover_scale
from datamodules.skips import SkipSample


@dataclass(frozen=True)
class CropPlan:
    """Resize a frame to ``resize_width × resize_height`` (covering the bucket), then crop the bucket at (x, y)."""

    resize_width: int
    resize_height: int
    x: int
    y: int
    width: int
    height: int

    @classmethod
    def cover(cls, width: int, height: int, bucket: Bucket, rng: np.random.Generator | None) -> CropPlan:
        """Short side to the bucket, then a crop: random with ``rng`` (training), centred without."""
        scale = cover_scale(bucket, width, height)
        rw = max(bucket.width, round(width * scale))
        rh = max(bucket.height, round(height * scale))
        if rng is None:
            x, y = (rw - bucket.width) // 2, (rh - bucket.height) // 2
        else:
            x, y = int(rng.integers(0, rw - bucket.width + 1)), int(rng.integers(0, rh - bucket.height + 1))
        return cls(rw, rh, x, y, bucket.width, bucket.height)

    def crop(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb``: resized ``H×W×3`` → the bucket-sized crop."""
        return rgb[self.y : self.y + self.height, self.x : self.x + self.width]


class VideoReader:
    """An mp4 (any container FFmpeg reads) held in memory; use as a context manager."""

    def __init__(self, data: bytes, fallback_fps: float | None = None) -> None:
        try:
            self.container = av.open(io.BytesIO(data), mode="r")
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError, ValueError) as e:
            raise SkipSample("decode", f"cannot open video: {type(e).__name__}: {e}") from e
        self.stream.thread_type = "AUTO"
        ctx = self.stream.codec_context
        self.width, self.height = ctx.width, ctx.height
        rate = self.stream.average_rate or self.stream.guessed_rate or fallback_fps
        if not rate or self.width <= 0 or self.height <= 0:
            self.close()
            raise SkipSample(
                "decode", f"video has no frame rate or size ({self.width}x{self.height}, {rate} fps)"
            )
        self.rate = float(rate)
        time_base = self.stream.time_base
        self.start_time = float((self.stream.start_time or 0) * time_base) if time_base else 0.0
        if self.stream.duration and time_base:
            self.duration = float(self.stream.duration * time_base)
        elif self.container.duration:
            self.duration = self.container.duration / av.time_base
        elif self.stream.frames:
            self.duration = self.stream.frames / self.rate
        else:
            self.duration = math.inf

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def available_frames(self, fps: float | None) -> int:
        """How many frames at ``fps`` (None: the source rate) fit in the video."""
        fps = fps or self.rate
        if math.isinf(self.duration):
            return 1 << 30
        # The last source frame is shown from duration - 1/rate; a target time maps to the nearest frame.
        return max(0, math.floor((self.duration - 0.5 / self.rate) * fps + 1e-6) + 1)

    def max_start(self, num_frames: int, fps: float | None) -> float:
        """Latest start (seconds) that still leaves ``num_frames`` frames at ``fps``."""
        fps = fps or self.rate
        if math.isinf(self.duration):
            return 0.0
        return max(0.0, self.duration - 0.5 / self.rate - (num_frames - 1) / fps)

    def read(self, start: float, num_frames: int, fps: float | None, plan: CropPlan) -> np.ndarray:
        """Frames at ``start + i/fps`` (nearest source frame each) → ``T×H×W×3`` uint8, resized and cropped."""
        fps = fps or self.rate
        half_frame = 0.5 / self.rate
        targets = self.start_time + start + np.arange(num_frames) / fps
        out: list[np.ndarray] = []
        try:
            if start > half_frame:
                offset = int((self.start_time + start) / self.stream.time_base)
                self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
            for index, frame in enumerate(self.container.decode(self.stream)):
                t = frame.time if frame.time is not None else self.start_time + index / self.rate
                rgb = None
                while len(out) < num_frames and targets[len(out)] < t + half_frame:
                    if rgb is None:
                        rgb = plan.crop(
                            frame.to_ndarray(
                                width=plan.resize_width,
                                height=plan.resize_height,
                                format="rgb24",
                                interpolation="BILINEAR",
                            )
                        )
                    out.append(rgb)
                if len(out) == num_frames:
                    break
        except av.FFmpegError as e:
            raise SkipSample(
                "decode", f"decoding failed after {len(out)} frames: {type(e).__name__}: {e}"
            ) from e
        if len(out) < num_frames:
            raise SkipSample(
                "short", f"stream ended after {len(out)} of {num_frames} frames from {start:.2f}s"
            )
        return np.stack(out)


def read_image(data: bytes) -> Image.Image:
    """Opens a still lazily (only the header is parsed, so its size is known before decoding)."""
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError) as e:
        raise SkipSample("decode", f"cannot open image: {type(e).__name__}: {e}") from e


def image_frames(image: Image.Image, plan: CropPlan) -> np.ndarray:
    """Decodes, resizes and crops a still → ``1×H×W×3`` uint8."""
    try:
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly; draft keeps the result at least the requested size.
        image.draft("RGB", (plan.resize_width, plan.resize_height))
        rgb = image.convert("RGB").resize((plan.resize_width, plan.resize_height), Image.Resampling.BILINEAR)
        return plan.crop(np.asarray(rgb))[None]
    except (OSError, ValueError, SyntaxError) as e:
        raise SkipSample("decode", f"cannot decode image: {type(e).__name__}: {e}") from e

"""Media decoding: cut a clip from an mp4 with PyAV, or read a still with PIL, cropped and resized to a bucket.

Only the frames a clip needs are converted to RGB; the bucket's region is cropped first and then resized in
one antialiased call over all frames (torch on uint8), which costs less CPU than swscale's filtered scaling
into RGB and leaves the frames channel-first for the batch.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.buckets import Bucket, cover_scale
from datamodules.skips import SkipSample


@dataclass(frozen=True)
class CropPlan:
    """Crop ``width × height`` source pixels at (x, y), then resize them to ``out_width × out_height``.

    The crop is the part of the frame that survives "resize the short side to the bucket, then crop the
    bucket", so only those pixels get resized.
    """

    x: int
    y: int
    width: int
    height: int
    out_width: int
    out_height: int

    @classmethod
    def cover(cls, width: int, height: int, bucket: Bucket, rng: np.random.Generator | None) -> CropPlan:
        """The bucket-shaped region of a ``width × height`` frame: random with ``rng`` (training), else centred."""
        scale = cover_scale(bucket, width, height)
        crop_w = min(width, round(bucket.width / scale))
        crop_h = min(height, round(bucket.height / scale))
        if rng is None:
            x, y = (width - crop_w) // 2, (height - crop_h) // 2
        else:
            x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        return cls(x, y, crop_w, crop_h, bucket.width, bucket.height)

    def apply(self, frames: list[np.ndarray]) -> torch.Tensor:
        """``T`` frames ``H×W×3`` uint8 → ``T×3×out_height×out_width`` uint8 (antialiased bilinear), in
        channels-last memory: the batch is assembled with one copy later."""
        crop = torch.stack(
            [torch.from_numpy(f[self.y : self.y + self.height, self.x : self.x + self.width]) for f in frames]
        ).permute(0, 3, 1, 2)  # T×3×h×w view in channels-last memory: torch's fast uint8 path
        if (self.width, self.height) != (self.out_width, self.out_height):
            crop = F.interpolate(
                crop, size=(self.out_height, self.out_width), mode="bilinear", antialias=True
            )
        return crop


class VideoReader:
    """An mp4 (any container FFmpeg reads) held in memory; use as a context manager.

    ``threads`` lets FFmpeg decode with frame threads (one process using several cores); DataLoader workers
    already run in parallel, so there each decoder keeps to one thread.
    """

    def __init__(self, data: bytes, fallback_fps: float | None = None, threads: bool = True) -> None:
        try:
            self.container = av.open(io.BytesIO(data), mode="r")
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError, ValueError) as e:
            raise SkipSample("decode", f"cannot open video: {type(e).__name__}: {e}") from e
        if threads:
            self.stream.thread_type = "AUTO"
        else:
            self.stream.thread_count = 1
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

    def read(self, start: float, num_frames: int, fps: float | None, plan: CropPlan) -> torch.Tensor:
        """Frames at ``start + i/fps`` (nearest source frame each) → ``T×3×H×W`` uint8, cropped and resized."""
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
                        rgb = frame.to_ndarray(format="rgb24")
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
        return plan.apply(out)


def read_image(data: bytes) -> Image.Image:
    """Opens a still lazily (only the header is parsed, so its size is known before decoding)."""
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError) as e:
        raise SkipSample("decode", f"cannot open image: {type(e).__name__}: {e}") from e


def image_frames(image: Image.Image, bucket: Bucket, rng: np.random.Generator | None) -> torch.Tensor:
    """Decodes a still and cuts it to the bucket (random crop with ``rng``, else centred) → ``1×3×H×W`` uint8."""
    try:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale; draft keeps the result at least as large as requested.
        scale = cover_scale(bucket, *image.size)
        image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        rgb = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SkipSample("decode", f"cannot decode image: {type(e).__name__}: {e}") from e
    return CropPlan.cover(rgb.shape[1], rgb.shape[0], bucket, rng).apply([rgb])

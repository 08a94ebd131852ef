"""Reading and writing video files with PyAV, converting between uint8 frames and model tensors, resampling
clips, and contact sheets (a picture of several videos side by side)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``3×T×H×W`` float in [-1, 1] → ``T×H×W×3`` uint8."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected one video 3×T×H×W, got {tuple(video.shape)}")
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def from_uint8_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``T×H×W×3`` uint8 → ``3×T×H×W`` float32 in [-1, 1]."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames T×H×W×3, got {tuple(frames.shape)} {frames.dtype}")
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 24, crf: int = 18) -> Path:
    """Write ``T×H×W×3`` uint8 frames as H.264 (yuv420p) mp4. H and W must be even."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames T×H×W×3, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even sides, got {height}×{width}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    return path


def side_by_side(*videos: torch.Tensor) -> torch.Tensor:
    """Concatenate ``3×T×H×W`` videos of equal shape along the width."""
    return torch.cat(videos, dim=-1)


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video file, ``T×H×W×3`` uint8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def contact_sheet(
    rows: list[tuple[str, np.ndarray]], frames_per_row: int = 6, height: int = 128
) -> Image.Image:
    """One picture of several videos (or images): a row per ``(label, T×H×W×3 uint8)``, each showing
    ``frames_per_row`` evenly spaced frames scaled to ``height`` pixels, the label above them."""
    label_height, gap = 16, 4
    tiles = []
    for label, frames in rows:
        picks = np.linspace(0, len(frames) - 1, min(frames_per_row, len(frames))).round().astype(int)
        scaled = [
            Image.fromarray(frames[i]).resize(
                (max(1, round(frames[i].shape[1] * height / frames[i].shape[0])), height),
                Image.Resampling.LANCZOS,
            )
            for i in picks
        ]
        tiles.append((label, scaled))
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for _, row in tiles)
    sheet = Image.new("RGB", (width, len(tiles) * (label_height + height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, row in tiles:
        draw.text((2, y + 2), label, fill="black")
        x = 0
        for tile in row:
            sheet.paste(tile, (x, y + label_height))
            x += tile.width + gap
        y += label_height + height + gap
    return sheet

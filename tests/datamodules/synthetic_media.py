"""Tiny synthetic media for data tests: every frame shows its own index as 8 black/white blocks."""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction

import av
import numpy as np
from PIL import Image

BITS = 8


def indexed_frames(num_frames: int, width: int, height: int) -> list[np.ndarray]:
    """Frame i: the bits of i as a row of 8 blocks across the frame (white = 1), robust to compression."""
    frames = []
    for i in range(num_frames):
        frame = np.zeros((height, width, 3), np.uint8)
        for bit in range(BITS):
            if (i >> bit) & 1:
                frame[:, bit * width // BITS : (bit + 1) * width // BITS] = 255
        frames.append(frame)
    return frames


def read_index(frame: np.ndarray) -> int:
    """Inverse of ``indexed_frames`` for an ``H×W×3`` uint8 frame (full width)."""
    width = frame.shape[1]
    centres = [(2 * bit + 1) * width // (2 * BITS) for bit in range(BITS)]
    return sum(1 << bit for bit, x in enumerate(centres) if frame[:, x].mean() > 127)


def mp4(num_frames: int = 48, fps: int = 24, width: int = 128, height: int = 128, gop: int = 12) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "g": str(gop)}
        for i, array in enumerate(indexed_frames(num_frames, width, height)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def image(width: int = 160, height: int = 128, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def caption(text: str = "blocks") -> bytes:
    return json.dumps({"caption": text}).encode()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """Writes ``(name, data)`` members in order; returns the path as a string."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)

"""Synthetic preference pairs for tests and CPU demos (``fsvideo rewards tiny-pairs``): of two clips that differ
only in brightness, the brighter is preferred."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fsvideo.video_io import write_mp4

PROMPTS = ("a cat walks across the garden", "the camera pans over a city at night", "a bright scene")


def write_brightness_pairs(
    directory: Path, pairs: int, seed: int, frames: int = 4, size: int = 56, ties: int = 0
) -> Path:
    """``directory/pairs.jsonl`` with ``pairs`` labelled pairs (+ ``ties`` pairs of equal clips labelled tie):
    smooth random clips, one darker and one brighter by 60 grey levels, A/B order random; returns the JSONL."""
    rng = np.random.default_rng(seed)
    (directory / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(pairs + ties):
        coarse = rng.uniform(70, 185, size=(frames, 4, 4, 3))
        clip = coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2)  # (T, H, W, 3)
        tie = i >= pairs
        shift = 0 if tie else 30
        dark, bright = np.clip(clip - shift, 0, 255), np.clip(clip + shift, 0, 255)
        a_bright = bool(rng.integers(2))
        a, b = (bright, dark) if a_bright else (dark, bright)
        for name, video in (("a", a), ("b", b)):
            write_mp4(directory / "videos" / f"{i:03d}_{name}.mp4", video.astype(np.uint8), fps=8)
        rows.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "video_a": f"videos/{i:03d}_a.mp4",
                "video_b": f"videos/{i:03d}_b.mp4",
                "preference": "tie" if tie else ("A" if a_bright else "B"),
            }
        )
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

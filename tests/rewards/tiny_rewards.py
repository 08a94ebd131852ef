"""The tiny video-reward config the reward tests share."""

from __future__ import annotations

from pathlib import Path

from fsvideo.rewards import VideoRewardConfig


def tiny_video_config(models: dict[str, Path], **overrides) -> VideoRewardConfig:
    """The tiny video reward: 56² frames (2×2 merge windows of 14-pixel patches), clips at 8 fps."""
    fields = dict(
        backbone=str(models["qwen2_vl"]), input_fps=8.0, sample_fps=8.0, frame_height=56, frame_width=56
    )
    return VideoRewardConfig(**(fields | overrides))

"""Fixtures of the reward tests: tiny random Qwen2-VL and CLIP folders, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsvideo.rewards import VideoRewardConfig, save_tiny_reward_models


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"qwen2_vl": folder, "clip": folder}`` as transformers' save_pretrained leaves them."""
    return save_tiny_reward_models(tmp_path_factory.mktemp("tiny_reward_models"))


def tiny_video_config(models: dict[str, Path], **overrides) -> VideoRewardConfig:
    """The tiny video reward: 56² frames (2×2 merge windows of 14-pixel patches), clips at 8 fps."""
    fields = dict(
        backbone=str(models["qwen2_vl"]), input_fps=8.0, sample_fps=8.0, frame_height=56, frame_width=56
    )
    return VideoRewardConfig(**(fields | overrides))

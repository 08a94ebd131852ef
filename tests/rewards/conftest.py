"""Fixtures of the reward tests: tiny random Qwen2-VL and CLIP folders, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsvideo.rewards import save_tiny_reward_models


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"qwen2_vl": folder, "clip": folder}`` as transformers' save_pretrained leaves them."""
    return save_tiny_reward_models(tmp_path_factory.mktemp("tiny_reward_models"))

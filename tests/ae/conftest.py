from collections.abc import Callable

import pytest
import torch

from fsvideo.ae import FSAE, FSAEConfig


@pytest.fixture(scope="module")
def tiny_model() -> FSAE:
    torch.manual_seed(0)
    return FSAE(FSAEConfig.tiny()).eval()


@pytest.fixture
def random_video() -> Callable[..., torch.Tensor]:
    """``random_video(frames, size, batch=2, seed=0)`` → uniform ``B×3×T×S×S`` in [-1, 1]."""

    def make(frames: int, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1

    return make

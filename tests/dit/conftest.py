from __future__ import annotations

import pytest
import torch

from fsvideo.dit import DiT, DiTConfig


def _randomize(model: DiT, seed: int = 0, scale: float = 0.05) -> DiT:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".router." not in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def randomize():
    """``randomize(model, seed=0)``: move every non-router parameter off its init (the head starts at
    zero, norms at one), so outputs and gradients are informative."""
    return _randomize


@pytest.fixture
def inputs():
    """A batch for ``DiTConfig.tiny()``: latent_in, sigma, text tokens, image tokens."""
    config = DiTConfig.tiny()
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, config.in_channels, 3, 4, 4, generator=generator),
        torch.tensor([0.2, 0.9]),
        torch.randn(2, 6, config.text_dim, generator=generator),
        torch.randn(2, 5, config.image_dim, generator=generator),
    )

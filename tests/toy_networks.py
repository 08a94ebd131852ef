"""Toy networks of the reward-tuning tests (ReFL, GRPO): a tiny DiT moved off its initialisation, a micro FSAE
whose decoder takes well under a second for a 61-frame clip, and random condition tokens of their widths.
Importable from every test folder (pytest puts ``tests/`` on the path for its conftest)."""

from __future__ import annotations

import torch

from fsvideo.ae import FSAE, FSAEConfig
from fsvideo.dit import DiT, DiTConfig

CHANNELS, TEXT_LEN, DIM = 8, 4, 32
"""The micro FSAE's latent channels; text length and widths of the random condition tokens (DiTConfig.tiny)."""

MICRO_FSAE = FSAEConfig(
    latent_channels=CHANNELS,
    widths=(8, 16, 16),
    encoder_depths=(1, 1, 1),
    decoder_depths=(1, 1, 1),
    num_conv_stages=2,
    attention_head_dim=8,
)
"""4× space, 4× time: a 1×1 latent is 4×4 pixels, so decoding 61 frames with gradient takes well under a second."""


def toy_dit(seed: int = 0) -> DiT:
    """``DiTConfig.tiny()`` seeded with ``seed``, every weight moved by 0.02·N(0, 1)."""
    torch.manual_seed(seed)
    dit = DiT(DiTConfig.tiny())
    with torch.no_grad():  # off the zero-initialised head, so the DiT predicts something
        for param in dit.parameters():
            param.add_(0.02 * torch.randn(param.shape))
    return dit


def toy_decoder() -> FSAE:
    """The micro FSAE (seed 0), frozen in eval mode."""
    torch.manual_seed(0)
    autoencoder = FSAE(MICRO_FSAE)
    autoencoder.init_weights()
    return autoencoder.eval().requires_grad_(False)


def toy_conditions(count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` random conditions: ``text`` tokens and their ``mask``, ``image`` tokens, the ``first`` latent
    frame (1×1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "text": torch.randn(count, TEXT_LEN, DIM, generator=g),
        "mask": torch.ones(count, TEXT_LEN, dtype=torch.bool),
        "image": torch.randn(count, 2, DIM, generator=g),
        "first": torch.randn(count, CHANNELS, 1, 1, 1, generator=g),
    }

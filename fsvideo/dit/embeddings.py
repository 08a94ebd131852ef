"""Condition embeddings of the Wan2.1 I2V DiT: timestep, text tokens, image tokens.

Public API:
    sinusoidal_embedding(t, dim) -> ``B×dim`` ([cos, sin], frequencies 10000^(−i/(dim/2)))
    TimestepEmbedding(freq_dim, dim)
        forward(t) -> (time_emb ``B×dim``, block_modulation ``B×6×dim``)
    TextEmbedding(text_dim, dim)      Linear → GELU(tanh) → Linear
    ImageEmbedding(image_dim, dim, eps)  LayerNorm → Linear → GELU → Linear → LayerNorm
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsvideo.dit.norms import FP32LayerNorm


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``B`` timesteps (any scale) → ``B×dim`` float32 [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class TimestepEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: ``B`` scaled timesteps. Returns the time embedding ``B×dim`` (used by the head) and the
        projected ``B×6×dim`` modulation shared by all blocks, both float32 (modulation is kept in
        float32 as in Wan)."""
        emb = sinusoidal_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        emb = self.linear_2(F.silu(self.linear_1(emb))).float()
        modulation = self.proj(F.silu(emb).to(self.proj.weight.dtype)).float()
        return emb, modulation.unflatten(1, (6, -1))


class TextEmbedding(nn.Module):
    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``B×L×text_dim`` → ``B×L×dim``."""
        return self.linear_2(F.gelu(self.linear_1(tokens), approximate="tanh"))


class ImageEmbedding(nn.Module):
    def __init__(self, image_dim: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_in = FP32LayerNorm(image_dim, eps)
        self.linear_1 = nn.Linear(image_dim, image_dim)
        self.linear_2 = nn.Linear(image_dim, dim)
        self.norm_out = FP32LayerNorm(dim, eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``B×M×image_dim`` → ``B×M×dim``."""
        return self.norm_out(self.linear_2(F.gelu(self.linear_1(self.norm_in(tokens)))))

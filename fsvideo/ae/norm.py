"""Pixel norm: RMS normalisation over channels at every (t, h, w) position (spec §2.2.1).

It has no statistics over time or space, so a chunk, a tile or a patch is normalised exactly as
inside the whole video. The per-channel scale and bias match DC-AE's RMSNorm so its weights copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PixelNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×C×T×H×W`` → same shape; statistics in float32."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=1, keepdim=True) + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x32 * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)

"""FSAE decoder: conv in + channel duplication, stages n-1…0 (an upsampling, then blocks), norm, conv out.

The pass is split into :meth:`Decoder.stem`, :meth:`Decoder.run_stages` and :meth:`Decoder.head` so
that stage-3 patch decoding can run the inner stages on the whole latent and the outer ones on a crop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsvideo.ae.blocks import make_block, run_blocks
from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.norm import PixelNorm
from fsvideo.ae.resample import UpBlock


class DecoderStage(nn.Module):
    """(Except the innermost stage) an upsampling from the next width, then blocks at ``H/2^i``."""

    def __init__(self, config: FSAEConfig, stage: int) -> None:
        super().__init__()
        self.up = None
        if stage < config.num_stages - 1:
            self.up = UpBlock(
                config.widths[stage + 1],
                config.widths[stage],
                double_time=stage < config.time_resample_stages,
                temporal_kernel_size=config.temporal_kernel_size,
            )
        self.blocks = nn.ModuleList(make_block(config, stage) for _ in range(config.decoder_depths[stage]))


class Decoder(nn.Module):
    def __init__(self, config: FSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        kernel = (config.temporal_kernel_size, 3, 3)
        self.conv_in = CausalConv3d(config.latent_channels, config.widths[-1], kernel)
        self.stages = nn.ModuleList(DecoderStage(config, i) for i in range(config.num_stages))
        self.norm_out = PixelNorm(config.widths[0], config.norm_eps)
        self.conv_out = CausalConv3d(config.widths[0], 3, kernel)

    def stem(self, latent: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×t×h×w`` latent → ``B×widths[-1]×t×h×w``."""
        h = self.conv_in(latent, cache)
        if self.config.decoder_in_shortcut:
            h = h + latent.repeat_interleave(self.config.widths[-1] // self.config.latent_channels, dim=1)
        return h

    def run_stages(
        self, h: torch.Tensor, stages: Iterable[int], cache: CausalCache | None = None
    ) -> torch.Tensor:
        """Run decoder ``stages`` (descending indices, e.g. ``range(6, 2, -1)``) on ``h``."""
        for i in stages:
            stage = self.stages[i]
            if stage.up is not None:
                h = stage.up(h, cache)
            h = run_blocks(stage.blocks, h, cache, self.gradient_checkpointing)
        return h

    def head(self, h: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×widths[0]×T×H×W`` → ``B×3×T×H×W``."""
        return self.conv_out(F.relu(self.norm_out(h)), cache)

    def forward(self, latent: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """Decode a (chunk of a) latent ``B×C×t×h×w`` → ``B×3×T×H×W`` (no checks here)."""
        h = self.stem(latent, cache)
        h = self.run_stages(h, range(self.config.num_stages - 1, -1, -1), cache)
        return self.head(h, cache)

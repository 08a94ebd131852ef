"""FSAE encoder: causal conv in, stages 0…n-1 (blocks, then a downsampling), conv out + channel average."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fsvideo.ae.blocks import make_block, run_blocks
from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.resample import DownBlock


class EncoderStage(nn.Module):
    """Blocks at ``H/2^i``, then (except the innermost stage) a downsampling to the next width."""

    def __init__(self, config: FSAEConfig, stage: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(make_block(config, stage) for _ in range(config.encoder_depths[stage]))
        self.down = None
        if stage < config.num_stages - 1:
            self.down = DownBlock(
                config.widths[stage],
                config.widths[stage + 1],
                halve_time=stage < config.time_resample_stages,
                temporal_kernel_size=config.temporal_kernel_size,
            )


class Encoder(nn.Module):
    def __init__(self, config: FSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        kernel = (config.temporal_kernel_size, 3, 3)
        self.conv_in = CausalConv3d(3, config.widths[0], kernel)
        self.stages = nn.ModuleList(EncoderStage(config, i) for i in range(config.num_stages))
        self.conv_out = CausalConv3d(config.widths[-1], config.latent_channels, kernel)

    def forward(
        self,
        video: torch.Tensor,
        cache: CausalCache | None = None,
        feature_stages: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode a (chunk of a) video.

        Args:
            video: ``B×3×T×H×W`` (no checks here; :class:`~fsvideo.ae.autoencoder.FSAE` checks).
            cache: carries causal state between temporal chunks; None for one shot.
            feature_stages: stages whose block output is returned at frame 0.

        Returns:
            latent ``B×C×t×h×w`` and, per ``feature_stages`` entry, ``B×widths[i]×1×H/2^i×W/2^i``.
        """
        h = self.conv_in(video, cache)
        features = []
        for i, stage in enumerate(self.stages):
            h = run_blocks(stage.blocks, h, cache, self.gradient_checkpointing)
            if i in feature_stages:
                features.append(h[:, :, :1].clone())  # a view would keep the whole stage output alive
            if stage.down is not None:
                h = stage.down(h, cache)
        latent = self.conv_out(h, cache)
        if self.config.encoder_out_shortcut:
            group = self.config.widths[-1] // self.config.latent_channels
            latent = latent + h.unflatten(1, (-1, group)).mean(dim=2)
        return latent, features

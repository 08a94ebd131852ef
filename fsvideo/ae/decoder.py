"""FSAE decoder: conv in + channel duplication, stages n-1…0 (an upsampling, then blocks), norm, conv out.

The pass is split into :meth:`Decoder.stem`, :meth:`Decoder.run_stages` and :meth:`Decoder.head` so
that stage-3 patch decoding can run the inner stages on the whole latent and the outer ones on a crop.

``config.decoder_variant`` picks the temporal padding of every conv (causal, non-causal for
FSAE-Standard, group-causal for FSAE-Lite; :mod:`fsvideo.ae.temporal_conv`). With
``first_frame_injection`` the stages with an encoder first-frame feature cross-attend to it after
their upsampling, and ``noise_weight`` adds Gaussian noise before every conv block
(:mod:`fsvideo.ae.injection`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsvideo.ae.blocks import make_block, run_blocks
from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.injection import FirstFrameCrossAttention, NoiseSource
from fsvideo.ae.norm import PixelNorm
from fsvideo.ae.resample import UpBlock
from fsvideo.ae.temporal_conv import convert_temporal_convs, temporal_conv_like


class DecoderStage(nn.Module):
    """(Except the innermost stage) an upsampling from the next width, then blocks at ``H/2^i``;
    with first-frame injection a cross-attention to the first-frame feature between the two."""

    def __init__(self, config: FSAEConfig, stage: int) -> None:
        super().__init__()
        widths = config.decoder_widths
        # blocks are built from the decoder's widths (lite narrows the outer stages)
        block_config = dataclasses.replace(config, widths=widths, lite_widths=())
        self.up = None
        if stage < config.num_stages - 1:
            self.up = UpBlock(
                widths[stage + 1],
                widths[stage],
                double_time=stage < config.time_resample_stages,
                temporal_kernel_size=config.temporal_kernel_size,
            )
        self.first_frame_attention = None
        if config.first_frame_injection and stage in config.first_frame_stages:
            self.first_frame_attention = FirstFrameCrossAttention(
                widths[stage], config.widths[stage], config.attention_head_dim, config.norm_eps
            )
        self.blocks = nn.ModuleList(
            make_block(block_config, stage) for _ in range(config.decoder_depths[stage])
        )
        if config.decoder_variant != "causal":
            convert_temporal_convs(self, config.decoder_variant, config.decoder_group_size(stage))


class Decoder(nn.Module):
    def __init__(self, config: FSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = config.decoder_widths
        kernel = (config.temporal_kernel_size, 3, 3)
        self.conv_in = CausalConv3d(config.latent_channels, widths[-1], kernel)
        self.stages = nn.ModuleList(DecoderStage(config, i) for i in range(config.num_stages))
        self.norm_out = PixelNorm(widths[0], config.norm_eps)
        self.conv_out = CausalConv3d(widths[0], 3, kernel)
        self.conv_in = temporal_conv_like(
            self.conv_in, config.decoder_variant, config.decoder_group_size(config.num_stages - 1)
        )
        self.conv_out = temporal_conv_like(
            self.conv_out, config.decoder_variant, config.decoder_group_size(0)
        )

    def stem(self, latent: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×t×h×w`` latent → ``B×widths[-1]×t×h×w``."""
        h = self.conv_in(latent, cache)
        if self.config.decoder_in_shortcut:
            h = h + latent.repeat_interleave(self.config.widths[-1] // self.config.latent_channels, dim=1)
        return h

    def run_stages(
        self,
        h: torch.Tensor,
        stages: Iterable[int],
        cache: CausalCache | None = None,
        first_frame_features: Sequence[torch.Tensor] | None = None,
        noise: NoiseSource | None = None,
    ) -> torch.Tensor:
        """Run decoder ``stages`` (descending indices, e.g. ``range(6, 2, -1)``) on ``h``.

        Args:
            first_frame_features: the encoder's first-frame features of ``config.first_frame_stages``
                (outer first), required with ``first_frame_injection``.
            noise: the call's noise; None adds none.
        """
        features = dict(zip(self.config.first_frame_stages, first_frame_features or ()))
        for i in stages:
            stage = self.stages[i]
            if stage.up is not None:
                h = stage.up(h, cache)
            if stage.first_frame_attention is not None:
                h = stage.first_frame_attention(h, features[i])
            if noise is None or self.config.is_attention_stage(i):
                h = run_blocks(stage.blocks, h, cache, self.gradient_checkpointing)
                continue
            recompute = self.gradient_checkpointing and (cache is None or not cache.carry)
            for j, block in enumerate(stage.blocks):
                h = noise.add(h, block=len(self.stages) * j + i)
                if recompute and torch.is_grad_enabled():
                    h = checkpoint(block, h, cache, use_reentrant=False)
                else:
                    h = block(h, cache)
        return h

    def head(self, h: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×widths[0]×T×H×W`` → ``B×3×T×H×W``."""
        return self.conv_out(F.relu(self.norm_out(h)), cache)

    def forward(
        self,
        latent: torch.Tensor,
        cache: CausalCache | None = None,
        first_frame_features: Sequence[torch.Tensor] | None = None,
        noise: NoiseSource | None = None,
    ) -> torch.Tensor:
        """Decode a (chunk of a) latent ``B×C×t×h×w`` → ``B×3×T×H×W`` (no checks here)."""
        h = self.stem(latent, cache)
        h = self.run_stages(h, range(self.config.num_stages - 1, -1, -1), cache, first_frame_features, noise)
        return self.head(h, cache)

"""Configuration of the FSAE video autoencoder (spec §2.2.1, Figure 3).

Stage ``i`` of the encoder and of the decoder works at ``H/2^i × W/2^i`` with ``widths[i]`` channels.
The outer ``num_conv_stages`` stages are residual conv blocks, the inner ones EfficientViT blocks; the
resampling between the outer ``time_resample_stages`` stages also halves (encoder) or doubles
(decoder) time, the first frame alone and the others in pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NUM_FIRST_FRAME_FEATURES = 5
"""Encoder stages whose first-frame features feed the decoder's cross-attention (spec §2.2.3)."""

DECODER_VARIANTS = ("causal", "standard", "lite")
"""``causal``: the stage 1–3 decoder. ``standard``: non-causal convs (FSAE-Standard, §2.2.3).
``lite``: group-causal convs and narrower outer stages (FSAE-Lite, §2.2.3)."""


@dataclass
class FSAEConfig:
    latent_channels: int = 128
    """Channels of the latent ``B×C×t×h×w``."""
    widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024, 2048)
    """Channels of each stage, outermost first. ``len(widths) - 1`` resamplings: 7 stages give 64×."""
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3, 2)
    """Blocks per encoder stage."""
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3, 2)
    """Blocks per decoder stage (indexed like the encoder: stage 0 is the one next to the pixels)."""
    num_conv_stages: int = 3
    """Outer stages built of residual conv blocks; the inner stages are EfficientViT blocks."""
    time_resample_stages: int = 2
    """Outer stages whose down/up-sampling also halves/doubles time: 2 gives 4× temporal compression."""
    attention_head_dim: int = 32
    """Channels per head of the ReLU linear attention."""
    multiscale_kernel_sizes: tuple[int, ...] = (5,)
    """Spatial kernels of the depthwise convs that aggregate q/k/v at more scales (DC-AE: (5,))."""
    mlp_expand_ratio: float = 4.0
    """Hidden width of the GLU MBConv as a multiple of the stage width."""
    temporal_kernel_size: int = 3
    """Time extent of every causal conv whose 2D kernel is larger than 1×1 (1×1 convs stay pointwise)."""
    norm_eps: float = 1e-5
    """Epsilon of every pixel norm."""
    encoder_out_shortcut: bool = True
    """Add the channel-averaging shortcut to the encoder's output conv (DC-AE residual autoencoding)."""
    decoder_in_shortcut: bool = True
    """Add the channel-duplicating shortcut to the decoder's input conv."""
    gradient_checkpointing: bool = False
    """Recompute every block in the backward pass instead of keeping its activations."""
    decoder_variant: str = "causal"
    """Temporal padding of the decoder's convs: causal, standard (non-causal, zero padded on both
    sides) or lite (group-causal: causal across frame groups of 1, 2, 4 frames by the stage's time
    ratio, free inside a group, replication padded after each group)."""
    first_frame_injection: bool = False
    """Cross-attention from each decoder stage that has an encoder first-frame feature (the last 5
    stages) to that feature; ``decode`` then needs ``first_frame_features``."""
    noise_weight: float = 0.0
    """Weight of the standard Gaussian noise added before every decoder conv block (0.05 in §2.2.3)."""
    lite_widths: tuple[int, ...] = ()
    """Decoder widths of the outer stages (stage 0 first) replacing ``widths`` there; () keeps them."""

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        self.encoder_depths = tuple(self.encoder_depths)
        self.decoder_depths = tuple(self.decoder_depths)
        self.multiscale_kernel_sizes = tuple(self.multiscale_kernel_sizes)
        self.lite_widths = tuple(self.lite_widths)
        n = len(self.widths)
        if self.decoder_variant not in DECODER_VARIANTS:
            raise ValueError(
                f"decoder_variant must be one of {DECODER_VARIANTS}, got {self.decoder_variant!r}"
            )
        if self.noise_weight < 0:
            raise ValueError(f"noise_weight must be >= 0, got {self.noise_weight}")
        if len(self.lite_widths) > n or min(self.lite_widths, default=1) < 1:
            raise ValueError(f"lite_widths {self.lite_widths} must hold at most {n} positive widths")
        if n < 2:
            raise ValueError(f"widths needs at least two stages, got {self.widths}")
        if len(self.encoder_depths) != n or len(self.decoder_depths) != n:
            raise ValueError(
                f"encoder_depths ({len(self.encoder_depths)}) and decoder_depths ({len(self.decoder_depths)}) "
                f"need one entry per stage ({n} widths)"
            )
        if min(self.widths) < 1 or min(self.encoder_depths + self.decoder_depths) < 0:
            raise ValueError("widths must be positive and depths non-negative")
        if not 0 <= self.num_conv_stages <= n:
            raise ValueError(f"num_conv_stages ({self.num_conv_stages}) must lie in [0, {n}]")
        if not 0 <= self.time_resample_stages <= n - 1:
            raise ValueError(f"time_resample_stages ({self.time_resample_stages}) must lie in [0, {n - 1}]")
        if self.temporal_kernel_size < 1 or any(k < 1 or k % 2 == 0 for k in self.multiscale_kernel_sizes):
            raise ValueError("temporal_kernel_size must be >= 1 and multiscale kernels odd and positive")
        if self.time_resample_stages and self.temporal_kernel_size < 2:
            raise ValueError("temporal resampling strides 2 in time: temporal_kernel_size must be >= 2")
        for i in range(self.num_conv_stages, n):
            if self.widths[i] % self.attention_head_dim:
                raise ValueError(
                    f"attention stage {i}: width {self.widths[i]} is not divisible by "
                    f"attention_head_dim {self.attention_head_dim}"
                )
        if self.first_frame_injection:
            for i in self.first_frame_stages:
                if self.decoder_widths[i] % self.attention_head_dim:
                    raise ValueError(
                        f"first-frame cross-attention at decoder stage {i}: width {self.decoder_widths[i]} "
                        f"is not divisible by attention_head_dim {self.attention_head_dim}"
                    )
        for widths in (self.widths, self.decoder_widths):
            for i in range(n - 1):
                # The space(-time)-to-channel shortcut averages groups of channels and its inverse repeats
                # them, so each resampling needs whole groups in both directions.
                factor = 8 if i < self.time_resample_stages else 4
                narrow, wide = widths[i], widths[i + 1]
                if (narrow * factor) % wide or (wide * factor) % narrow:
                    raise ValueError(
                        f"resampling {i}->{i + 1}: widths {narrow} and {wide} must divide each other "
                        f"times {factor} (channel shortcut groups)"
                    )
        if self.widths[-1] % self.latent_channels:
            raise ValueError(
                f"widths[-1] ({self.widths[-1]}) must be a multiple of latent_channels "
                f"({self.latent_channels}) for the channel-averaging / duplicating shortcuts"
            )

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along H and along W."""
        return 2 ** (self.num_stages - 1)

    @property
    def temporal_compression(self) -> int:
        """Pixel frames per latent frame after the first: ``T = 1 + f·(t - 1)``."""
        return 2**self.time_resample_stages

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Channels of each decoder stage: ``widths`` with the outer ones replaced by ``lite_widths``."""
        return self.lite_widths + self.widths[len(self.lite_widths) :]

    @property
    def improved_decoder(self) -> bool:
        """Whether any §2.2.3 decoder change is on (such a decoder only decodes whole frames)."""
        return self.decoder_variant != "causal" or self.first_frame_injection or self.noise_weight > 0

    @property
    def first_frame_stages(self) -> tuple[int, ...]:
        """Stages whose encoder first-frame features feed the decoder (the last 5, spec §2.2.3)."""
        return tuple(range(max(0, self.num_stages - NUM_FIRST_FRAME_FEATURES), self.num_stages))

    def decoder_group_size(self, stage: int) -> int:
        """Frames per group of the lite decoder's convs at ``stage``: pixel frames per latent frame there."""
        return 2 ** max(0, self.time_resample_stages - stage)

    def is_attention_stage(self, stage: int) -> bool:
        return stage >= self.num_conv_stages

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, t, h, w)`` of the latent of a ``frames×height×width`` video (sizes already valid)."""
        s = self.spatial_compression
        return (self.latent_channels, 1 + (frames - 1) // self.temporal_compression, height // s, width // s)

    @classmethod
    def tiny(cls, **overrides) -> FSAEConfig:
        """CPU-sized FSAE with the paper's layout (64× space, 4× time, 3 conv + 4 attention stages)."""
        base = cls(
            latent_channels=16,
            widths=(8, 16, 32, 32, 64, 64, 64),
            encoder_depths=(1,) * 7,
            decoder_depths=(1,) * 7,
            attention_head_dim=8,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def paper(cls, **overrides) -> FSAEConfig:
        """FSAE-f64t4c128: dc-ae-f32c32-sana-1.0's six stages (widths 128…1024, strided-conv /
        interpolate resampling, depths 2,2,2,3,3,3 encoder and 3×6 decoder, multiscale 5) plus the
        seventh EfficientViT stage of dc-ae-f64c128 (width 2048, depth 2), 128 latent channels."""
        return dataclasses.replace(cls(), **overrides)

    def with_decoder_variant(self, variant: str, **overrides) -> FSAEConfig:
        """This architecture with the decoder of ``variant``: standard and lite inject first-frame features
        and noise (weight 0.05); lite also halves the two outer decoder stages' widths."""
        if variant not in DECODER_VARIANTS:
            raise ValueError(f"decoder variant must be one of {DECODER_VARIANTS}, got {variant!r}")
        improved = variant != "causal"
        fields = {
            "decoder_variant": variant,
            "first_frame_injection": improved,
            "noise_weight": 0.05 if improved else 0.0,
            "lite_widths": tuple(w // 2 for w in self.widths[:2]) if variant == "lite" else (),
        }
        return dataclasses.replace(self, **{**fields, **overrides})

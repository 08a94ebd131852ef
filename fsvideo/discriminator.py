"""3D multiscale PatchGAN discriminator for FSAE stage 2/3 (spec §2.2.1, "Training Strategy").

The paper names only "a 3D multiscale discriminator" trained with the non-saturating logistic
loss and R1; the layout here follows pix2pixHD's multiscale PatchGAN, lifted to 3D: ``num_scales``
independent PatchGANs, scale ``k`` sees the input average-pooled ``2^k``× in space (time kept).
Each PatchGAN is a stack of strided 3D convs that returns one logit per space-time patch.

There is no BatchNorm: R1 needs the gradient of each sample's score with respect to that
sample alone, which batch statistics would mix. GroupNorm (or no norm) keeps samples apart.

Images are videos with ``T = 1``: the temporal kernel (3, zero padded) then sees only its
centre tap, so images and videos share one set of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    """Channels of the input video (RGB)."""
    base_channels: int = 64
    """Width of the first conv; doubled by every downsampling layer up to ``max_channels``."""
    max_channels: int = 512
    """Cap on the width of any conv."""
    num_layers: int = 3
    """Spatial stride-2 convs per scale (each halves H and W). The receptive field grows with it."""
    temporal_downsample_layers: int = 2
    """How many of the first downsampling convs also stride 2 in time (T → ⌈T/2⌉; T = 1 stays 1)."""
    num_scales: int = 3
    """Independent PatchGANs; scale k sees the input average-pooled 2^k× in H and W."""
    norm: Literal["group", "none"] = "group"
    """Normalisation after each inner conv. Never batch norm: R1 needs per-sample gradients."""
    norm_groups: int = 32
    """GroupNorm groups (capped by the layer's width, which it must divide)."""
    negative_slope: float = 0.2
    """LeakyReLU slope."""

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_scales < 1:
            raise ValueError(
                f"num_layers ({self.num_layers}) and num_scales ({self.num_scales}) must be >= 1."
            )
        if not 0 <= self.temporal_downsample_layers <= self.num_layers:
            raise ValueError(
                f"temporal_downsample_layers ({self.temporal_downsample_layers}) must lie in "
                f"[0, num_layers={self.num_layers}]."
            )
        if self.norm == "group":
            for width in self.widths():
                groups = min(self.norm_groups, width)
                if width % groups:
                    raise ValueError(
                        f"GroupNorm: width {width} is not divisible by {groups} groups; "
                        "pick norm_groups that divides every layer width (powers of two do)."
                    )

    def widths(self) -> list[int]:
        """Output widths of the downsampling convs, then of the last stride-1 conv."""
        widths = [min(self.base_channels * 2**i, self.max_channels) for i in range(self.num_layers)]
        return [*widths, min(widths[-1] * 2, self.max_channels)]

    @property
    def min_input_size(self) -> int:
        """Smallest H and W the coarsest scale can still downsample to at least one patch."""
        return 2 ** (self.num_scales - 1 + self.num_layers)

    @classmethod
    def tiny(cls) -> DiscriminatorConfig:
        return cls(
            base_channels=8,
            max_channels=32,
            num_layers=2,
            temporal_downsample_layers=1,
            num_scales=2,
            norm_groups=4,
        )

    @classmethod
    def paper(cls) -> DiscriminatorConfig:
        return cls()


class PatchDiscriminator3D(nn.Module):
    """One scale: B×C×T×H×W → logits B×1×t×(H/2^L)×(W/2^L) (one per patch)."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        widths = config.widths()
        layers: list[nn.Module] = []
        in_ch = config.in_channels
        for i, width in enumerate(widths):
            downsample = i < config.num_layers
            temporal_stride = 2 if i < config.temporal_downsample_layers else 1
            if downsample:
                conv = nn.Conv3d(in_ch, width, (3, 4, 4), stride=(temporal_stride, 2, 2), padding=1)
            else:
                conv = nn.Conv3d(in_ch, width, 3, padding=1)
            layers.append(conv)
            # the first conv sees raw pixels: normalising them would discard the colour statistics
            if i > 0 and config.norm == "group":
                layers.append(nn.GroupNorm(min(config.norm_groups, width), width))
            layers.append(nn.LeakyReLU(config.negative_slope))
            in_ch = width
        layers.append(nn.Conv3d(in_ch, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiscaleDiscriminator3D(nn.Module):
    """K PatchGANs on 2×-average-pooled copies of the input (spatially; time is kept)."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        self.scales = nn.ModuleList(PatchDiscriminator3D(config) for _ in range(config.num_scales))
        self.init_weights()

    def init_weights(self) -> None:
        # pix2pix / PatchGAN init: N(0, 0.02) convs, unit GroupNorm
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor) -> list[torch.Tensor]:
        """Score real/fake patches.

        Args:
            video: ``B×C×T×H×W`` (``T = 1`` for images) or an image batch ``B×C×H×W``.

        Returns:
            One logit map per scale, finest first: ``B×1×t_k×h_k×w_k``.
        """
        if video.ndim == 4:
            video = video.unsqueeze(2)
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected a video B×{self.config.in_channels}×T×H×W (or image B×C×H×W), "
                f"got shape {tuple(video.shape)}."
            )
        min_size = self.config.min_input_size
        if min(video.shape[-2:]) < min_size:
            raise ValueError(
                f"H and W must be >= {min_size} for {self.config.num_scales} scales × "
                f"{self.config.num_layers} stride-2 layers, got {tuple(video.shape[-2:])}; "
                "use a larger crop or fewer scales/layers."
            )
        logits = []
        for k, scale in enumerate(self.scales):
            if k > 0:
                video = F.avg_pool3d(video, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            logits.append(scale(video))
        return logits

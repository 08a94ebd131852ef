"""Latent upsampler (spec §2.4.1, Figure 8): FSAE latents ``B×C×t×h×w`` → ``B×C×t×2h×2w``.

Layout (the spec's choice, pixel-shuffle *before* the residual blocks, so all 16 blocks work at the high
resolution — "better upsample quality at the cost of slightly slower speed"):

    proj_in (per frame 3×3, C → 4·width) → pixel-shuffle ×2 per frame → GroupNorm → SiLU
    → ``num_blocks`` residual blocks (conv → GroupNorm → SiLU → conv → GroupNorm, + skip, SiLU)
    → proj_out (width → C)  [+ trilinear ×2 of the input, when ``interpolation_shortcut``]

Decisions:

* **Raw FSAE latents.** The upsampler reads and writes the latents of the frozen FSAE encoder it was trained
  against, never the DiT-normalised ones: it is then independent of any DiT's latent statistics, and one
  upsampler serves every DiT trained on that FSAE. The pipeline de-normalises the base DiT's output
  (``fsvideo.stages.LatentNormalization``) before the upsampler and normalises the draft for the refiner.
* **3D convs in the residual blocks** (``temporal_kernel_size`` 3, zero padded on both sides, like LTX-Video's
  ``dims=3``): neighbouring latent frames see each other, so detail added to one frame agrees with the next
  one (per-frame 2D upsampling flickers). ``temporal_kernel_size: 1`` gives the per-frame 2D variant. The
  projection + pixel-shuffle is per frame: time is never resampled.
* **GroupNorm** like LTX-Video's upsampler: statistics per sample over the whole clip (t, h, w), so it
  behaves the same at training and inference batch sizes; frames are therefore never fully independent, even
  with ``temporal_kernel_size: 1``.
* **Interpolation shortcut** (on by default): the output is ``trilinear×2(z) + network(z)`` with ``proj_out``
  initialised to zero, so a fresh upsampler *is* latent trilinear interpolation — the baseline it is
  benchmarked against — and training learns only the missing detail.

Public API:
    LatentUpsamplerConfig     dataclass; presets ``tiny()`` and ``paper()`` (field overrides accepted)
    LatentUpsampler(config)   ``forward(latent)``; ``init_weights()``; meta-device buildable; saved-model folder
                              through ``PretrainedNetwork`` (``save_pretrained`` / ``from_pretrained``)
    interpolate_latent(latent)  the trilinear ×2 in space (time untouched) used as shortcut and baseline
    downsample_video(video)     V_low of training: antialiased bicubic ↓2 per frame, ``B×3×T×H×W`` in [-1, 1]
    upsample_video(video)       the RGB baseline: bicubic ×2 per frame
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsvideo.pretrained import PretrainedNetwork


@dataclass
class LatentUpsamplerConfig:
    latent_channels: int = 128
    """Channels of the FSAE latent, in and out (128 for FSAE-f64t4c128)."""
    width: int = 512
    """Channels of the residual blocks (LTX-Video's ``mid_channels``)."""
    num_blocks: int = 16
    """Residual blocks after the pixel-shuffle (16 in the paper)."""
    temporal_kernel_size: int = 3
    """Time extent of the residual blocks' convs (odd; 1 = per-frame 2D convs)."""
    norm_groups: int = 32
    """Groups of every GroupNorm; must divide ``width``."""
    interpolation_shortcut: bool = True
    """Add the trilinear ×2 of the input to the output (with ``proj_out`` zero-initialised, a fresh network is
    latent interpolation)."""

    def __post_init__(self) -> None:
        if min(self.latent_channels, self.width, self.norm_groups) < 1 or self.num_blocks < 0:
            raise ValueError("latent_channels, width and norm_groups must be positive, num_blocks >= 0")
        if self.width % self.norm_groups:
            raise ValueError(f"norm_groups ({self.norm_groups}) must divide width ({self.width})")
        if self.temporal_kernel_size < 1 or self.temporal_kernel_size % 2 == 0:
            raise ValueError(
                f"temporal_kernel_size must be odd and positive, got {self.temporal_kernel_size}"
            )

    @classmethod
    def tiny(cls, **overrides) -> LatentUpsamplerConfig:
        """CPU-sized upsampler for the tiny FSAE (16 latent channels)."""
        return dataclasses.replace(
            cls(latent_channels=16, width=16, num_blocks=2, norm_groups=4), **overrides
        )

    @classmethod
    def paper(cls, **overrides) -> LatentUpsamplerConfig:
        """§2.4.1: 128 latent channels, 16 residual blocks; width 512 and GroupNorm(32) as LTX-Video's upsampler."""
        return dataclasses.replace(cls(), **overrides)


def interpolate_latent(latent: torch.Tensor) -> torch.Tensor:
    """Trilinear ×2 in space, time untouched: ``B×C×t×h×w`` → ``B×C×t×2h×2w``."""
    return F.interpolate(latent, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)


def downsample_video(video: torch.Tensor) -> torch.Tensor:
    """V_low: antialiased bicubic ↓2 per frame, ``B×3×T×H×W`` → ``B×3×T×H/2×W/2``, clamped to [-1, 1]
    (bicubic overshoots, and the FSAE refuses values far outside)."""
    return _resize_frames(video, 0.5, antialias=True)


def upsample_video(video: torch.Tensor) -> torch.Tensor:
    """The RGB baseline: bicubic ×2 per frame, ``B×3×T×H×W`` → ``B×3×T×2H×2W``, clamped to [-1, 1]."""
    return _resize_frames(video, 2.0, antialias=False)


def _resize_frames(video: torch.Tensor, scale: float, antialias: bool) -> torch.Tensor:
    b, t = video.shape[0], video.shape[2]
    frames = video.transpose(1, 2).flatten(0, 1)  # (B·T, 3, H, W)
    frames = F.interpolate(frames, scale_factor=scale, mode="bicubic", antialias=antialias)
    return frames.clamp(-1, 1).unflatten(0, (b, t)).transpose(1, 2)  # (B, 3, T, H', W')


class ResidualBlock(nn.Module):
    """Two ``kt×3×3`` convs with GroupNorm, SiLU and a skip: ``B×W×t×H×W`` → same shape."""

    def __init__(self, config: LatentUpsamplerConfig) -> None:
        super().__init__()
        kt, width = config.temporal_kernel_size, config.width
        kernel, padding = (kt, 3, 3), (kt // 2, 1, 1)
        self.conv1 = nn.Conv3d(width, width, kernel, padding=padding)
        self.norm1 = nn.GroupNorm(config.norm_groups, width)
        self.conv2 = nn.Conv3d(width, width, kernel, padding=padding)
        self.norm2 = nn.GroupNorm(config.norm_groups, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(x + h)


class LatentUpsampler(PretrainedNetwork, nn.Module):
    """×2 spatial latent upsampler. Build on the meta device with ``with torch.device("meta"):
    LatentUpsampler(config)``, then ``to_empty(device=...)`` and ``init_weights()``."""

    config_class = LatentUpsamplerConfig

    def __init__(self, config: LatentUpsamplerConfig) -> None:
        super().__init__()
        self.config = config
        c, width = config.latent_channels, config.width
        self.proj_in = nn.Conv2d(c, 4 * width, 3, padding=1)
        self.norm_in = nn.GroupNorm(config.norm_groups, width)
        self.blocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.num_blocks))
        kt = config.temporal_kernel_size
        self.proj_out = nn.Conv3d(width, c, (kt, 3, 3), padding=(kt // 2, 1, 1))

    def init_weights(self) -> None:
        """(Re)initialise every parameter: PyTorch's conv default, norms to identity; ``proj_out`` to zero
        with the interpolation shortcut, so the fresh network is trilinear interpolation."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.GroupNorm)):
                module.reset_parameters()
        if self.config.interpolation_shortcut:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``latent`` is not a ``B×C×t×h×w`` FSAE latent."""
        c = self.config.latent_channels
        if latent.dim() != 5 or latent.shape[1] != c:
            raise ValueError(
                f"expected a raw FSAE latent B×{c}×t×h×w, got shape {tuple(latent.shape)}"
                + ("; pass a single frame as t = 1: latent.unsqueeze(2)" if latent.dim() == 4 else "")
            )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw FSAE latent ``B×C×t×h×w`` → ``B×C×t×2h×2w``."""
        self.check_latent(latent)
        b, c, t, h, w = latent.shape

        # 1. projection and pixel-shuffle ×2, per latent frame (time is never resampled)
        frames = latent.transpose(1, 2).reshape(b * t, c, h, w)  # (B·t, C, h, w)
        frames = F.pixel_shuffle(self.proj_in(frames), 2)  # (B·t, W, 2h, 2w)
        x = frames.reshape(b, t, -1, 2 * h, 2 * w).transpose(1, 2)  # (B, W, t, 2h, 2w)
        x = F.silu(self.norm_in(x))

        # 2. residual blocks at the high resolution
        for block in self.blocks:  # activation checkpointing is applied from outside (fsvideo.parallel)
            x = block(x)

        # 3. output projection, on top of interpolation when the shortcut is on
        out = self.proj_out(x)  # (B, C, t, 2h, 2w)
        if self.config.interpolation_shortcut:
            out = out + interpolate_latent(latent)
        return out

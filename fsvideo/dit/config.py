"""Configuration of the base DiT (spec §2.3).

Public API:
    DiTConfig              dataclass of plain values; presets ``tiny()``, ``paper()``, ``wan_i2v_14b()``
                           (each accepts field overrides, e.g. ``DiTConfig.tiny(latent_channels=16)``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class DiTConfig:
    latent_channels: int = 128
    """Channels of the autoencoder latent: 128 for FSAE, 16 for the Wan VAE. Also the output channels."""
    mask_channels: int = 4
    """Channels of the first-frame mask: the autoencoder's temporal compression (pixel frames per latent frame)."""
    patch_size: tuple[int, int, int] = (1, 1, 1)
    """Patchify kernel (t, h, w): (1, 1, 1) on the FSAE latent, (1, 2, 2) on the Wan latent."""
    dim: int = 5120
    """Width of the transformer (token embedding size)."""
    num_layers: int = 40
    """Number of transformer blocks."""
    num_heads: int = 40
    """Attention heads; ``dim`` must be divisible by it."""
    ffn_dim: int = 13824
    """Hidden width of the feed-forward network."""
    freq_dim: int = 256
    """Size of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text-encoder tokens (4096 for UMT5-XXL)."""
    image_dim: int | None = 1280
    """Width of the image-encoder tokens (1280 for CLIP ViT-H/14); None builds no image branch."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and RMSNorm."""
    qk_norm: bool = True
    """RMSNorm over the whole width on queries and keys."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before the cross-attention."""
    rope_theta: float = 10000.0
    """Base of the 3D rotary position embedding."""
    timestep_scale: float = 1000.0
    """The model takes σ in [0, 1] and embeds ``σ·timestep_scale`` (Wan's timesteps are σ·1000)."""
    layer_memory: bool = True
    """Layer Memory self-attention (§2.3.1): blocks l ≥ 2 take keys/values from a routed mixture of
    all earlier hidden states."""
    router_init_margin: float = 0.0
    """Initial router logit of the latest hidden state over the others (0: the softmax starts uniform).
    With ``router_gate_init`` 0 it does not change the model at init (every model starts as the plain DiT,
    ``fsvideo.dit.layer_memory``), only where the softmax starts once the gate opens; a large
    margin saturates the softmax, whose gradients then shrink by about e^(−margin)."""
    router_gate_init: float = 0.0
    """Initial gate g of every router, which mixes X̂ = X_{l−1} + g·(routed mixture − X_{l−1}): 0 starts each
    block as the plain block (needed to add Layer Memory to a pretrained DiT, the default), 1 starts from the
    paper's eq. 7 mixture alone. Either way g is learned."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.dim // self.num_heads
        # RoPE rotates channel pairs on each of the three axes, so every axis needs an even share.
        if head_dim < 6 or head_dim % 2:
            raise ValueError(f"head dim dim/num_heads = {head_dim} must be even and >= 6 for the 3D RoPE")
        for name in ("latent_channels", "mask_channels", "num_layers", "ffn_dim", "freq_dim", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def in_channels(self) -> int:
        """Noise latent + mask + condition latent, as in Wan I2V."""
        return 2 * self.latent_channels + self.mask_channels

    @property
    def out_channels(self) -> int:
        return self.latent_channels

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @classmethod
    def tiny(cls, **overrides) -> DiTConfig:
        """CPU-sized DiT; text/image widths match ``fsvideo.encoders.save_tiny_encoders``."""
        base = cls(
            latent_channels=8,
            dim=64,
            num_layers=4,
            num_heads=4,
            ffn_dim=128,
            freq_dim=32,
            text_dim=32,
            image_dim=32,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def paper(cls, **overrides) -> DiTConfig:
        """FSVideo base DiT: Wan2.1-14B widths on the FSAE latent (128 ch, patch 1×1×1), Layer Memory on."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def wan_i2v_14b(cls, **overrides) -> DiTConfig:
        """Wan2.1-I2V-14B in Wan's own latent space (16 ch, patch 1×2×2, 36 input channels), for
        ``fsvideo.convert.wan``; Layer Memory routers start at the plain-DiT initialisation."""
        return dataclasses.replace(cls(latent_channels=16, patch_size=(1, 2, 2)), **overrides)

"""FSAE: the FSVideo video autoencoder (spec §2.2.1, Figure 3), DC-AE made causal 3D.

A video ``B×3×T×H×W`` in [-1, 1] with ``T = 1 + f_t·k`` and ``H, W`` multiples of ``f_s`` encodes
to ``B×C×(1+k)×H/f_s×W/f_s`` (paper: ``f_s = 64``, ``f_t = 4``, ``C = 128``). The first frame is
encoded on its own, so an image is the one-frame video ``image.unsqueeze(2)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.decoder import Decoder
from fsvideo.ae.encoder import Encoder
from fsvideo.ae.injection import FirstFrameCrossAttention, NoiseSource
from fsvideo.ae.norm import PixelNorm
from fsvideo.ae.patch import PatchDecodeOutput, decode_patch
from fsvideo.ae.tiling import TilingConfig, decode_tiled, encode_tiled
from fsvideo.pretrained import PretrainedNetwork

VALUE_TOLERANCE = 1e-2
"""How far outside [-1, 1] input pixels may stray (resampling overshoot) before encode refuses them."""


class FSAE(PretrainedNetwork, nn.Module):
    """Build on the meta device with ``with torch.device("meta"): FSAE(config)``, then
    ``model.to_empty(device=...)`` and ``model.init_weights()``. Saved and loaded as a saved-model folder
    (``save_pretrained`` / ``from_pretrained``, ``fsvideo.pretrained``)."""

    config_class = FSAEConfig

    def __init__(self, config: FSAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def init_weights(self) -> None:
        """(Re)initialise every parameter: PyTorch's conv default, norms to identity."""
        for module in self.modules():
            if isinstance(module, (CausalConv3d, PixelNorm, FirstFrameCrossAttention)):
                module.reset_parameters()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (overrides ``config.gradient_checkpointing``)."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    @property
    def feature_stages(self) -> tuple[int, ...]:
        """Encoder stages returned by ``encode(..., return_first_frame_features=True)``, outer first."""
        return self.config.first_frame_stages

    def check_video(self, video: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``video`` cannot be encoded."""
        f_t, f_s = self.config.temporal_compression, self.config.spatial_compression
        if video.dim() == 4:
            raise ValueError(
                f"expected a video B×3×T×H×W, got a 4D tensor {tuple(video.shape)}; "
                "pass an image batch as a one-frame video: image.unsqueeze(2)"
            )
        if video.dim() != 5:
            raise ValueError(f"expected a video B×3×T×H×W, got shape {tuple(video.shape)}")
        _, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(
                f"expected 3 (RGB) channels in dim 1 of B×3×T×H×W, got {c} (shape {tuple(video.shape)})"
            )
        if (t - 1) % f_t:
            raise ValueError(
                f"frame count {t} is not 1 + {f_t}·k; trim or pad to {1 + (t - 1) // f_t * f_t} "
                f"or {1 + ((t - 1) // f_t + 1) * f_t} frames"
            )
        if h % f_s or w % f_s:
            raise ValueError(
                f"height and width must be multiples of {f_s}, got {h}×{w}; resize or crop to "
                f"{h // f_s * f_s or f_s}×{w // f_s * f_s or f_s}"
            )
        if not video.is_floating_point():
            raise ValueError(f"expected a floating-point video in [-1, 1], got dtype {video.dtype}")
        low, high = torch.aminmax(video.detach())
        if low < -1 - VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
            raise ValueError(
                f"pixel values must lie in [-1, 1], found [{float(low):.3f}, {float(high):.3f}]; "
                "map uint8 frames with x / 127.5 - 1"
            )

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``latent`` cannot be decoded."""
        c = self.config.latent_channels
        if latent.dim() != 5 or latent.shape[1] != c:
            raise ValueError(f"expected a latent B×{c}×t×h×w, got shape {tuple(latent.shape)}")

    def encode(
        self,
        video: torch.Tensor,
        return_first_frame_features: bool = False,
        tiling: TilingConfig | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode ``B×3×T×H×W`` in [-1, 1] → latent ``B×C×t×h×w``, ``t = 1 + (T-1)/f_t``.

        Args:
            return_first_frame_features: also return the first frame's block outputs of the last 5
                encoder stages (:attr:`feature_stages`, outer first), each ``B×widths[i]×1×H/2^i×W/2^i``.
            tiling: temporal splitting / 3D tiling to bound memory; None runs one pass.
        """
        self.check_video(video)
        stages = self.feature_stages if return_first_frame_features else ()
        if tiling is None:
            latent, features = self.encoder(video, feature_stages=stages)
        else:
            latent = encode_tiled(self.encoder, video, tiling)
            # causal: the first frame's features are those of the first frame encoded alone
            features = self.encoder(video[:, :, :1], feature_stages=stages)[1] if stages else []
        return (latent, features) if return_first_frame_features else latent

    def decode(
        self,
        latent: torch.Tensor,
        tiling: TilingConfig | None = None,
        first_frame_features: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode latent ``B×C×t×h×w`` → video ``B×3×(1 + f_t·(t-1))×h·f_s×w·f_s``.

        Args:
            tiling: temporal splitting / 3D tiling to bound memory; None runs one pass. With first-frame
                injection only temporal splitting (exact, lite decoder) is available.
            first_frame_features: ``encode(..., return_first_frame_features=True)``'s features; required
                exactly when ``config.first_frame_injection``.
            generator: seeds the decoder's noise (``config.noise_weight > 0``) for reproducible output;
                None draws it from the global RNG.
        """
        self.check_latent(latent)
        config = self.config
        if config.first_frame_injection != (first_frame_features is not None):
            raise ValueError(
                "this decoder injects first-frame features: pass decode(latent, first_frame_features=...) "
                "from encode(video, return_first_frame_features=True)"
                if config.first_frame_injection
                else "first_frame_features given, but this decoder has no first-frame injection "
                "(config.first_frame_injection is False)"
            )
        if config.first_frame_injection and len(first_frame_features) != len(self.feature_stages):
            raise ValueError(
                f"expected {len(self.feature_stages)} first-frame features (stages {self.feature_stages}), "
                f"got {len(first_frame_features)}"
            )
        noise = NoiseSource(config.noise_weight, generator) if config.noise_weight > 0 else None
        if first_frame_features is None and noise is None:
            return self.decoder(latent) if tiling is None else decode_tiled(self.decoder, latent, tiling)
        if tiling is not None and any(tiling.tile_latent_size):
            raise ValueError(
                "3D tiling is not available with first-frame injection or decoder noise (the features and the "
                "noise cover whole frames); use TilingConfig(chunk_latent_frames=...) with decoder_variant=lite"
            )
        chunk = (tiling.chunk_latent_frames if tiling is not None else 0) or latent.shape[2]
        cache = CausalCache(carry=chunk < latent.shape[2])
        chunks = range(0, latent.shape[2], chunk)
        return torch.cat(
            [self.decoder(latent[:, :, a : a + chunk], cache, first_frame_features, noise) for a in chunks],
            dim=2,
        )

    def decode_patch(
        self,
        latent: torch.Tensor,
        patch_size: tuple[int, int, int],
        origin: tuple[int, int, int] | None = None,
        generator: torch.Generator | None = None,
        tail_stages: int = 3,
    ) -> PatchDecodeOutput:
        """Stage-3 patch decoding: see :func:`fsvideo.ae.patch.decode_patch`."""
        self.check_latent(latent)
        config = self.config
        if config.improved_decoder:
            raise ValueError(
                "patch decoding is the stage-3 training of the plain causal decoder; a §2.2.3 decoder "
                f"(decoder_variant {config.decoder_variant!r}, first_frame_injection "
                f"{config.first_frame_injection}, noise_weight {config.noise_weight}) decodes whole frames"
            )
        return decode_patch(self.decoder, latent, patch_size, origin, generator, tail_stages)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct ``B×3×T×H×W`` → same shape (``generator`` seeds the decoder's noise)."""
        if self.config.first_frame_injection:
            latent, features = self.encode(video, return_first_frame_features=True)
            return self.decode(latent, first_frame_features=features, generator=generator)
        return self.decode(self.encode(video), generator=generator)

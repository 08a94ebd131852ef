"""FSAE, the FSVideo video autoencoder (spec §2.2.1, Figure 3).

Public API:
    FSAEConfig              dataclass; presets ``FSAEConfig.tiny()`` (CPU) and ``FSAEConfig.paper()``
                            (f64t4c128); both accept field overrides, e.g. ``FSAEConfig.tiny(latent_channels=8)``.
    FSAE(config)            the network. Meta-device build: ``with torch.device("meta"): FSAE(cfg)``, then
                            ``to_empty(device=...)`` and ``init_weights()``.
      .encode(video, return_first_frame_features=False, tiling=None)
                            ``B×3×T×H×W`` in [-1, 1], T = 1+4k, H, W multiples of 64 → ``B×C×(1+k)×H/64×W/64``;
                            with features also a list of 5 first-frame maps ``B×C_i×1×H_i×W_i``.
      .decode(latent, tiling=None, first_frame_features=None, generator=None)  → ``B×3×T×H×W``;
                            first_frame_features required with ``config.first_frame_injection``,
                            generator seeds the decoder noise (``config.noise_weight``).
      .forward(video, generator=None)       → reconstruction.
      .decode_patch(latent, patch_size, origin=None, generator=None, tail_stages=3) → PatchDecodeOutput
                            stage-3 training: only a crop goes through the last 3 decoder stages;
                            patch_size/origin ``(t, y, x)`` in that stage input's units (latent frames,
                            pixels / 8); ``out.valid_video()`` matches ``target[out.valid.index()]``.
      .enable_gradient_checkpointing(enabled=True)
      .check_video(video) / .check_latent(latent)   the input checks (ValueError)
    PatchDecodeOutput, Box  result of patch decoding and the half-open T×H×W box it reports.
    tail_margins(config, tail_stages=3)   (frames, pixels) lost beside an inner crop edge, to size patches.
    TilingConfig            temporal splitting (exact, carries the causal cache) and blended 3D tiling.
    FSAEConfig.with_decoder_variant("standard" | "lite")   the §2.2.3 decoders (FSAE-Standard: non-causal
                            convs, first-frame cross-attention, noise 0.05; FSAE-Lite: + group-causal
                            convs, halved outer decoder widths); DECODER_VARIANTS lists the names.
    load_decoder_variant(source FSAE | state dict, config) → (FSAE, VariantImportReport)
                            copies what fits, re-initialises (and reports) the rest.
    CausalCache             causal state across temporal chunks (for custom chunked loops).
    encode_chunked, decode_chunked, encode_tiled, decode_tiled   the functions behind ``tiling``.
    decode_chunked_checkpointed(decoder, latent, chunk_latent_frames)   exact chunked decoding with gradient to
                            the latent, each chunk recomputed in backward (ReFL's decoder memory).
"""

from fsvideo.ae.autoencoder import FSAE, VALUE_TOLERANCE
from fsvideo.ae.config import DECODER_VARIANTS, NUM_FIRST_FRAME_FEATURES, FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.patch import Box, PatchDecodeOutput, tail_margins
from fsvideo.ae.tiling import (
    TilingConfig,
    decode_chunked,
    decode_chunked_checkpointed,
    decode_tiled,
    encode_chunked,
    encode_tiled,
)
from fsvideo.ae.variants import VariantImportReport, load_decoder_variant

__all__ = [
    "FSAE",
    "NUM_FIRST_FRAME_FEATURES",
    "VALUE_TOLERANCE",
    "Box",
    "CausalCache",
    "CausalConv3d",
    "DECODER_VARIANTS",
    "FSAEConfig",
    "PatchDecodeOutput",
    "TilingConfig",
    "VariantImportReport",
    "decode_chunked",
    "decode_chunked_checkpointed",
    "decode_tiled",
    "encode_chunked",
    "encode_tiled",
    "load_decoder_variant",
    "tail_margins",
]

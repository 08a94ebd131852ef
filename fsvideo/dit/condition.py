"""Image-to-video condition of the DiT input, shared by the training module and the inference pipeline.

The DiT input is ``cat([noisy latent, mask, condition latent], dim=1)`` — Wan I2V's layout, so
``in_channels = 2·latent_channels + mask_channels``. The mask is given per *pixel* frame and folded
into ``mask_channels`` (= temporal compression, 4) channels per latent frame: the first pixel frame,
which the causal autoencoder encodes on its own, is repeated to fill latent frame 0; later latent
frames take their group of 4 pixel frames.

FSVideo's condition latent is ``[first-frame latent, zeros]``. (Wan itself VAE-encodes
``[first image, black frames]``; a causal VAE gives the same first latent frame either way.)

Public API:
    fold_frame_mask(pixel_mask, temporal_compression=4) -> ``B×4×t×h×w``
    build_i2v_condition(first_frame_latent, num_latent_frames, temporal_compression=4)
        -> ``B×(4+C)×t×h×w`` (mask channels first, then the condition latent)
"""

from __future__ import annotations

import torch


def fold_frame_mask(pixel_mask: torch.Tensor, temporal_compression: int = 4) -> torch.Tensor:
    """``B×T×h×w`` mask over pixel frames (``T = 1 + k·(t−1)``, latent spatial size) →
    ``B×k×t×h×w`` with ``k = temporal_compression``. Values are kept as given (0/1 for I2V,
    confidences for the refiner's dynamic mask)."""
    if pixel_mask.ndim != 4:
        raise ValueError(f"pixel_mask must be B×T×h×w, got shape {tuple(pixel_mask.shape)}")
    b, num_frames, h, w = pixel_mask.shape
    k = temporal_compression
    if (num_frames - 1) % k:
        raise ValueError(f"pixel frame count must be 1 + {k}·n, got {num_frames}")
    first = pixel_mask[:, :1].expand(b, k, h, w)
    grouped = torch.cat([first, pixel_mask[:, 1:]], dim=1)  # (B, k·t, h, w)
    return grouped.unflatten(1, (-1, k)).transpose(1, 2)  # (B, k, t, h, w)


def build_i2v_condition(
    first_frame_latent: torch.Tensor, num_latent_frames: int, temporal_compression: int = 4
) -> torch.Tensor:
    """Mask + ``[first-frame latent, zeros]`` for an I2V DiT.

    Args:
        first_frame_latent: ``B×C×1×h×w`` latent of the input image.
        num_latent_frames: t, the latent length of the video to generate (≥ 1).

    Returns:
        ``B×(k+C)×t×h×w``; concatenate after the noisy latent ``B×C×t×h×w`` to get the DiT input.
    """
    if first_frame_latent.ndim != 5 or first_frame_latent.shape[2] != 1:
        raise ValueError(f"first_frame_latent must be B×C×1×h×w, got shape {tuple(first_frame_latent.shape)}")
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    b, c, _, h, w = first_frame_latent.shape
    num_pixel_frames = 1 + temporal_compression * (num_latent_frames - 1)
    pixel_mask = first_frame_latent.new_zeros(b, num_pixel_frames, h, w)
    pixel_mask[:, 0] = 1.0
    latent = first_frame_latent.new_zeros(b, c, num_latent_frames, h, w)
    latent[:, :, :1] = first_frame_latent
    return torch.cat([fold_frame_mask(pixel_mask, temporal_compression), latent], dim=1)

"""Conditioning tasks of the DiT: the input layout, the frames that count in the loss, and the velocity fixed at
known frames — one object shared by the training modules and the samplers, so a new task is one constructor.

The DiT input is ``cat([noisy latent, mask, condition latent], dim=1)`` — Wan I2V's layout, so
``in_channels = 2·latent_channels + mask_channels``. The mask is given per *pixel* frame and folded
into ``mask_channels`` (= temporal compression, 4) channels per latent frame: the first pixel frame,
which the causal autoencoder encodes on its own, is repeated to fill latent frame 0; later latent
frames take their group of 4 pixel frames.

FSVideo's condition latent is ``[first-frame latent, zeros]``. (Wan itself VAE-encodes
``[first image, black frames]``; a causal VAE gives the same first latent frame either way.)

A ``FrameCondition`` holds, for one batch, the mask and condition latent and which latent frames are *given*:
their clean value is known exactly (I2V: frame 0, the input image's latent). A given frame is left out of the
loss — its velocity ε − z0 is known at sampling time, so the network spends its capacity on the frames it has to
generate — and a sampler sets that velocity itself (``fix_velocity``) and returns the given latent there
(``fix_sample``). Kinds: ``image_to_video`` (the base DiT's clips), ``text_to_image`` (stills: nothing given,
zero mask and condition); the refiner's masked video-to-video (float confidences, a draft condition) is built
from the same class.

Public API:
    fold_frame_mask(pixel_mask, temporal_compression=4) -> ``B×4×t×h×w``
    build_i2v_condition(first_frame_latent, num_latent_frames, temporal_compression=4)
        -> ``B×(4+C)×t×h×w`` (mask channels first, then the condition latent)
    FrameCondition(mask, latent, given)
        .channels() / .model_input(z) / .loss_pair(pred, target) / .fix_velocity(v, noise) / .fix_sample(z0)
    image_to_video(first_frame_latent, num_latent_frames, temporal_compression=4) -> FrameCondition
    text_to_image(latent_like, temporal_compression=4) -> FrameCondition
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class FrameCondition:
    """The DiT condition of one batch and the latent frames it gives exactly."""

    mask: torch.Tensor
    """``B×k×t×h×w`` folded frame mask (``fold_frame_mask``): 1 = given, 0 = to generate, between = confidence."""
    latent: torch.Tensor
    """``B×C×t×h×w`` condition latent (zeros where nothing is known)."""
    given: torch.Tensor
    """``t`` bool on the CPU (a layout, read without a device sync): latent frames whose clean value is ``latent``
    exactly, in every sample of the batch."""

    def __post_init__(self) -> None:
        if self.given.device.type != "cpu" or self.given.shape != (self.latent.shape[2],):
            raise ValueError(
                f"given must be a CPU bool tensor of the {self.latent.shape[2]} latent frames, got "
                f"{tuple(self.given.shape)} on {self.given.device}"
            )
        self._given_on_device = self.given.to(self.latent.device).view(1, 1, -1, 1, 1)

    def channels(self) -> torch.Tensor:
        """``B×(k+C)×t×h×w``: what follows the noisy latent in the DiT input."""
        return torch.cat([self.mask, self.latent], dim=1)

    def model_input(self, noisy: torch.Tensor) -> torch.Tensor:
        """``cat([noisy, mask, condition])``: ``B×(2C+k)×t×h×w`` from the noisy latent ``B×C×t×h×w``."""
        return torch.cat([noisy, self.mask.to(noisy.dtype), self.latent.to(noisy.dtype)], dim=1)

    def loss_pair(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction and target ``B×C×t×h×w`` without the given frames (see the module docstring)."""
        if not bool(self.given.any()):
            return pred, target
        kept = (~self.given).nonzero().flatten().tolist()
        if kept == list(range(kept[0], pred.shape[2])):  # a trailing run of frames: a view, no copy
            return pred[:, :, kept[0] :], target[:, :, kept[0] :]
        return pred[:, :, kept], target[:, :, kept]

    def fix_velocity(self, velocity: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The exact velocity ``noise − latent`` at given frames, ``velocity`` elsewhere (``B×C×t×h×w``)."""
        return torch.where(self._given_on_device, noise - self.latent.to(noise.dtype), velocity)

    def fix_sample(self, z0: torch.Tensor) -> torch.Tensor:
        """The given latent at given frames, ``z0`` elsewhere."""
        return torch.where(self._given_on_device, self.latent.to(z0.dtype), z0)


def image_to_video(
    first_frame_latent: torch.Tensor, num_latent_frames: int, temporal_compression: int = 4
) -> FrameCondition:
    """I2V: frame 0 is the image (``B×C×1×h×w``), given; the other ``num_latent_frames − 1`` are generated."""
    condition = build_i2v_condition(first_frame_latent, num_latent_frames, temporal_compression)
    given = torch.zeros(num_latent_frames, dtype=torch.bool)
    given[0] = True
    return FrameCondition(condition[:, :temporal_compression], condition[:, temporal_compression:], given)


def text_to_image(latent_like: torch.Tensor, temporal_compression: int = 4) -> FrameCondition:
    """No visual condition (stills of the image stage): zero mask and condition latent, nothing given."""
    b, c, t, h, w = latent_like.shape
    zeros = latent_like.new_zeros(b, temporal_compression + c, t, h, w)
    given = torch.zeros(t, dtype=torch.bool)
    return FrameCondition(zeros[:, :temporal_compression], zeros[:, temporal_compression:], given)

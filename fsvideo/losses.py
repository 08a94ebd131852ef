"""Autoencoder losses (spec §2.2.1 "Training Strategy", §2.2.2, Table 1).

1. GAN: non-saturating logistic loss for generator and discriminator, R1 penalty.
2. Perceptual: LPIPS over the frames of a video, sliced in time to bound peak memory.
3. Video VF loss (§2.2.2 eq. 2–4): align FSAE latents with DINOv2 features.
4. Table 1 baselines: downscale / upscale (scale-equivariance) regularization.

The stage objective is composed by the caller: ``L1 + 0.1·LPIPS + 0.1·GAN`` (§2.2.1), plus
``VideoVFLoss`` in the VF finetune.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def fold_time(video: torch.Tensor) -> torch.Tensor:
    """``B×C×T×H×W`` → ``(B·T)×C×H×W``."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def _unfold_time(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B·T)×C×H×W`` → ``B×C×T×H×W``."""
    bt, c, h, w = frames.shape
    return frames.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


def resize_frames(video: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize every frame of ``B×C×T×H×W`` to ``size = (H', W')``; time is untouched."""
    align_corners = False if mode in ("bilinear", "bicubic") else None
    frames = F.interpolate(fold_time(video), size=size, mode=mode, align_corners=align_corners)
    return _unfold_time(frames, video.shape[0])


# 1. GAN losses ------------------------------------------------------------------------------------


def generator_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``, mean over patches, averaged over scales."""
    return torch.stack([F.softplus(-logits).mean() for logits in fake_logits]).mean()


def discriminator_loss(
    real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Logistic discriminator loss ``softplus(D(fake)) + softplus(-D(real))``, averaged over scales."""
    if len(real_logits) != len(fake_logits):
        raise ValueError(
            f"got {len(real_logits)} real and {len(fake_logits)} fake scales; pass both from one D."
        )
    per_scale = [
        F.softplus(fake).mean() + F.softplus(-real).mean() for real, fake in zip(real_logits, fake_logits)
    ]
    return torch.stack(per_scale).mean()


def r1_penalty(
    discriminator: Callable[[torch.Tensor], Sequence[torch.Tensor]], real: torch.Tensor, gamma: float
) -> torch.Tensor:
    """R1 gradient penalty ``γ/2 · E_x ‖∇_x D(x)‖²`` on real data (Mescheder et al. 2018).

    ``D(x)`` is the sum of all patch logits of all scales of one sample, so the penalty is on the
    gradient of the whole score the discriminator assigns to ``x``. The graph is kept
    (``create_graph``) so that backpropagating the penalty trains the discriminator.

    Lazy regularization (StyleGAN2): computing R1 every step is expensive, so the caller may run
    it only every ``N`` discriminator steps and multiply the returned penalty by ``N`` on those
    steps, which keeps the expected regularization strength equal to ``γ``.

    Args:
        discriminator: maps ``B×3×T×H×W`` to a list of logit maps (``MultiscaleDiscriminator3D``).
        real: real videos ``B×3×T×H×W`` (or images ``B×3×H×W``); detached here.
        gamma: R1 weight γ.

    Returns:
        Scalar penalty.
    """
    real = real.detach().requires_grad_(True)
    score = sum(logits.sum() for logits in discriminator(real))
    (grad,) = torch.autograd.grad(outputs=score, inputs=real, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()


# 2. Perceptual loss -------------------------------------------------------------------------------


def _load_backbone(model: lpips.LPIPS, path: Path) -> None:
    """Load a torchvision vgg16/alexnet state dict (``features.N.*`` keys) into LPIPS' trunk.

    LPIPS splits ``torchvision.models.<net>().features`` into ``slice1..sliceK`` and keeps the
    original layer index as the child name, so ``features.N.p`` becomes ``sliceK.N.p``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    slice_of_layer = {
        name: slice_name
        for slice_name, block in model.net.named_children()
        for name, _ in block.named_children()
    }
    renamed = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix != "features":
            continue  # the classifier head is not part of the LPIPS trunk
        layer = rest.split(".", 1)[0]
        if layer in slice_of_layer:
            renamed[f"{slice_of_layer[layer]}.{rest}"] = value
    missing, unexpected = model.net.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the LPIPS '{model.pnet_type}' trunk (missing {missing}, unexpected "
            f"{unexpected}); pass the state dict of torchvision.models.{model.pnet_type}16()/alexnet()."
        )


class PerceptualLoss(nn.Module):
    """LPIPS between two videos, frame by frame, sliced in time (spec §2.2.1 stage 3).

    Wraps ``lpips.LPIPS``. Nothing is downloaded: the LPIPS linear heads ship inside the
    ``lpips`` wheel, and the ImageNet trunk (VGG16 or AlexNet) is loaded from ``backbone_path``
    (a local torchvision state dict). Without it the trunk stays random and a warning is logged:
    fine for tests, meaningless as a perceptual metric.

    The network is frozen and always in eval mode; gradients flow to the inputs only.

    Args:
        net: LPIPS trunk, ``"vgg"`` or ``"alex"``.
        backbone_path: torchvision ``vgg16()`` / ``alexnet()`` state dict (``.pth``), or ``None``.
        frames_per_slice: frames per LPIPS call; ``None`` runs all frames at once. With a grad,
            each slice is checkpointed, so only one slice's trunk activations are alive at a time
            (in forward and in backward). The value equals the unsliced one.
    """

    def __init__(
        self,
        net: Literal["vgg", "alex"] = "vgg",
        backbone_path: str | Path | None = None,
        frames_per_slice: int | None = None,
    ) -> None:
        super().__init__()
        if net not in ("vgg", "alex"):
            raise ValueError(f"net must be 'vgg' or 'alex', got {net!r}.")
        if frames_per_slice is not None and frames_per_slice < 1:
            raise ValueError(f"frames_per_slice must be >= 1 or None, got {frames_per_slice}.")
        self.frames_per_slice = frames_per_slice
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated `pretrained=` flag; harmless, as it is False here
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if backbone_path is None:
            logger.warning(
                "PerceptualLoss: no backbone_path given, the LPIPS %s trunk is RANDOM; pass a local "
                "torchvision state dict for a meaningful perceptual loss.",
                net,
            )
        else:
            path = Path(backbone_path)
            if not path.is_file():
                raise ValueError(
                    f"backbone_path {path} does not exist; point it to a local {net} state dict."
                )
            _load_backbone(self.lpips, path)
        self.lpips.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.lpips.eval()  # a metric network: its dropout must stay off
        return self

    def _slice_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(fold_time(x), fold_time(y)).sum()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS over all frames.

        Args:
            input, target: ``B×3×T×H×W`` (or ``B×3×H×W``) in [-1, 1].

        Returns:
            Scalar mean over batch and frames.
        """
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape.")
        if input.ndim == 4:
            input, target = input.unsqueeze(2), target.unsqueeze(2)
        if input.ndim != 5 or input.shape[1] != 3:
            raise ValueError(f"expected RGB video B×3×T×H×W in [-1, 1], got {tuple(input.shape)}.")
        num_frames = input.shape[2]
        step = self.frames_per_slice or num_frames
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
        total = input.new_zeros(())
        for start in range(0, num_frames, step):
            x, y = input[:, :, start : start + step], target[:, :, start : start + step]
            if needs_grad and step < num_frames:
                total = total + checkpoint(self._slice_sum, x, y, use_reentrant=False)
            else:
                total = total + self._slice_sum(x, y)
        return total / (input.shape[0] * num_frames)


# 3. Video VF loss (§2.2.2) ------------------------------------------------------------------------


@dataclass
class VideoVFConfig:
    latent_channels: int = 128
    """c: FSAE latent channels."""
    feature_channels: int = 1024
    """c': vision-foundation-model feature width (DINOv2 ViT-L/14: 1024, as in VA-VAE)."""
    temporal_pool: int = 4
    """Average-pooling kernel over the frame features (the FSAE's temporal compression)."""
    margin_cos: float = 0.5
    """m1 of eq. 2."""
    margin_dms: float = 0.25
    """m2 of eq. 3."""
    weight: float = 0.5
    """α of eq. 4."""
    interpolation: str = "bilinear"
    """``F.interpolate`` mode that resizes the projected latent to the feature grid h'×w'."""
    dms_chunk_size: int = 4096
    """Rows of the N×N similarity matrices built at once (exact). N <= this: one dense block."""
    dms_max_tokens: int | None = None
    """If set and N = t·h'·w' exceeds it, eq. 3 is estimated on this many random tokens."""

    def __post_init__(self) -> None:
        if self.temporal_pool < 1 or self.dms_chunk_size < 1:
            raise ValueError("temporal_pool and dms_chunk_size must be >= 1.")
        if self.dms_max_tokens is not None and self.dms_max_tokens < 2:
            raise ValueError(f"dms_max_tokens must be >= 2 or None, got {self.dms_max_tokens}.")

    @classmethod
    def tiny(cls) -> VideoVFConfig:
        return cls(latent_channels=8, feature_channels=16, dms_chunk_size=64)

    @classmethod
    def paper(cls) -> VideoVFConfig:
        return cls()


class VideoVFOutput(NamedTuple):
    loss: torch.Tensor
    """α·(v-mcos + v-mdms)."""
    mcos: torch.Tensor
    """L_v-mcos (eq. 2), unweighted."""
    mdms: torch.Tensor
    """L_v-mdms (eq. 3), unweighted."""


def pool_frame_features(features: torch.Tensor, temporal_pool: int) -> torch.Tensor:
    """Causal temporal pooling of per-frame features (§2.2.2, footnote 4).

    Args:
        features: ``B×c'×T×h'×w'`` with ``T = 1 + temporal_pool·k``.

    Returns:
        ``B×c'×(1+k)×h'×w'``: frame 0 as is, then the mean of each following group of frames.
    """
    b, c, num_frames, h, w = features.shape
    if (num_frames - 1) % temporal_pool:
        raise ValueError(
            f"feature frames T={num_frames} is not 1 + {temporal_pool}·k; the video must have 1+4k frames."
        )
    rest = features[:, :, 1:].reshape(b, c, (num_frames - 1) // temporal_pool, temporal_pool, h, w)
    return torch.cat([features[:, :, :1], rest.mean(3)], dim=2)


def v_mcos_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2: mean over tokens of ``ReLU(1 - m1 - cos(z_ijk, f_ijk))``; ``z, f``: ``B×c'×t×h'×w'``."""
    return F.relu(1.0 - margin - F.cosine_similarity(z, f, dim=1)).mean()


def _dms_rows_sum(
    z_rows: torch.Tensor, f_rows: torch.Tensor, z: torch.Tensor, f: torch.Tensor, margin: float
) -> torch.Tensor:
    """Sum over a block of rows of eq. 3's terms; unit-norm tokens, ``rows: B×r×c'``, ``z, f: B×N×c'``."""
    sim_z = z_rows @ z.transpose(1, 2)  # (B, r, N)
    sim_f = f_rows @ f.transpose(1, 2)
    return F.relu((sim_z - sim_f).abs() - margin).sum(dim=(1, 2))


def v_mdms_loss(
    z: torch.Tensor,
    f: torch.Tensor,
    margin: float,
    chunk_size: int = 4096,
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 3: mean over token pairs (p, q) of ``ReLU(|cos(z_p, z_q) - cos(f_p, f_q)| - m2)``.

    Exact by default, without the dense ``N×N`` matrices (``N = t·h'·w'``): rows are processed in
    blocks of ``chunk_size``, each block checkpointed so backward rebuilds it instead of keeping
    it; peak memory is ``O(B·chunk_size·N)``.

    Sampling (``max_tokens``): when ``N > max_tokens``, the same random subset of ``M`` tokens is
    used for every video and the loss is taken over the subset's ``M²`` pairs, rescaled by
    ``(N-1)/N · M/(M-1)`` so that it is an unbiased estimate of eq. 3 (diagonal pairs contribute 0
    whenever ``m2 > 0``). The subset is drawn with ``generator`` (a CPU generator) if given.

    Args:
        z, f: aligned latents and features, ``B×c'×t×h'×w'``.

    Returns:
        Scalar, mean over the batch.
    """
    z = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B, N, c')
    f = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)
    num_tokens = z.shape[1]
    rescale = 1.0
    if max_tokens is not None and num_tokens > max_tokens:
        index = torch.randperm(num_tokens, generator=generator)[:max_tokens].to(z.device)
        z, f = z[:, index], f[:, index]
        rescale = (num_tokens - 1) / num_tokens * max_tokens / (max_tokens - 1)
    n = z.shape[1]
    use_checkpoint = torch.is_grad_enabled() and n > chunk_size and (z.requires_grad or f.requires_grad)
    total = z.new_zeros(z.shape[0])
    for start in range(0, n, chunk_size):
        rows = (z[:, start : start + chunk_size], f[:, start : start + chunk_size], z, f, margin)
        if use_checkpoint:
            total = total + checkpoint(_dms_rows_sum, *rows, use_reentrant=False)
        else:
            total = total + _dms_rows_sum(*rows)
    return (total / n**2).mean() * rescale


class VideoVFLoss(nn.Module):
    """Video Vision-Foundation alignment loss (§2.2.2, eq. 2–4).

    1. project latent channels c → c' with a learnable ``Linear`` (W ∈ R^{c'×c})
    2. resize the projected latent per frame to the feature grid h'×w'
    3. pool the per-frame features causally in time (frame 0 alone, then groups of 4)
    4. ``α·(L_v-mcos + L_v-mdms)``
    """

    def __init__(self, config: VideoVFConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.latent_channels, config.feature_channels)

    def align(self, latent: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring latent and frame features to one shape ``B×c'×t×h'×w'``.

        Args:
            latent: ``B×c×t×h×w``.
            features: per-frame features ``B×c'×T×h'×w'``, ``T = 1 + temporal_pool·(t-1)``.
        """
        cfg = self.config
        if latent.ndim != 5 or latent.shape[1] != cfg.latent_channels:
            raise ValueError(f"latent must be B×{cfg.latent_channels}×t×h×w, got {tuple(latent.shape)}.")
        if features.ndim != 5 or features.shape[1] != cfg.feature_channels:
            raise ValueError(
                f"features must be B×{cfg.feature_channels}×T×h'×w', got {tuple(features.shape)}."
            )
        f = pool_frame_features(features, cfg.temporal_pool)
        if f.shape[0] != latent.shape[0] or f.shape[2] != latent.shape[2]:
            raise ValueError(
                f"latent {tuple(latent.shape)} and pooled features {tuple(f.shape)} disagree in batch or "
                f"time; features need T = 1 + {cfg.temporal_pool}·(t-1) frames."
            )
        z = self.proj(latent.movedim(1, -1)).movedim(-1, 1)  # (B, c', t, h, w)
        z = resize_frames(z, tuple(f.shape[-2:]), mode=cfg.interpolation)
        return z, f

    def forward(
        self, latent: torch.Tensor, features: torch.Tensor, generator: torch.Generator | None = None
    ) -> VideoVFOutput:
        """``latent: B×c×t×h×w``; ``features: B×c'×T×h'×w'`` (frozen DINOv2, frame by frame)."""
        cfg = self.config
        z, f = self.align(latent, features)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, f = z.float(), f.float()
            mcos = v_mcos_loss(z, f, cfg.margin_cos)
            mdms = v_mdms_loss(z, f, cfg.margin_dms, cfg.dms_chunk_size, cfg.dms_max_tokens, generator)
        return VideoVFOutput(cfg.weight * (mcos + mdms), mcos, mdms)


# 4. Table 1 baselines: scale-equivariance regularization ------------------------------------------


def _scale_equivariance_loss(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    video: torch.Tensor,
    factor: float,
    mode: str,
) -> torch.Tensor:
    h, w = latent.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    decoded = decode(resize_frames(latent, size, mode=mode))
    if decoded.shape[:3] != video.shape[:3]:
        raise ValueError(
            f"decoded {tuple(decoded.shape)} and video {tuple(video.shape)} differ in batch, channels or "
            "frames; decode must map B×c×t×h×w to B×3×T×H×W."
        )
    target = resize_frames(video, tuple(decoded.shape[-2:]), mode=mode)
    return F.l1_loss(decoded, target)


def downscale_regularization(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    video: torch.Tensor,
    factor: float = 0.5,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Scale-equivariance regularization, downscale (Table 1 "Downscale regularization").

    ``L1(D(down_s(z)), down_s(x))``: the decoder must turn a spatially downscaled latent into the
    equally downscaled video. This is the scale-equivariance loss of Skorokhodov et al. 2025,
    "Improving the diffusability of autoencoders" (spec ref. [65]; bilinear ×1/2 or ×1/4 of both
    ``x`` and ``z``), and the scaling part of EQ-VAE (Kouzelis et al. 2025, ref. [35]; random
    ``s ∈ [0.25, 1)``, which also rotates by multiples of 90°, not done here). For video the
    scaling is per frame; time is not rescaled.

    Args:
        decode: the autoencoder's decoder, ``B×c×t×h×w → B×3×T×H×W`` (bind any extra inputs).
        latent: ``z = E(x)``, ``B×c×t×h×w``; keep its graph to train the encoder as well.
        video: ``x``, ``B×3×T×H×W``.
        factor: spatial scale ``s ∈ (0, 1)``; the latent gets ``round(h·s)×round(w·s)`` and the
            target is resized to whatever size the decoder returns.
        mode: ``F.interpolate`` mode for latent and video.
    """
    if not 0 < factor < 1:
        raise ValueError(
            f"downscale factor must lie in (0, 1), got {factor}; use upscale_regularization for > 1."
        )
    return _scale_equivariance_loss(decode, latent, video, factor, mode)


def upscale_regularization(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latent: torch.Tensor,
    video: torch.Tensor,
    factor: float = 2.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Scale-equivariance regularization, upscale (Table 1 "Upscale regularization").

    ``L1(D(up_s(z)), up_s(x))`` with ``s > 1``. The spec lists this row without a definition and
    cites [35, 65], which both scale down; this is our reading: the same equivariance constraint
    as :func:`downscale_regularization`, with the latent and the video upsampled instead.
    """
    if factor <= 1:
        raise ValueError(f"upscale factor must be > 1, got {factor}; use downscale_regularization for < 1.")
    return _scale_equivariance_loss(decode, latent, video, factor, mode)

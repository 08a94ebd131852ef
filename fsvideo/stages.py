"""The stages of the image-to-video pipeline (Figure 2): each a small object that holds its networks and settings,
reads and writes one ``GenerationState``, and reports what it did. ``fsvideo.pipeline.FSVideoPipeline`` runs
them in order, timing each:

    EncodeStage          image → first-frame latent and encoder features; prompt, negative prompt and image →
                         condition tokens
    BaseSamplingStage    base DiT: noise → latent video at the base size (flow ODE, classifier-free guidance)
    UpsampleStage        latent upsampler (§2.4.1): base latent ×2 → the draft           (two-stage chain only)
    RefineStage          refiner DiT (§2.4.2): masked video-to-video from the draft      (two-stage chain only)
    DecodeStage          FSAE decoder: latent → frames

Placement: a stage puts each network on the device only while it uses it when the runtime offloads
(``StageRuntime.place``), so peak device memory is that of the largest network, not of all of them.

Latent spaces: the FSAE's raw latents and the normalised ones the DiTs work on are converted in one place,
``LatentNormalization``.

Public API:
    StageRuntime(device, offload, autocast_dtype)   .place(network) context, .autocast() context
    LatentNormalization(mean, std)                   .normalize(z) / .denormalize(z), ``C`` statistics
    GenerationState                                  what the stages hand each other
    PipelineStage                                    protocol: ``name``, ``run(state, runtime, callback) -> dict``
    SamplingSettings                                 steps, guidance, shift, sampler of one sampling stage
    sample_conditioned(dit, condition, …)          the flow sampler of every sampling stage
    EncodeStage, BaseSamplingStage, UpsampleStage, RefineStage, DecodeStage
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from fsvideo.ae import FSAE, TilingConfig
from fsvideo.dit import DiT
from fsvideo.dit.condition import FrameCondition, image_to_video
from fsvideo.encoders import ImageEncoder, TextEncoder
from fsvideo.flow import SAMPLERS, StepCallback, classifier_free_guidance, sample
from fsvideo.refiner import DynamicMaskConfig, dynamic_confidence, masked_video_to_video
from fsvideo.upsampler import LatentUpsampler

if TYPE_CHECKING:
    from fsvideo.pipeline import GenerationSettings


@dataclass
class StageRuntime:
    """Where and how the stages run."""

    device: torch.device
    offload: bool = False
    """Keep every network on the CPU and move only the one in use to ``device``."""
    autocast_dtype: torch.dtype | None = None
    """Run the DiTs and condition encoders under autocast in this dtype; None runs them in their own dtype."""

    @contextmanager
    def place(self, network: nn.Module) -> Iterator[None]:
        """With offloading, ``network`` sits on the device only inside this block."""
        if self.offload:
            network.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                network.to("cpu")

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None)


@dataclass
class LatentNormalization:
    """Per-channel statistics ``C`` a DiT's latents are normalised with: the one conversion between the FSAE's
    raw latents and the DiTs' normalised ones."""

    mean: torch.Tensor
    std: torch.Tensor

    def _shaped(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.mean.to(z.device).view(shape), self.std.to(z.device).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw FSAE latent ``B×C×t×h×w`` → ``(z − mean) / std`` in float32."""
        mean, std = self._shaped(z)
        return (z.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent → raw FSAE latent."""
        mean, std = self._shaped(z)
        return z * std + mean


@dataclass
class SamplingSettings:
    """How one sampling stage integrates its flow ODE."""

    steps: int = 30
    """Sampler steps (each evaluates the DiT twice with guidance, once at guidance_scale 1)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale s in v_u + s·(v_c − v_u); 1 disables guidance."""
    shift: float | None = 3.0
    """Timestep shift of the sampling schedule; None grows it with the token count."""
    sampler: str = "unipc"
    """Flow ODE solver: "unipc" or "euler"."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be positive (or None for the resolution rule), got {self.shift}")

    @property
    def network_evaluations(self) -> int:
        """NFE of the stage: two DiT calls a step with guidance, one without."""
        return self.steps * (1 if self.guidance_scale == 1.0 else 2)


@dataclass
class GenerationState:
    """What the stages of one generation read and write."""

    settings: GenerationSettings
    prompt: str
    pixels: torch.Tensor
    """``3×H×W`` input image in [-1, 1], fitted to the size the video is generated at, on the CPU."""
    base_pixels: torch.Tensor
    """The image at the base stage's size: ``pixels``, or ``pixels`` downsampled ×2 before a refiner."""
    base_shift: float
    """The base stage's timestep shift (the resolution rule already applied)."""
    first_latent: torch.Tensor | None = None
    """``1×C×1×h×w`` raw FSAE latent of the image at the base size."""
    first_frame_features: list[torch.Tensor] = field(default_factory=list)
    """First-frame encoder features for the decoder's cross-attention (§2.2.3), of the image at the size that is
    decoded."""
    text: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(tokens 1×L×D, mask 1×L)`` of the prompt."""
    negative_text: tuple[torch.Tensor, torch.Tensor] | None = None
    """The same for the negative prompt."""
    image_tokens: torch.Tensor | None = None
    """``1×M×D'`` image-encoder tokens, None for a DiT without image branch."""
    latent: torch.Tensor | None = None
    """``1×C×t×h×w`` raw FSAE latent of the video (what the next stage refines or decodes)."""
    video: torch.Tensor | None = None
    """``1×3×T×H×W`` decoded frames in [-1, 1]."""


class PipelineStage(Protocol):
    name: str
    """Key of the stage's time in ``GenerationResult.timings`` and of its record in the output JSON."""

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        """Advance ``state``; return what the output JSON records of this stage (settings, NFE, …)."""


# ---- sampling ---------------------------------------------------------------------------------------------


def sample_conditioned(
    dit: DiT,
    condition: FrameCondition,
    text: tuple[torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor],
    image_tokens: torch.Tensor | None,
    steps: int,
    guidance_scale: float,
    shift: float,
    sampler: str,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample a normalised latent video under ``condition``: the flow ODE from seeded noise, classifier-free
    guidance ``v_u + s·(v_c − v_u)`` whose unconditional branch swaps the prompt for the negative prompt and keeps
    the whole visual condition (mask, condition latent, image tokens), and the given frames fixed.

    Args:
        condition: the conditioning task (``image_to_video`` for the base DiT, ``masked_video_to_video`` for
            the refiner); its latent ``B×C×t×h×w`` sets the shape, on the DiT's device.
        text, negative_text: ``(tokens B×L×D, mask B×L)`` of the prompt and of the negative prompt.
        image_tokens: ``B×M×D'`` (kept in both guidance branches), None for a DiT without image branch.
        generator: CPU generator of the initial noise.
        autocast_dtype: run the DiT under autocast in this dtype (None: the parameters' dtype).
        callback: ``callback(step, steps, sigma, z)`` after every sampler step.

    Returns:
        ``B×C×t×h×w`` float32.
    """
    device = condition.latent.device
    noise = torch.randn(condition.latent.shape, generator=generator).to(device)

    def branch(tokens: torch.Tensor, mask: torch.Tensor):
        def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return dit(condition.model_input(z), sigma, tokens, image_tokens, mask).float()

        return velocity

    guided = classifier_free_guidance(branch(*text), branch(*negative_text), guidance_scale)

    def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return condition.fix_velocity(guided(z, sigma), noise)

    z0 = sample(velocity, noise, steps, shift, sampler, callback)
    return condition.fix_sample(z0.float())


class EncodeStage:
    """Image → first-frame latent and features (FSAE encoder, float32); prompts and image → tokens."""

    name = "encode"

    def __init__(
        self, autoencoder: FSAE, text_encoder: TextEncoder, image_encoder: ImageEncoder | None
    ) -> None:
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        pixels = state.base_pixels.to(runtime.device)[None]  # (1, 3, H, W)
        with runtime.place(self.autoencoder.encoder):
            state.first_latent, state.first_frame_features = self.autoencoder.encode(
                pixels[:, :, None], return_first_frame_features=True
            )
        with runtime.place(self.text_encoder), runtime.autocast():
            tokens, mask = self.text_encoder([state.prompt, state.settings.negative_prompt])
        tokens = tokens.float()
        state.text, state.negative_text = (tokens[:1], mask[:1]), (tokens[1:], mask[1:])
        if self.image_encoder is not None:
            with runtime.place(self.image_encoder), runtime.autocast():
                state.image_tokens = self.image_encoder(pixels).float()
        return {}


class BaseSamplingStage:
    """The base DiT samples the latent video from noise, frame 0 given by the image (``image_to_video``)."""

    name = "dit"

    def __init__(self, dit: DiT, normalization: LatentNormalization, temporal_compression: int) -> None:
        self.dit = dit
        self.normalization = normalization
        self.temporal_compression = temporal_compression

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        settings = state.settings.base_sampling()
        num_latent_frames = 1 + (state.settings.num_frames - 1) // self.temporal_compression
        with runtime.place(self.dit):
            first = self.normalization.normalize(state.first_latent)
            z0 = sample_conditioned(
                self.dit,
                image_to_video(first, num_latent_frames, self.dit.config.mask_channels),
                state.text,
                state.negative_text,
                state.image_tokens,
                settings.steps,
                settings.guidance_scale,
                state.base_shift,
                settings.sampler,
                torch.Generator().manual_seed(state.settings.seed),
                runtime.autocast_dtype,
                callback,
            )
            state.latent = self.normalization.denormalize(z0)
        return {"settings": asdict(settings), "shift": state.base_shift, "nfe": settings.network_evaluations}


class UpsampleStage:
    """The latent upsampler (§2.4.1): the base latent video ×2 in space, on raw FSAE latents — the draft."""

    name = "upsample"

    def __init__(self, upsampler: LatentUpsampler) -> None:
        self.upsampler = upsampler

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        with runtime.place(self.upsampler):
            state.latent = self.upsampler(state.latent.float())
        return {"latent_shape": list(state.latent.shape[1:])}


class RefineStage:
    """The refiner (§2.4.2): masked video-to-video sampling at the final size. Frame 0 is the image encoded at
    that size (its features then feed the decoder), the draft's frames carry the dynamic-mask confidence of the
    first frame's upsampling error, and the refiner samples with its own ``SamplingSettings``."""

    name = "refine"

    def __init__(
        self,
        refiner: DiT,
        autoencoder: FSAE,
        normalization: LatentNormalization,
        mask: DynamicMaskConfig,
        settings: SamplingSettings,
    ) -> None:
        self.refiner = refiner
        self.autoencoder = autoencoder
        self.normalization = normalization
        self.mask = mask
        self.settings = settings

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        pixels = state.pixels.to(runtime.device)[None, :, None]  # (1, 3, 1, H, W)
        with runtime.place(self.autoencoder.encoder):
            first_latent, state.first_frame_features = self.autoencoder.encode(
                pixels, return_first_frame_features=True
            )
        first = self.normalization.normalize(first_latent)
        draft = self.normalization.normalize(state.latent)
        confidence = dynamic_confidence(first, draft[:, :, :1], self.mask)
        condition = masked_video_to_video(first, draft, confidence, self.refiner.config.mask_channels)
        settings = self.settings
        shift = settings.shift if settings.shift is not None else state.base_shift
        with runtime.place(self.refiner):
            z0 = sample_conditioned(
                self.refiner,
                condition,
                state.text,
                state.negative_text,
                state.image_tokens,
                settings.steps,
                settings.guidance_scale,
                shift,
                settings.sampler,
                torch.Generator().manual_seed(state.settings.seed),
                runtime.autocast_dtype,
                callback,
            )
        state.latent = self.normalization.denormalize(z0)
        return {
            "settings": asdict(settings),
            "shift": shift,
            "nfe": settings.network_evaluations,
            "mask_confidence": float(confidence[0]),
        }


class DecodeStage:
    """FSAE decoder (FSAE-Standard / Lite also take the first frame's encoder features, §2.2.3, and inject
    seeded noise), optionally temporally split / tiled."""

    name = "decode"

    def __init__(self, autoencoder: FSAE, tiling: TilingConfig | None) -> None:
        self.autoencoder = autoencoder
        self.tiling = tiling

    def run(
        self, state: GenerationState, runtime: StageRuntime, callback: StepCallback | None
    ) -> dict[str, Any]:
        injected = state.first_frame_features if self.autoencoder.config.first_frame_injection else None
        with runtime.place(self.autoencoder.decoder):
            state.video = self.autoencoder.decode(
                state.latent,
                tiling=self.tiling,
                first_frame_features=injected,
                generator=torch.Generator(state.latent.device).manual_seed(state.settings.seed),
            ).clamp(-1, 1)
        return {"tiling": None if self.tiling is None else asdict(self.tiling)}

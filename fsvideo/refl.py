"""Reward feedback learning (ReFL, Xu et al. 2023) for the base DiT (§2.3.2): the model-side pieces.

One ReFL sample of an image-to-video batch (normalised latents, frame 0 given by the input image):

    k ~ U{first … last} (``ReFLConfig.gradient_steps``, late steps of ``sigma_schedule(steps, shift)``)
    z_σk = Euler steps 0 … k−1 from pure noise, without gradient, with CFG (``guidance_scale``)
    v̂ = DiT(z_σk, σk) with gradient (the only DiT evaluation the reward's gradient reaches)
    ẑ0 = z_σk − σk·v̂                                                     (eq. 12)
    video = FSAE decoder(the first ``decoded_latent_frames`` latent frames of ẑ0)   16 latent frames = 61 frames

The decoder runs in temporal chunks, each recomputed in backward (``decode_chunked_checkpointed``): with the
61-frame truncation this is what keeps ReFL's memory down (§2.3.2; ``benchmarks/refl.py`` measures it). The
video reward scores the 61 frames with the first frame and the prompt; the frame reward scores the
``frames_with_grad`` lowest frames (10 in the paper; ``FrameReward`` picks them itself). The objective is

    loss = −(w_video·r_video + w_frame·r_frame) + λ·(flow-matching loss on real data)

Public API:
    ReFLConfig                           sampling schedule, gradient step range, truncation, loss weights
    predict_with_last_step_gradient(dit, condition, text, negative_text, image_tokens, noise, config, step) -> ẑ0
    DecodeSettings                       what decode_for_reward reads of a config (truncation, chunks)
    decode_for_reward(autoencoder, latent, config) -> ``B×3×T×H×W`` in [-1, 1]
    score_video(video, prompts, video_reward, frame_reward) -> (r_video ``B``, r_frame ``B``)
    refl_objective(r_video, r_frame, flow_loss, config) -> scalar loss
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fsvideo.ae import FSAE, TilingConfig, decode_chunked_checkpointed
from fsvideo.dit import DiT
from fsvideo.dit.condition import FrameCondition
from fsvideo.flow import VelocityFn, classifier_free_guidance, integrate_segment, sigma_schedule


@dataclass
class ReFLConfig:
    """One ReFL step: where the gradient step falls, how the prediction is decoded, how rewards are weighted."""

    steps: int = 30
    """Steps of the sampling schedule ``sigma_schedule(steps, shift)`` (Euler)."""
    shift: float = 3.0
    """Timestep shift of that schedule (the pipeline's at 480p)."""
    gradient_steps: tuple[int, int] = (20, 29)
    """Inclusive range of the step index k (0 = pure noise, ``steps − 1`` the last) taken with gradient; drawn
    uniformly per training step. Late steps, as ReFL: the prediction ẑ0 is then close to a finished video."""
    guidance_scale: float = 5.0
    """Classifier-free guidance of the steps before k (no gradient); the unconditional branch takes the empty
    prompt and keeps the image, as the pipeline samples."""
    gradient_guidance_scale: float = 1.0
    """Guidance of step k itself: 1 evaluates the conditional branch once (one DiT pass with gradient); another
    value backpropagates through both branches (twice the activations)."""
    decoded_latent_frames: int = 16
    """Latent frames of ẑ0 sent to the decoder and the video reward, from frame 0: 16 = 61 pixel frames
    (§2.3.2); a shorter clip is decoded whole; 0 decodes every frame (no truncation)."""
    decoder_chunk_latent_frames: int = 4
    """Latent frames per decoder chunk, each recomputed in backward; 0 decodes in one checkpointed pass."""
    video_weight: float = 1.0
    """w_video: weight of the video reward in the loss."""
    frame_weight: float = 1.0
    """w_frame: weight of the frame reward in the loss."""
    flow_weight: float = 1.0
    """λ: weight of the flow-matching loss on the real batch, which keeps the DiT near the data (0 disables)."""

    def __post_init__(self) -> None:
        self.gradient_steps = tuple(self.gradient_steps)
        first, last = self.gradient_steps
        if self.steps < 1 or not 0 <= first <= last < self.steps:
            raise ValueError(
                f"gradient_steps {self.gradient_steps} must be step indices first <= last in [0, steps − 1 = "
                f"{self.steps - 1}]."
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.decoded_latent_frames < 0 or self.decoder_chunk_latent_frames < 0:
            raise ValueError("decoded_latent_frames and decoder_chunk_latent_frames must be >= 0 (0: all).")
        if min(self.video_weight, self.frame_weight, self.flow_weight) < 0:
            raise ValueError("video_weight, frame_weight and flow_weight must be >= 0.")

    def draw_gradient_step(self, generator: torch.Generator | None = None) -> int:
        """k uniform in ``gradient_steps`` (the global RNG unless ``generator``)."""
        first, last = self.gradient_steps
        return int(torch.randint(first, last + 1, (), generator=generator))


def _velocity(
    dit: DiT,
    condition: FrameCondition,
    text: tuple[torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor],
    image_tokens: torch.Tensor | None,
    noise: torch.Tensor,
    scale: float,
) -> VelocityFn:
    """The guided velocity with the given frames' velocity fixed, as ``fsvideo.stages.sample_conditioned``."""

    def branch(tokens: torch.Tensor, mask: torch.Tensor) -> VelocityFn:
        return lambda z, sigma: dit(condition.model_input(z), sigma, tokens, image_tokens, mask).float()

    guided = classifier_free_guidance(branch(*text), branch(*negative_text), scale)
    return lambda z, sigma: condition.fix_velocity(guided(z, sigma), noise)


def predict_with_last_step_gradient(
    dit: DiT,
    condition: FrameCondition,
    text: tuple[torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor],
    image_tokens: torch.Tensor | None,
    noise: torch.Tensor,
    config: ReFLConfig,
    step: int,
) -> torch.Tensor:
    """ẑ0 of a sample stopped at step ``step`` (module docstring).

    Args:
        condition: the image-to-video condition; its latent ``B×C×t×h×w`` (normalised) sets the shape.
        text, negative_text: ``(tokens B×L×D, mask B×L)`` of the prompts and of the empty prompt.
        image_tokens: ``B×M×D'`` (both guidance branches), None for a DiT without image branch.
        noise: ``B×C×t×h×w``, the starting point at σ = 1.
        step: k, the schedule index evaluated with gradient.

    Returns:
        ẑ0 ``B×C×t×h×w`` float32 (normalised), the given frames exact; its graph holds one DiT evaluation
        (two with ``gradient_guidance_scale`` ≠ 1).
    """
    sigma = sigma_schedule(config.steps, config.shift)[step].item()
    z = noise
    if step > 0:
        with torch.no_grad():
            z = integrate_segment(
                _velocity(dit, condition, text, negative_text, image_tokens, noise, config.guidance_scale),
                noise,
                1.0,
                sigma,
                steps=step,
                shift=config.shift,
            )
    velocity = _velocity(
        dit, condition, text, negative_text, image_tokens, noise, config.gradient_guidance_scale
    )
    v = velocity(z, torch.full((z.shape[0],), sigma, device=z.device))
    return condition.fix_sample(z - sigma * v)  # eq. 12


class DecodeSettings(Protocol):
    """What ``decode_for_reward`` reads of a stage's config (``ReFLConfig``, ``fsvideo.grpo``'s stage config)."""

    decoded_latent_frames: int
    decoder_chunk_latent_frames: int


def decode_for_reward(autoencoder: FSAE, latent: torch.Tensor, config: DecodeSettings) -> torch.Tensor:
    """The first ``decoded_latent_frames`` frames of a raw FSAE latent ``B×C×t×h×w`` as pixels
    ``B×3×(1 + 4·(n − 1))×H×W`` clamped to [-1, 1] (the rewards' input range). With gradient enabled each decoder
    chunk is recomputed in backward; without, it is ``autoencoder.decode`` with the same temporal chunks."""
    cfg = autoencoder.config
    if cfg.first_frame_injection or cfg.noise_weight > 0:
        raise ValueError(
            "ReFL and GRPO decode with the plain causal decoder; this FSAE injects first-frame features or noise "
            "(a §2.2.3 decoder variant). Give model.init_args.autoencoder the FSAE run that encoded the latents."
        )
    frames = min(config.decoded_latent_frames or latent.shape[2], latent.shape[2])
    latent = latent[:, :, :frames]
    if torch.is_grad_enabled():
        video = decode_chunked_checkpointed(autoencoder.decoder, latent, config.decoder_chunk_latent_frames)
    else:
        video = autoencoder.decode(
            latent, TilingConfig(chunk_latent_frames=config.decoder_chunk_latent_frames)
        )
    return video.clamp(-1.0, 1.0)


def score_video(
    video: torch.Tensor, prompts: Sequence[str], video_reward: nn.Module, frame_reward: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``B`` of a decoded video ``B×3×T×H×W``: the video reward with the first frame (frame 0, the input
    image's reconstruction, a condition without gradient) and the prompts, and the frame reward."""
    first_frame = video[:, :, 0].detach()
    return video_reward.score(video, first_frame, prompts), frame_reward.score(video, first_frame, prompts)


def refl_objective(
    r_video: torch.Tensor, r_frame: torch.Tensor, flow_loss: torch.Tensor, config: ReFLConfig
) -> torch.Tensor:
    """``−(w_video·mean r_video + w_frame·mean r_frame) + λ·flow_loss``."""
    reward = config.video_weight * r_video.mean() + config.frame_weight * r_frame.mean()
    return -reward + config.flow_weight * flow_loss

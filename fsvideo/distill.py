"""Refiner distillation (§2.4.3): CFG distillation → progressive distillation to 32 steps → SiDA to 8 steps.

Everything here works on velocity functions ``v(z B×…, sigma B) -> B×…`` (``fsvideo.flow``'s convention
``z_σ = (1 − σ)·z0 + σ·ε``, ``v = ε − z0``), so a 2-D toy MLP and the refiner DiT share the same code; the
LightningModules (``lightning_modules.distill``) only build the velocity functions of their networks.

CFG distillation (Meng et al. 2023): the student, one evaluation per step, regresses the frozen teacher's guided
velocity ``v_u + s·(v_c − v_u)`` (``guided_target``) at training noise levels.

Progressive distillation (Salimans & Ho 2022) in flow form: on the shifted grid ``sigma_schedule(n, shift)`` a
student step σ_j → σ_{j+1} must land where two teacher Euler steps on the grid of 2n steps land; the target
velocity is their average slope ``(z'' − z) / (σ_{j+1} − σ_j)`` (``progressive_target``).

SiD / SiDA (Zhou et al. 2024, 2025) in flow form: a generator ``x_g`` is pushed toward the teacher's ("real
score") distribution with the score-identity loss, using a fake-score network that tracks the generator's own
distribution by flow matching on its samples. With x0-predictions ``f(z_σ) = z_σ − σ·v(z_σ)``::

    L_SiD = (f_r − f_f)·((f_r − x_g) − α·(f_r − f_f)) / mean|x_g − f_r|        (α = 1.2, SiD's default)

per sample (the denominator detached), with gradients reaching ``x_g`` through ``z_σ`` and the two frozen-for-
this-step networks. SiDA adds a non-saturating GAN loss of a discriminator head on the fake-score network's
features, divided by the same per-sample factor (``sida_generator_losses``). The generator here is a few-step
Euler sampler (``few_step_sample``): its output is what the pipeline's Euler sampler produces at that step count.

Records of a distilled refiner (its saved-model folder's ``records``): ``guidance_distilled`` (and the scale),
``distilled_steps`` and ``distilled_shift``; ``refine_settings`` turns them into the pipeline's refine settings.

Public API:
    GUIDANCE_DISTILLED, DISTILLED_GUIDANCE_SCALE, DISTILLED_STEPS, DISTILLED_SHIFT   record keys
    UNDISTILLED_REFINE                                 the refine settings of an undistilled refiner
    guided_target(conditional, unconditional, scale, z, sigma) -> v          (no grad)
    student_segments(batch, steps, shift, device=None, generator=None) -> (sigma_from, sigma_to)
    progressive_target(teacher, z, sigma_from, sigma_to, shift, teacher_steps=2) -> v   (no grad)
    few_step_sample(velocity_fn, noise, steps, shift, grad_from=0) -> z0
    sid_loss(x_g, z_sigma, sigma, v_real, v_fake, alpha=1.2) -> (B losses, B weight factors)
    sida_generator_losses(x_g, z_sigma, sigma, v_real, v_fake, fake_logits, alpha=1.2) -> (sid, adversarial)
    refine_settings(records, requested, source) -> SamplingSettings
    DiscriminatorHead(dim)                             SiDA's logits from a velocity network's tokens
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsvideo.flow import VelocityFn, classifier_free_guidance, integrate_segment, sigma_schedule
from fsvideo.stages import SamplingSettings

GUIDANCE_DISTILLED = "guidance_distilled"
"""Record: the network's one evaluation already gives the guided velocity (sample at guidance scale 1)."""
DISTILLED_GUIDANCE_SCALE = "distilled_guidance_scale"
"""Record: the guidance scale of the teacher the network was CFG-distilled from."""
DISTILLED_STEPS = "distilled_steps"
"""Record: the Euler step count the network was step-distilled for."""
DISTILLED_SHIFT = "distilled_shift"
"""Record: the timestep shift of that step grid."""

UNDISTILLED_REFINE = SamplingSettings(steps=16, guidance_scale=5.0, shift=None)
"""The refine stage's settings for a refiner without distillation records."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B`` → ``B×1×…×1`` in ``like``'s dtype."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@torch.no_grad()
def guided_target(
    conditional: VelocityFn, unconditional: VelocityFn, scale: float, z: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The teacher's guided velocity ``v_u + scale·(v_c − v_u)`` at ``z`` ``B×…``, ``sigma`` ``B``: the
    CFG-distillation target."""
    return classifier_free_guidance(conditional, unconditional, scale)(z, sigma)


def student_segments(
    batch: int,
    steps: int,
    shift: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random step of the student's grid ``sigma_schedule(steps, shift)`` per sample: ``(σ_j, σ_{j+1})``,
    two ``B`` float64 tensors (every step equally often)."""
    grid = sigma_schedule(steps, shift)
    index = torch.randint(steps, (batch,), generator=generator)
    return grid[index].to(device), grid[index + 1].to(device)


@torch.no_grad()
def progressive_target(
    teacher: VelocityFn,
    z: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    shift: float,
    teacher_steps: int = 2,
) -> torch.Tensor:
    """The velocity that takes one Euler step from ``z`` (at ``sigma_from`` ``B``) to where ``teacher_steps``
    teacher Euler steps on the finer shifted grid land (at ``sigma_to``): ``(z'' − z) / (σ_to − σ_from)``."""
    landed = integrate_segment(teacher, z, sigma_from, sigma_to, teacher_steps, shift)
    return (landed - z) / _per_sample(sigma_to - sigma_from, z)


def few_step_sample(
    velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, shift: float, grad_from: int = 0
) -> torch.Tensor:
    """Euler from ``noise`` (σ = 1) to σ = 0 on ``sigma_schedule(steps, shift)``, as the pipeline samples a
    distilled refiner; the steps before ``grad_from`` run without autograd (their output is a constant input of
    the later ones), the steps from ``grad_from`` on keep the graph when autograd is on."""
    if not 0 <= grad_from < steps:
        raise ValueError(f"grad_from must be a step index in [0, {steps}), got {grad_from}")
    sigmas = sigma_schedule(steps, shift)
    z = noise
    for i in range(steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from):
            v = velocity_fn(z, torch.full((z.shape[0],), sigmas[i].item(), device=z.device))
            z = z + (sigmas[i + 1].item() - sigmas[i].item()) * v
    return z


def sid_loss(
    x_g: torch.Tensor,
    z_sigma: torch.Tensor,
    sigma: torch.Tensor,
    v_real: torch.Tensor,
    v_fake: torch.Tensor,
    alpha: float = 1.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD's generator loss in flow form (module docstring), per sample.

    Args:
        x_g: generator samples ``B×…`` (with their graph).
        z_sigma: ``interpolate(x_g, noise, sigma)``; sigma ``B``.
        v_real, v_fake: the teacher's and the fake-score network's velocities at ``z_sigma`` (graphs through
            ``z_sigma``; their own weights are not trained by this loss).
        alpha: SiD's α in ``L2 − α·L1`` (1.2 by default, as SiD and SiDA).

    Returns:
        ``B`` losses (mean over each sample's elements) and the ``B`` detached normalisers ``mean|x_g − f_r|``.
    """
    s = _per_sample(sigma, z_sigma)
    real = z_sigma - s * v_real  # x0-predictions f(z_σ) = z_σ − σ·v
    fake = z_sigma - s * v_fake
    with torch.no_grad():
        weight_factor = (x_g - real).abs().float().flatten(1).mean(1).clamp_min(1e-5)
    gap = real - fake
    loss = (gap * ((real - x_g) - alpha * gap)).float().flatten(1).mean(1)
    return loss / weight_factor, weight_factor


def sida_generator_losses(
    x_g: torch.Tensor,
    z_sigma: torch.Tensor,
    sigma: torch.Tensor,
    v_real: torch.Tensor,
    v_fake: torch.Tensor,
    fake_logits: torch.Tensor,
    alpha: float = 1.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA's two generator terms, batch means: the SiD loss (``sid_loss``) and the non-saturating adversarial
    loss ``softplus(−D(z_σ))`` of the discriminator logits ``B×…`` on the generator's noisy samples, divided per
    sample by SiD's normaliser (as SiDA does, so both terms scale alike)."""
    sid, weight_factor = sid_loss(x_g, z_sigma, sigma, v_real, v_fake, alpha)
    adversarial = F.softplus(-fake_logits.float()).flatten(1).mean(1) / weight_factor
    return sid.mean(), adversarial.mean()


class DiscriminatorHead(nn.Module):
    """SiDA's discriminator on the fake-score network's features: LayerNorm + linear, one logit per token.

    The fake-score network is the discriminator's body (SiDA shares its encoder): the head reads the tokens
    ``B×N×dim`` one of its blocks outputs and is trained with it. It starts undecided (zero linear layer: every
    logit 0), so a run starts alike whatever random numbers were drawn before it is built.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``B×N×dim`` → ``B×N`` logits (float32)."""
        return self.linear(self.norm(tokens.float())).squeeze(-1)


def refine_settings(
    records: dict[str, Any], requested: SamplingSettings | None, source: str
) -> SamplingSettings:
    """The refine stage's sampler settings for a refiner with ``records``.

    ``requested`` None: what a distilled refiner was distilled for — Euler at ``distilled_steps`` on its
    ``distilled_shift``, guidance 1 when guidance-distilled — and ``UNDISTILLED_REFINE`` otherwise. Explicit
    settings are used as given, with a warning where they differ from what the refiner was distilled for.
    """
    recorded: dict[str, Any] = {}
    if records.get(GUIDANCE_DISTILLED):
        recorded["guidance_scale"] = 1.0
    if DISTILLED_STEPS in records:
        recorded.update(
            steps=int(records[DISTILLED_STEPS]), shift=float(records[DISTILLED_SHIFT]), sampler="euler"
        )
    if requested is None:
        return replace(UNDISTILLED_REFINE, **recorded)
    differ = {k: (v, getattr(requested, k)) for k, v in recorded.items() if getattr(requested, k) != v}
    if differ:
        what = ", ".join(f"{k} {want!r} (distilled for {was!r})" for k, (was, want) in differ.items())
        warnings.warn(
            f"the refiner {source} was distilled for other sampler settings; the refine settings ask for {what}. "
            "A distilled network degrades away from them: leave `refine:` out of the pipeline config to use "
            "the recorded ones.",
            stacklevel=2,
        )
    return requested

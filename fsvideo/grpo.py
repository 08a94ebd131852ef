"""GRPO for the distilled refiner (§2.4.3): an SDE twin of the few-step Euler sampler with per-step log-probabilities,
group-relative advantages, the clipped policy objective, and MixGRPO's sliding window.

Flow convention of ``fsvideo.flow``: ``z_σ = (1 − σ)·z0 + σ·ε``, velocity ``v = ε − z0``, sampling from σ = 1 to 0.

**The SDE step.** An Euler step σ → σ' of the flow ODE is, written with the x0- and noise-predictions
``x̂0 = z − σ·v`` and ``ε̂ = z + (1 − σ)·v``, the deterministic DDIM step ``z' = (1 − σ')·x̂0 + σ'·ε̂``. The SDE step
keeps the coefficient σ' of the noise and splits it between the predicted noise and fresh noise ξ ~ N(0, I)::

    s = η·σ'                                    fresh-noise std of the step (η ∈ [0, 1))
    z' = (1 − σ')·x̂0 + sqrt(σ'² − s²)·ε̂ + s·ξ                  (DDIM-η in flow form)

so a step is a Gaussian ``N(μ_θ(z), s²·I)`` whose log-density is exact (``step_log_prob``). With ε̂ the true noise
of z (the data's x0 known) the marginal at σ' is exactly the ODE's; for a general field it keeps the ODE's mean,
and for Gaussian data N(1, 0.5²) with the exact velocity its per-step standard deviation stays within 0.7 %, 2.1 %
and 4.6 % of the ODE's at η = 0.3, 0.5, 0.7 on the 8-step shift-3 grid (``tests/test_grpo.py`` measures η = 0.3 on
20 000 samples), where the Euler–Maruyama discretisation of the reverse SDE (Flow-GRPO's default,
``σ_t = a·sqrt(t/(1 − t))``) is 5 %, 13 % and 21 % off, and far more for narrower data. This is the
coefficients-preserving form Flow-GRPO offers beside its SDE. η = 0 is the Euler step itself, so the ODE steps
outside the window are this step with no noise. The last step (σ' = 0) has no noise left, so it is always an ODE
step.

**MixGRPO's window** (``SlidingWindow``): of the ``steps`` sampler steps only a window of ``size`` consecutive
steps is stochastic and trained; the steps before and after it are ODE steps without gradient. The window moves
over training (``schedule``), which narrows the search space of each update (MixGRPO).

**Objective** (GRPO / Flow-GRPO): G samples of one condition form a group; the rewards' group mean and std give
advantages ``A = (r − mean) / (std + eps)``, the same for every step of a sample. Per window step the policy
ratio is ``r_θ = exp((log π_θ − log π_old) / d)`` with d the stochastic elements of a sample (Flow-GRPO's mean
over the latent's elements: the log-density of a 10⁶-element step would make ratios of a useful step overflow),
and the loss ``max(−A·r_θ, −A·clip(r_θ, 1 − ε, 1 + ε))`` averaged over samples, plus β times the KL of the
policy's step to the frozen reference's, ``‖μ_θ − μ_ref‖² / (2·s²·d)`` (same std: a closed form).

Groups may span data-parallel ranks (``group_advantages`` gathers the rewards; every rank gets the same
statistics).

Public API:
    SlidingWindow                           size, stride, interval and schedule of the moving window
    sde_std(sigma_next, eta) -> s
    sde_mean(z, v, sigma, sigma_next, eta) -> μ
    step_log_prob(z_next, mean, std, free=None) -> ``B`` log-density of the step
    sde_step(z, v, sigma, sigma_next, eta, generator=None, free=None) -> (z', log-prob ``B``, μ)
    Rollout, rollout(velocity_fn, noise, sigmas, window, eta, generator=None, free=None) -> Rollout
    group_advantages(rewards, eps=1e-6) -> GroupStats (gathered over ranks when distributed)
    clipped_objective(log_prob, old_log_prob, advantages, clip_range, elements) -> (loss, ratio ``B``)
    gaussian_kl(mean, reference_mean, std, free, elements) -> ``B``
    StepLoss, window_losses(velocity_fn, path, advantages, eta, clip_range, free=None, reference_fn=None,
                            kl_coefficient=0.0) -> one StepLoss per window step (backward each, then step)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsvideo.flow import VelocityFn

WINDOW_SCHEDULES = ("progressive", "fixed", "random")


@dataclass
class SlidingWindow:
    """MixGRPO's sliding window over the sampler's steps (module docstring)."""

    size: int = 4
    """Consecutive SDE steps trained per rollout (MixGRPO's window size w). The report gives no value; MixGRPO
    uses 4 of 25 steps, we keep 4 (of the refiner's 8: 2 in the tiny preset)."""
    stride: int = 1
    """Steps the window moves by at each move (MixGRPO's stride s)."""
    interval: int = 25
    """Training steps between two moves (MixGRPO's shift interval τ)."""
    schedule: str = "progressive"
    """"progressive": starts at ``start`` and moves ``stride`` toward σ = 0 every ``interval`` steps, back to step
    0 after the last position (MixGRPO moves it from high to low noise; the wrap-around is ours, the report is
    silent); "fixed": stays at ``start``; "random": a uniformly drawn position per training step (from ``seed`` and
    the step, the same on every rank)."""
    start: int = 0
    """First position (step index of the window's first step; 0 = the step from pure noise)."""
    seed: int = 0
    """Seed of the "random" schedule."""

    def __post_init__(self) -> None:
        if self.schedule not in WINDOW_SCHEDULES:
            raise ValueError(f"window.schedule must be one of {WINDOW_SCHEDULES}, got {self.schedule!r}.")
        if self.size < 1 or self.stride < 1 or self.interval < 1 or self.start < 0:
            raise ValueError(
                "window.size, window.stride and window.interval must be >= 1 and window.start >= 0."
            )

    def last_position(self, steps: int) -> int:
        """The last start position on a ``steps``-step grid: the window stays within the first ``steps − 1`` steps
        (the last step ends at σ = 0, where no noise is left)."""
        last = steps - 1 - self.size
        if last < 0 or self.start > last:
            raise ValueError(
                f"a window of {self.size} SDE steps starting at {self.start} does not fit the first {steps - 1} of "
                f"the refiner's {steps} steps (the last step is deterministic); lower window.size or window.start."
            )
        return last

    def position(self, training_step: int, steps: int) -> int:
        """The window's first step index at ``training_step`` on a ``steps``-step grid."""
        last = self.last_position(steps)
        if self.schedule == "fixed":
            return self.start
        if self.schedule == "random":
            generator = torch.Generator().manual_seed(self.seed + training_step)
            return int(torch.randint(last + 1, (), generator=generator))
        return (self.start + (training_step // self.interval) * self.stride) % (last + 1)


def sde_std(sigma_next: float, eta: float) -> float:
    """``s = η·σ'``: the fresh-noise std of a step ending at ``sigma_next``."""
    if not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be in [0, 1), got {eta}")
    return eta * sigma_next


def sde_mean(z: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float) -> torch.Tensor:
    """``μ = (1 − σ')·x̂0 + sqrt(σ'² − s²)·ε̂`` from ``z``, ``v`` ``B×…`` at σ (module docstring); η = 0 is Euler."""
    std = sde_std(sigma_next, eta)
    x0 = z - sigma * v
    noise = z + (1.0 - sigma) * v
    return (1.0 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * noise


def _free_mask(free: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``free`` (broadcastable to ``like``) as a float mask shaped like ``like``; None: every element."""
    if free is None:
        return torch.ones_like(like)
    return free.to(like.dtype).expand_as(like)


def step_log_prob(
    z_next: torch.Tensor, mean: torch.Tensor, std: float, free: torch.Tensor | None = None
) -> torch.Tensor:
    """``log N(z'; μ, s²·I)`` summed over each sample's stochastic elements (``free``: bool broadcastable to
    ``B×…``, True where the step draws noise; None: all) → ``B`` (float64)."""
    if std <= 0:
        raise ValueError("a deterministic step (std 0) has no density; it cannot be in the window.")
    mask = _free_mask(free, z_next).double()
    diff = z_next.double() - mean.double()
    per_element = -(diff**2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return (per_element * mask).flatten(1).sum(dim=1)


def sde_step(
    z: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    generator: torch.Generator | None = None,
    free: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step σ → σ' from ``z`` with velocity ``v`` (``B×…``): ``(z', log-prob B, μ)``. Elements outside
    ``free`` take the deterministic ``μ`` (given frames); ``generator`` draws ξ (on ``z``'s device)."""
    mean = sde_mean(z, v, sigma, sigma_next, eta)
    std = sde_std(sigma_next, eta)
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    z_next = mean + std * noise * _free_mask(free, z)
    return z_next, step_log_prob(z_next, mean, std, free), mean


@dataclass
class Rollout:
    """One sample's path through the window (tensors without graph)."""

    window: range
    """Step indices of the SDE steps."""
    sigmas: list[float]
    """The grid, ``steps + 1`` noise levels from 1 to 0."""
    latents: list[torch.Tensor]
    """``z`` ``B×…`` entering each window step."""
    next_latents: list[torch.Tensor]
    """``z'`` ``B×…`` each window step drew."""
    log_probs: list[torch.Tensor]
    """``B`` log-density of each window step under the sampling policy (π_old)."""
    sample: torch.Tensor
    """``B×…`` the final sample at σ = 0."""


@torch.no_grad()
def rollout(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    window: range,
    eta: float,
    generator: torch.Generator | None = None,
    free: torch.Tensor | None = None,
) -> Rollout:
    """Sample from ``noise`` (σ = 1) on the grid ``sigmas`` (``steps + 1``): SDE steps inside ``window``, Euler
    (ODE) steps outside, all without gradient; the window steps' inputs, outputs and log-densities are kept."""
    grid = [float(s) for s in sigmas]
    if window.start < 0 or window.stop > len(grid) - 2:
        raise ValueError(
            f"window {window.start}..{window.stop - 1} must lie within the first {len(grid) - 2} steps (the last "
            "step ends at σ = 0 and is deterministic)."
        )
    z = noise
    latents, next_latents, log_probs = [], [], []
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        v = velocity_fn(z, torch.full((z.shape[0],), sigma, device=z.device))
        if i in window:
            z_next, log_prob, _ = sde_step(z, v, sigma, sigma_next, eta, generator, free)
            latents.append(z)
            next_latents.append(z_next)
            log_probs.append(log_prob)
            z = z_next
        else:
            z = sde_mean(z, v, sigma, sigma_next, 0.0)  # the Euler step
    return Rollout(window, grid, latents, next_latents, log_probs, z)


@dataclass
class GroupStats:
    """Group-relative advantages of this rank's samples and the statistics of the whole groups."""

    advantages: torch.Tensor
    """``groups×n`` of this rank's samples (n per group on this rank)."""
    mean: torch.Tensor
    """``groups`` reward mean of each whole group."""
    std: torch.Tensor
    """``groups`` reward std of each whole group (population)."""


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> GroupStats:
    """``A = (r − mean_g) / (std_g + eps)`` per group, the group the row of ``rewards`` (``groups×n``, this rank's
    n samples of each group). When ``torch.distributed`` is initialised each group spans every rank (rank k
    holding its samples k·n … (k+1)·n − 1): the rewards are gathered, so every rank computes the same statistics,
    and the advantages of its own samples are returned."""
    rewards = rewards.detach().float()
    rank, world = 0, 1
    full = rewards
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(rewards) for _ in range(world)]
        dist.all_gather(parts, rewards.contiguous())
        full = torch.cat(parts, dim=1)  # (groups, world·n), rank-major
    mean = full.mean(dim=1, keepdim=True)
    std = full.std(dim=1, unbiased=False, keepdim=True)
    advantages = (full - mean) / (std + eps)
    n = rewards.shape[1]
    return GroupStats(advantages[:, rank * n : (rank + 1) * n], mean.squeeze(1), std.squeeze(1))


def clipped_objective(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with the per-element ratio (module docstring): ``(loss, ratio B)``; inputs ``B``."""
    ratio = torch.exp((log_prob - old_log_prob.detach()) / elements).float()
    advantages = advantages.to(ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def gaussian_kl(
    mean: torch.Tensor, reference_mean: torch.Tensor, std: float, free: torch.Tensor | None, elements: int
) -> torch.Tensor:
    """KL of ``N(μ, s²)`` to ``N(μ_ref, s²)`` per element, ``‖μ − μ_ref‖² / (2·s²·d)`` over the stochastic
    elements → ``B``."""
    mask = _free_mask(free, mean)
    squared = ((mean - reference_mean.detach()) ** 2 * mask).flatten(1).sum(dim=1)
    return squared / (2 * std**2 * elements)


@dataclass
class StepLoss:
    """The GRPO loss of one window step and what is logged of it."""

    loss: torch.Tensor
    """Scalar: clipped surrogate + β·KL (with the policy's graph)."""
    ratio: torch.Tensor
    """``B`` policy ratios (detached)."""
    kl: torch.Tensor
    """``B`` per-element KL to the reference (zeros without one)."""


def window_losses(
    velocity_fn: VelocityFn,
    path: Rollout,
    advantages: torch.Tensor,
    eta: float,
    clip_range: float,
    free: torch.Tensor | None = None,
    reference_fn: VelocityFn | None = None,
    kl_coefficient: float = 0.0,
) -> Iterator[StepLoss]:
    """The loss of each window step of ``path`` under the policy ``velocity_fn`` (module docstring), one at a time
    so that the caller backpropagates each and frees its graph (one network evaluation alive at a time).

    Args:
        velocity_fn: the trained policy's velocity (with gradient).
        path: the rollout drawn by the policy before this update (π_old).
        advantages: ``B`` advantage of each sample (the same for all its steps).
        free: bool broadcastable to the latent, True where the steps draw noise (None: everywhere).
        reference_fn: the frozen reference's velocity, for the KL term (evaluated without gradient).
    """
    elements = int(_free_mask(free, path.latents[0][:1]).sum()) if path.latents else 1
    for j, step in enumerate(path.window):
        sigma, sigma_next = path.sigmas[step], path.sigmas[step + 1]
        z = path.latents[j]
        sigma_batch = torch.full((z.shape[0],), sigma, device=z.device)
        std = sde_std(sigma_next, eta)
        mean = sde_mean(z, velocity_fn(z, sigma_batch), sigma, sigma_next, eta)
        log_prob = step_log_prob(path.next_latents[j], mean, std, free)
        loss, ratio = clipped_objective(log_prob, path.log_probs[j], advantages, clip_range, elements)
        kl = torch.zeros_like(ratio)
        if reference_fn is not None and kl_coefficient > 0:
            with torch.no_grad():
                reference_mean = sde_mean(z, reference_fn(z, sigma_batch), sigma, sigma_next, eta)
            kl = gaussian_kl(mean, reference_mean, std, free, elements)
            loss = loss + kl_coefficient * kl.mean()
        yield StepLoss(loss, ratio.detach(), kl.detach())

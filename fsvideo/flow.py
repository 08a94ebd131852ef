"""Flow matching: interpolation, noise-level sampling, timestep shift, Pseudo-Huber loss, samplers.

Convention (spec §2.4.2 eq. 10–11, DESIGN §5): ``z_σ = (1 − σ)·z0 + σ·ε`` with σ ∈ [0, 1], σ = 1 pure
noise; the model predicts the velocity ``v = dz_σ/dσ = ε − z0``. Sampling integrates dz/dσ = v from
σ = 1 down to σ = 0.

Public API:
    interpolate(z0, noise, sigma) -> z_σ
    velocity_target(z0, noise) -> ε − z0
    sample_sigma(batch_size, mean=0.0, std=1.0, generator=None, device=None) -> ``B`` logit-normal σ
    shift_sigma(sigma, shift) -> s·σ / (1 + (s − 1)·σ)
    resolution_shift(num_tokens, ...) -> shift growing with the token count (SD3 / Flux rule)
    pseudo_huber_c(num_elements) -> 0.00054·sqrt(d)
    pseudo_huber_loss(pred, target, c=None, reduction="mean") -> sqrt(‖pred − target‖² + c²) − c
    sigma_schedule(steps, shift=1.0) -> ``steps+1`` σ from 1 to 0
    classifier_free_guidance(conditional, unconditional, scale) -> velocity function
    sample(velocity_fn, noise, steps, shift=1.0, sampler="euler", callback=None) -> z0
    unshift_sigma(sigma, shift) -> the σ that ``shift_sigma`` maps to ``sigma``
    integrate_segment(velocity_fn, z, sigma_from, sigma_to, steps, shift=1.0) -> z at sigma_to (Euler)
    SAMPLERS: the names ``sample`` accepts ("euler", "unipc")

A velocity function takes ``(z B×…, sigma B)`` and returns ``v`` shaped like ``z``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, float, torch.Tensor], None]
SAMPLERS = ("euler", "unipc")


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B`` → ``B×1×…×1`` to broadcast against ``like``."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``z_σ = (1 − σ)·z0 + σ·ε``; z0, noise ``B×…``, sigma ``B``."""
    s = _per_sample(sigma, z0)
    return (1 - s) * z0 + s * noise


def velocity_target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v = ε − z0``, the training target."""
    return noise - z0


def sample_sigma(
    batch_size: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logit-normal noise levels (SD3): ``σ = sigmoid(n)``, ``n ~ N(mean, std²)``; returns ``B`` float32."""
    if std <= 0:
        raise ValueError(f"std of the logit-normal must be positive, got {std}")
    n = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``σ' = s·σ / (1 + (s − 1)·σ)``: s > 1 spends more steps / samples at high noise,
    which larger (more redundant) latents need. Fixes 0 and 1."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of ``shift_sigma``: ``u = σ / (s − (s − 1)·σ)``."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return sigma / (shift - (shift - 1) * sigma)


def resolution_shift(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = math.exp(0.5),
    max_shift: float = math.exp(1.15),
) -> float:
    """Shift that grows with the sequence length, the SD3 / Flux rule: ``log(shift)`` is linear in the
    token count, through ``(base_tokens, log base_shift)`` and ``(max_tokens, log max_shift)``
    (extrapolated outside). The defaults are Flux's (μ = 0.5 at 256 tokens, 1.15 at 4096)."""
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed base_tokens ({base_tokens})")
    slope = (math.log(max_shift) - math.log(base_shift)) / (max_tokens - base_tokens)
    return math.exp(math.log(base_shift) + slope * (num_tokens - base_tokens))


def pseudo_huber_c(num_elements: int) -> float:
    """``c = 0.00054·sqrt(d)`` (improved consistency training, Song & Dhariwal 2023): c grows with the
    norm of a d-dimensional error, so the quadratic-to-linear transition sits at the same per-element
    error (≈ 0.00054) whatever the latent size."""
    return 0.00054 * math.sqrt(num_elements)


def pseudo_huber_loss(
    pred: torch.Tensor, target: torch.Tensor, c: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Pseudo-Huber ``sqrt(‖pred − target‖² + c²) − c`` with the norm over each sample (``B×…``).

    Args:
        c: transition scale; default ``pseudo_huber_c(d)`` with d the elements per sample.
        reduction: "mean" over the batch, or "none" for the ``B`` per-sample losses.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    c = pseudo_huber_c(pred[0].numel()) if c is None else c
    squared = (pred.float() - target.float()).pow(2).flatten(1).sum(dim=1)
    loss = torch.sqrt(squared + c * c) - c
    return loss.mean() if reduction == "mean" else loss


def sigma_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` noise levels ``shift_sigma(linspace(1, 0))``, float64 (Wan's UniPC schedule shape)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def classifier_free_guidance(conditional: VelocityFn, unconditional: VelocityFn, scale: float) -> VelocityFn:
    """``v = v_u + scale·(v_c − v_u)``; scale 1 evaluates only the conditional branch."""

    def guided(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_cond = conditional(z, sigma)
        if scale == 1.0:
            return v_cond
        v_uncond = unconditional(z, sigma)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def _sample_euler(
    velocity_fn: VelocityFn, z: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None
) -> torch.Tensor:
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma = sigmas[i].item()
        v = velocity_fn(z, torch.full((z.shape[0],), sigma, device=z.device))
        z = z + (sigmas[i + 1].item() - sigma) * v
        if callback is not None:
            callback(i, steps, sigma, z)
    return z


def _sample_unipc(
    velocity_fn: VelocityFn, z: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None
) -> torch.Tensor:
    # diffusers' UniPC in flow mode is Wan's default solver (order 2, bh2, lower order at the end);
    # we hand it our own shifted schedule, so flow_shift stays 1. Imported here: diffusers costs every
    # `fsvideo` process about 2 s of start-up, and only UniPC sampling needs it.
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0
    )
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy(), device=z.device)
    # step by index, not by looking up integer timesteps (strong shifts make them collide)
    scheduler.set_begin_index(0)
    steps = len(scheduler.timesteps)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].item()
        v = velocity_fn(z, torch.full((z.shape[0],), sigma, device=z.device))
        z = scheduler.step(v, timestep, z, return_dict=False)[0]
        if callback is not None:
            callback(i, steps, sigma, z)
    return z


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    sampler: str = "euler",
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (σ = 1) to σ = 0 on ``sigma_schedule(steps, shift)``.

    Args:
        velocity_fn: ``(z, sigma B) -> v``; wrap a DiT (and ``classifier_free_guidance``) in it.
        noise: ``B×…`` starting point (draw it with your own generator for reproducibility).
        steps: number of velocity evaluations (per guidance branch).
        shift: timestep shift (Wan I2V: 5.0 at 720p, 3.0 at 480p).
        sampler: "euler" (first order) or "unipc" (diffusers' multistep UniPC, Wan's default).
        callback: called after every step as ``callback(step, steps, sigma, z)``.

    Returns:
        the sample at σ = 0, shaped like ``noise``. Autograd is left as the caller set it (wrap in
        ``torch.no_grad()`` for plain inference; reward feedback learning needs the graph).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    sigmas = sigma_schedule(steps, shift)
    run = _sample_euler if sampler == "euler" else _sample_unipc
    return run(velocity_fn, noise, sigmas, callback)


def integrate_segment(
    velocity_fn: VelocityFn,
    z: torch.Tensor,
    sigma_from: torch.Tensor | float,
    sigma_to: torch.Tensor | float,
    steps: int,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler-integrate dz/dσ = v from ``sigma_from`` to ``sigma_to`` in ``steps`` steps.

    The intermediate noise levels are evenly spaced before the timestep shift, so a segment between two points
    of ``sigma_schedule(n, shift)`` visits exactly the points of the finer ``sigma_schedule(n·k, shift)`` that lie
    between them: two teacher steps of progressive distillation, the last steps of a ReFL rollout.

    Args:
        velocity_fn: ``(z, sigma B) -> v``.
        z: ``B×…`` at ``sigma_from``.
        sigma_from, sigma_to: ``B`` per-sample noise levels (or one float for the batch).
        steps: Euler steps (velocity evaluations).
        shift: the timestep shift of the grid the segment belongs to (1: evenly spaced in σ).

    Returns:
        ``z`` at ``sigma_to``; autograd is left as the caller set it.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = z.shape[0]
    start = torch.as_tensor(sigma_from, dtype=torch.float64, device=z.device).expand(batch)
    end = torch.as_tensor(sigma_to, dtype=torch.float64, device=z.device).expand(batch)
    u_start, u_end = unshift_sigma(start, shift), unshift_sigma(end, shift)
    sigma = start
    for i in range(1, steps + 1):
        following = end if i == steps else shift_sigma(u_start + (u_end - u_start) * (i / steps), shift)
        v = velocity_fn(z, sigma.float())
        z = z + _per_sample(following - sigma, z) * v
        sigma = following
    return z

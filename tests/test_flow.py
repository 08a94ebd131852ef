"""Flow matching: interpolation, σ sampling, shift, Pseudo-Huber loss, and both samplers on a Gaussian
whose probability-flow ODE has a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from fsvideo import flow

MU, STD = 1.5, 0.5  # data distribution N(MU, STD²) per element


def gaussian_velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[ε − z0 | z_σ = z] for z0 ~ N(MU, STD²), ε ~ N(0, 1)."""
    s = sigma.reshape(-1, *([1] * (z.ndim - 1))).double()
    a = 1 - s
    var = a**2 * STD**2 + s**2
    return ((s - a * STD**2) / var * (z.double() - a * MU) - MU).to(z.dtype)


def exact_endpoint(noise: torch.Tensor) -> torch.Tensor:
    # the flow keeps the standardised coordinate: z_σ = (1−σ)μ + sqrt((1−σ)²s² + σ²)·ξ, ξ = z_1
    return MU + STD * noise


def test_interpolation_and_target():
    z0, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    z = flow.interpolate(z0, noise, sigma)
    torch.testing.assert_close(z[0], z0[0])
    torch.testing.assert_close(z[1], 0.75 * z0[1] + 0.25 * noise[1])
    torch.testing.assert_close(z[2], noise[2])
    # the target is dz/dσ
    eps = 1e-3
    dz = (
        flow.interpolate(z0, noise, sigma.clamp(max=1 - eps) + eps)
        - flow.interpolate(z0, noise, sigma.clamp(max=1 - eps))
    ) / eps
    torch.testing.assert_close(dz, flow.velocity_target(z0, noise), rtol=1e-3, atol=1e-3)


def test_logit_normal_statistics():
    generator = torch.Generator().manual_seed(0)
    sigma = flow.sample_sigma(200_000, mean=0.3, std=0.8, generator=generator)
    assert sigma.shape == (200_000,) and 0 < sigma.min() and sigma.max() < 1
    logits = torch.logit(sigma.double())
    assert abs(logits.mean().item() - 0.3) < 0.01
    assert abs(logits.std().item() - 0.8) < 0.01
    with pytest.raises(ValueError, match="std"):
        flow.sample_sigma(4, std=0.0)


def test_shift_formula():
    sigma = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    shifted = flow.shift_sigma(sigma, 3.0)
    expected = torch.tensor([0.0, 0.6 / 1.4, 1.5 / 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, expected)
    torch.testing.assert_close(flow.shift_sigma(sigma, 1.0), sigma)
    assert torch.all(flow.shift_sigma(sigma[1:3], 5.0) > sigma[1:3])


def test_resolution_shift_is_log_linear_in_tokens():
    assert flow.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert flow.resolution_shift(2176) == pytest.approx(math.exp(0.825))
    with pytest.raises(ValueError, match="max_tokens"):
        flow.resolution_shift(10, base_tokens=100, max_tokens=100)


def test_pseudo_huber_matches_formula():
    pred, target = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    d = 15
    c = 0.00054 * math.sqrt(d)
    direct = torch.sqrt(((pred - target) ** 2).sum(dim=(1, 2)) + c**2) - c
    torch.testing.assert_close(flow.pseudo_huber_loss(pred, target, reduction="none"), direct)
    torch.testing.assert_close(flow.pseudo_huber_loss(pred, target), direct.mean())
    # large c: ≈ ‖x−y‖²/(2c) (quadratic); c → 0: ≈ ‖x−y‖ (linear)
    quad = flow.pseudo_huber_loss(pred, target, c=100.0, reduction="none")
    torch.testing.assert_close(quad, ((pred - target) ** 2).sum(dim=(1, 2)) / 200.0, rtol=2e-3, atol=0)
    lin = flow.pseudo_huber_loss(pred, target, c=0.0, reduction="none")
    torch.testing.assert_close(lin, (pred - target).flatten(1).norm(dim=1))


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_reach_the_exact_endpoint(sampler, shift):
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    out = flow.sample(
        gaussian_velocity,
        noise,
        steps=40,
        shift=shift,
        sampler=sampler,
        callback=lambda i, n, s, z: seen.append((i, n, s)),
    )
    assert [i for i, _, _ in seen] == list(range(40)) and seen[0][1] == 40
    assert seen[0][2] == pytest.approx(1.0, abs=1e-5) and all(a[2] > b[2] for a, b in zip(seen, seen[1:]))
    error = (out - exact_endpoint(noise)).abs().max().item()
    # Euler is first order with a large constant here (|ξ| up to 3); UniPC is multistep
    assert error < (0.15 if sampler == "euler" else 1e-2), error


def test_unipc_beats_euler_and_euler_converges_first_order():
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = exact_endpoint(noise)

    def error(steps, sampler):
        return (
            (flow.sample(gaussian_velocity, noise, steps, shift=3.0, sampler=sampler) - exact)
            .abs()
            .max()
            .item()
        )

    e10, e20, e40 = (error(n, "euler") for n in (10, 20, 40))
    assert e10 > e20 > e40
    assert 1.6 < e10 / e20 < 2.6 and 1.6 < e20 / e40 < 2.6  # halving per doubling: first order
    assert error(40, "unipc") < e40 / 8


def test_classifier_free_guidance():
    cond = lambda z, s: torch.ones_like(z)  # noqa: E731
    uncond = lambda z, s: torch.zeros_like(z)  # noqa: E731
    z, s = torch.zeros(2, 3), torch.ones(2)
    torch.testing.assert_close(
        flow.classifier_free_guidance(cond, uncond, 5.0)(z, s), torch.full((2, 3), 5.0)
    )
    calls = []
    flow.classifier_free_guidance(cond, lambda z, s: calls.append(1), 1.0)(z, s)
    assert calls == []


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.sample(gaussian_velocity, torch.zeros(1, 2), 4, sampler="heun")
    with pytest.raises(ValueError, match="steps"):
        flow.sigma_schedule(0)

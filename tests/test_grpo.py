"""GRPO's parts (``fsvideo.grpo``) on a toy Gaussian whose exact velocity is known: the SDE step keeps the ODE's
per-step marginals and its log-probability is the Gaussian density of the step; before an update the ratio is 1
and nothing is clipped; advantages have zero mean per group, also when a group spans two gloo ranks; the window
moves as configured."""

from __future__ import annotations

import math

import pytest
import torch
from two_process import spawn_two

from fsvideo.flow import sigma_schedule
from fsvideo.grpo import (
    SlidingWindow,
    clipped_objective,
    group_advantages,
    rollout,
    sde_mean,
    sde_std,
    sde_step,
    step_log_prob,
    window_losses,
)

MU, SCALE, DIMS, SAMPLES = 1.0, 0.5, 4, 20_000
STEPS, SHIFT = 8, 3.0
MEAN_TOLERANCE, STD_TOLERANCE = 0.02, 0.02
"""Per grid point, SDE vs ODE over SAMPLES×DIMS draws at η = 0.3: |mean difference| < MEAN_TOLERANCE and
|std ratio − 1| < STD_TOLERANCE (analytically 0.7 % at most on this grid; sampling error about 0.4 %)."""


def exact_velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[ε − x0 | z_σ] for data x0 ~ N(MU, SCALE²) per element: x̂0 and ε̂ are linear in z."""
    s = sigma.view(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    variance = (1 - s) ** 2 * SCALE**2 + s**2
    centred = z - (1 - s) * MU
    x0 = MU + (1 - s) * SCALE**2 / variance * centred
    noise = s / variance * centred
    return noise - x0


def marginals(eta: float, seed: int) -> list[tuple[float, float]]:
    """(mean, std) after every step of the 8-step shift-3 grid, SDE at every step but the last (η = 0: ODE)."""
    sigmas = sigma_schedule(STEPS, SHIFT)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(SAMPLES, DIMS, generator=generator, dtype=torch.float64)
    out = []
    for i in range(STEPS):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        v = exact_velocity(z, torch.full((SAMPLES,), sigma, dtype=torch.float64))
        if eta > 0 and i < STEPS - 1:
            z, _, _ = sde_step(z, v, sigma, sigma_next, eta, generator)
        else:
            z = sde_mean(z, v, sigma, sigma_next, 0.0)
        out.append((z.mean().item(), z.std().item()))
    return out


def test_sde_keeps_the_odes_per_step_marginals():
    ode, sde = marginals(0.0, seed=0), marginals(0.3, seed=1)
    for i, ((m_ode, s_ode), (m_sde, s_sde)) in enumerate(zip(ode, sde)):
        print(f"step {i}: mean {m_ode:.4f} vs {m_sde:.4f}, std {s_ode:.4f} vs {s_sde:.4f}")
        assert abs(m_sde - m_ode) < MEAN_TOLERANCE, i
        assert abs(s_sde / s_ode - 1) < STD_TOLERANCE, i
    # the Euler ODE itself is far from the true marginal at σ = 0 on 8 steps: the SDE matches the ODE, not the data
    assert abs(ode[-1][1] - SCALE) > 0.1


def test_log_prob_is_the_gaussian_density_of_the_step():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    v = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    free = torch.tensor([False, True, True, False, True]).view(1, 1, 5)  # frames 0 and 3 are given
    z_next, log_prob, mean = sde_step(z, v, 0.7, 0.5, 0.6, generator, free)
    std = sde_std(0.5, 0.6)
    expected = torch.distributions.Normal(mean, std).log_prob(z_next)[..., free.flatten()].flatten(1).sum(1)
    torch.testing.assert_close(log_prob, expected)
    assert torch.equal(z_next[..., ~free.flatten()], mean[..., ~free.flatten()])  # given elements: no noise
    # η = 0 is the Euler step
    torch.testing.assert_close(sde_mean(z, v, 0.7, 0.5, 0.0), z + (0.5 - 0.7) * v)
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(z_next, mean, 0.0)


def test_ratio_is_one_and_nothing_clipped_before_an_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(DIMS, DIMS)

    def velocity(z, sigma):
        return net(z) * sigma.view(-1, 1)

    noise = torch.randn(6, DIMS)
    sigmas = sigma_schedule(STEPS, SHIFT)
    path = rollout(velocity, noise, sigmas, range(2, 5), 0.7, torch.Generator().manual_seed(0))
    assert len(path.log_probs) == 3 and path.sample.shape == noise.shape
    advantages = group_advantages(torch.randn(2, 3)).advantages.flatten()
    losses = list(
        window_losses(velocity, path, advantages, 0.7, 0.2, reference_fn=velocity, kl_coefficient=0.1)
    )
    assert len(losses) == 3
    for step in losses:
        assert torch.equal(step.ratio, torch.ones(6)) and not (step.ratio - 1).abs().gt(0.2).any()
        assert torch.equal(step.kl, torch.zeros(6))
        torch.testing.assert_close(step.loss, -advantages.mean())
        step.loss.backward()  # each step's graph reaches the policy
    assert net.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="deterministic"):
        rollout(velocity, noise, sigmas, range(5, 8), 0.7)


def test_clipping_stops_the_gradient_beyond_the_range():
    log_prob = torch.tensor([0.5, -0.5, 0.01], requires_grad=True)
    loss, ratio = clipped_objective(log_prob, torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]), 0.2, 1)
    loss.backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0 and log_prob.grad[2] < 0
    assert ratio[0] > 1.2 and ratio[1] < 0.8


def test_advantages_have_zero_mean_per_group():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 4.0, 0.0, 2.0]])
    stats = group_advantages(rewards)
    torch.testing.assert_close(stats.advantages.mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.equal(stats.advantages[1], torch.zeros(4))  # equal rewards: no signal
    torch.testing.assert_close(stats.advantages[0].std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.mean, rewards.mean(dim=1))


REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, 4.0, 0.0, 2.0]])


def _two_rank_advantages(mesh) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    stats = group_advantages(REWARDS[:, 2 * rank : 2 * rank + 2])  # each rank holds half of every group
    alone = group_advantages(REWARDS)
    torch.testing.assert_close(stats.advantages, alone.advantages[:, 2 * rank : 2 * rank + 2])
    torch.testing.assert_close(stats.mean, alone.mean)
    torch.testing.assert_close(stats.std, alone.std)


def test_two_gloo_ranks_give_the_one_process_advantages(tmp_path):
    spawn_two(_two_rank_advantages, tmp_path)


def test_window_moves_as_configured():
    progressive = SlidingWindow(size=2, stride=1, interval=3, schedule="progressive")
    positions = [progressive.position(step, 8) for step in range(0, 21, 3)]
    assert positions == [0, 1, 2, 3, 4, 5, 0]  # 6 positions keep 2 steps within the first 7, then back to 0
    assert [progressive.position(step, 8) for step in range(3)] == [0, 0, 0]
    assert SlidingWindow(size=4, schedule="fixed", start=1).position(100, 8) == 1
    random = SlidingWindow(size=3, schedule="random", seed=4)
    drawn = [random.position(step, 8) for step in range(40)]
    assert set(drawn) == {0, 1, 2, 3, 4} and drawn == [random.position(step, 8) for step in range(40)]
    with pytest.raises(ValueError, match="does not fit"):
        SlidingWindow(size=8).position(0, 8)
    with pytest.raises(ValueError, match="schedule"):
        SlidingWindow(schedule="cosine")
    assert math.isclose(sde_std(0.5, 0.4), 0.2)

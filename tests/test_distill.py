"""Refiner distillation's losses and samplers (``fsvideo.distill``, ``flow.integrate_segment``): each against a
direct implementation on toy velocity fields, the refine settings a distilled refiner's records give, and the
three stages on a 2-D toy problem.

Toy problem: a mixture of 8 Gaussians (std 0.1) on a circle; a small MLP velocity model (the teacher) is
regressed on the mixture's exact velocity field for 2 classes (the even and the odd modes) and the
unconditional mixture. Distances are sliced Wasserstein-2 (128 fixed directions) between 4000 samples drawn
from the same seeded noise, against the teacher's own 128-step Euler samples. The toy's "real data" for SiDA's
discriminator are the teacher's 128-step samples, so the distance measures distillation alone, not the
teacher's fit of the mixture.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsvideo import distill, flow
from fsvideo.losses import discriminator_loss
from fsvideo.stages import SamplingSettings

# ---- direct implementations on toy velocity fields ---------------------------------------------------------


def linear_field(a: float, b: float):
    """v(z, σ) = a·z + b·σ: smooth, nonlinear in σ along a trajectory, cheap to integrate by hand."""

    def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return a * z + b * sigma.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)

    return velocity


def test_integrate_segment_is_euler_on_the_shifted_grid():
    velocity = linear_field(-0.7, 0.3)
    noise = torch.randn(3, 2, 4, dtype=torch.float64)
    # the whole range in n steps is the Euler sampler on sigma_schedule(n, shift)
    whole = flow.integrate_segment(velocity, noise, 1.0, 0.0, 12, shift=3.0)
    torch.testing.assert_close(whole, flow.sample(velocity, noise, 12, shift=3.0, sampler="euler"))
    # a segment between points 4 and 6 of the 12-step grid visits point 5, per sample
    grid = flow.sigma_schedule(12, 3.0)
    z = noise.clone()
    for i in (4, 5):
        z = z + (grid[i + 1] - grid[i]) * velocity(z, torch.full((3,), grid[i].item()))
    segment = flow.integrate_segment(velocity, noise, grid[4].expand(3), grid[6].expand(3), 2, shift=3.0)
    torch.testing.assert_close(segment, z)
    torch.testing.assert_close(flow.unshift_sigma(flow.shift_sigma(grid, 3.0), 3.0), grid)


def test_guided_target_is_cfg():
    cond, uncond = linear_field(-1.0, 0.5), linear_field(-0.5, -0.2)
    z, sigma = torch.randn(4, 3), torch.rand(4)
    expected = uncond(z, sigma) + 4.0 * (cond(z, sigma) - uncond(z, sigma))
    torch.testing.assert_close(distill.guided_target(cond, uncond, 4.0, z, sigma), expected)


def test_progressive_target_lands_where_two_teacher_steps_do():
    teacher = linear_field(-0.8, 0.4)
    z = torch.randn(5, 3, dtype=torch.float64)
    sigma_from, sigma_to = distill.student_segments(5, 4, 3.0, generator=torch.Generator().manual_seed(0))
    fine = flow.sigma_schedule(8, 3.0)
    landed = []
    for i in range(5):  # by hand: the two points of the 8-step grid from this sample's student point
        j = int((fine - sigma_from[i]).abs().argmin())
        assert abs(fine[j + 2] - sigma_to[i]) < 1e-12
        zi = z[i : i + 1]
        for k in (j, j + 1):
            zi = zi + (fine[k + 1] - fine[k]) * teacher(zi, fine[k].reshape(1))
        landed.append(zi)
    target = distill.progressive_target(teacher, z, sigma_from, sigma_to, 3.0)
    one_step = z + (sigma_to - sigma_from)[:, None] * target
    torch.testing.assert_close(one_step, torch.cat(landed))


def test_few_step_sample_is_euler_and_keeps_gradients_from_its_slot():
    theta = torch.tensor(0.6, requires_grad=True)

    def velocity(z, sigma):
        return -theta * z + sigma[:, None]

    noise = torch.randn(4, 2)
    out = distill.few_step_sample(velocity, noise, 8, 2.0, grad_from=5)
    torch.testing.assert_close(out, flow.sample(velocity, noise, 8, 2.0, "euler").detach())
    (grad,) = torch.autograd.grad(out.sum(), theta)
    # by hand: steps 0–4 with θ detached, steps 5–7 with the graph
    grid, z = flow.sigma_schedule(8, 2.0), noise
    for i in range(8):
        t = theta if i >= 5 else theta.detach()
        z = z + (grid[i + 1] - grid[i]).item() * (-t * z + grid[i].item())
    (expected,) = torch.autograd.grad(z.sum(), theta)
    torch.testing.assert_close(grad, expected)


def test_sid_loss_matches_its_velocity_form():
    """SiD's x0-form loss equals σ·(v_f − v_r)·((v* − v_r) − α(v_f − v_r)) / mean|v* − v_r| (v* = ε − x_g), in
    value and in the generator's gradient through the teacher, fake score and sample."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3, generator=g).requires_grad_(True)
    noise, eps, sigma = (
        torch.randn(6, 3, generator=g),
        torch.randn(6, 3, generator=g),
        torch.rand(6, generator=g),
    )
    real, fake = linear_field(-1.1, 0.3), linear_field(-0.6, -0.4)

    def losses(form: str):
        x_g = torch.tanh(noise * theta)
        z = flow.interpolate(x_g, eps, sigma)
        v_r, v_f = real(z, sigma), fake(z, sigma)
        if form == "x0":
            return distill.sid_loss(x_g, z, sigma, v_r, v_f, alpha=1.2)[0].mean()
        v_star, s = eps - x_g, sigma[:, None]
        gap = v_f - v_r
        norm = (s * (v_star - v_r)).abs().mean(1, keepdim=True).detach()
        return (s * s * gap * ((v_star - v_r) - 1.2 * gap) / norm).mean(1).mean()

    ours, direct = losses("x0"), losses("velocity")
    torch.testing.assert_close(ours, direct)
    torch.testing.assert_close(torch.autograd.grad(ours, theta)[0], torch.autograd.grad(direct, theta)[0])


def test_sida_adversarial_term_is_non_saturating_over_sids_normaliser():
    x_g, z, sigma = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    v_r, v_f, logits = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 5)
    sid, adversarial = distill.sida_generator_losses(x_g, z, sigma, v_r, v_f, logits, alpha=1.2)
    per_sample, weight_factor = distill.sid_loss(x_g, z, sigma, v_r, v_f, 1.2)
    torch.testing.assert_close(weight_factor, (x_g - (z - sigma[:, None] * v_r)).abs().mean(1))
    torch.testing.assert_close(sid, per_sample.mean())
    torch.testing.assert_close(adversarial, (-F.logsigmoid(logits)).mean(1).div(weight_factor).mean())


def test_refine_settings_from_records():
    records = {distill.GUIDANCE_DISTILLED: True, distill.DISTILLED_STEPS: 8, distill.DISTILLED_SHIFT: 3.0}
    assert distill.refine_settings(records, None, "r") == SamplingSettings(8, 1.0, 3.0, "euler")
    assert distill.refine_settings({}, None, "r") == distill.UNDISTILLED_REFINE
    cfg_only = distill.refine_settings({distill.GUIDANCE_DISTILLED: True}, None, "r")
    assert cfg_only.guidance_scale == 1.0 and cfg_only.steps == distill.UNDISTILLED_REFINE.steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded settings, given explicitly: no warning
        distill.refine_settings(records, SamplingSettings(8, 1.0, 3.0, "euler"), "r")
    asked = SamplingSettings(4, 1.0, 3.0, "euler")
    with pytest.warns(UserWarning, match=r"steps 4 \(distilled for 8\)"):
        assert distill.refine_settings(records, asked, "r") is asked


# ---- the toy problem -------------------------------------------------------------------------------------

MODES = 8
ANGLES = torch.arange(MODES) * 2 * math.pi / MODES
MEANS = torch.stack([ANGLES.cos(), ANGLES.sin()], 1) * 1.5
STD = 0.1
CLASS_MODES = [torch.arange(0, MODES, 2), torch.arange(1, MODES, 2), torch.arange(MODES)]  # 2 = unconditional
UNCONDITIONAL = 2


def mixture_velocity(z: torch.Tensor, sigma: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """Exact E[ε − x | z_σ = z] for x an equal mixture of N(MEANS[modes], STD²·I); z ``B×2``, sigma ``B``."""
    s = sigma[:, None]
    var = (1 - s) ** 2 * STD**2 + s**2  # (B, 1)
    diff = z[:, None] - (1 - s)[:, :, None] * MEANS[modes][None]  # (B, k, 2)
    weights = (-(diff**2).sum(-1) / (2 * var)).softmax(1)[..., None]
    noise = s[:, :, None] * diff / var[:, :, None]
    clean = MEANS[modes][None] + ((1 - s) * STD**2)[:, :, None] * diff / var[:, :, None]
    return (weights * (noise - clean)).sum(1)


class ToyVelocity(nn.Module):
    """v(z ``B×2``, σ ``B``, class ``B``) and its last hidden features (the discriminator's input)."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.input = nn.Linear(2 + 16 + 3, width)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU()
        )
        self.output = nn.Linear(width, 2)

    def features(self, z, sigma, label):
        angles = sigma[:, None] * torch.arange(1, 9) * math.pi
        inputs = torch.cat([z, angles.sin(), angles.cos(), F.one_hot(label, 3).float()], 1)
        hidden = self.body(self.input(inputs))
        return self.output(hidden), hidden

    def forward(self, z, sigma, label):
        return self.features(z, sigma, label)[0]


def branch(network: nn.Module, label: int):
    return lambda z, sigma: network(z, sigma, torch.full((z.shape[0],), label))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: int = 128) -> float:
    d = torch.randn(2, directions, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=0)
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).pow(2).mean().sqrt().item()


@torch.no_grad()
def toy_samples(velocity, steps: int, count: int = 4000, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(count, 2, generator=torch.Generator().manual_seed(seed))
    return flow.sample(velocity, noise, steps, sampler="euler")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy's operations are tiny: one thread is several times faster than a pool on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """The MLP regressed on the exact velocities of the 3 classes at data-noise interpolations (uniform σ)."""
    torch.manual_seed(0)
    network = ToyVelocity()
    optimizer = torch.optim.Adam(network.parameters(), 2e-3)
    steps = 600
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        label = torch.randint(3, (256,))
        half = 2 * torch.randint(MODES // 2, (256,))  # an even mode; +1 an odd one
        modes = torch.where(label == 2, torch.randint(MODES, (256,)), half + label)
        sigma = torch.rand(256)
        z = flow.interpolate(MEANS[modes] + STD * torch.randn(256, 2), torch.randn(256, 2), sigma)
        target = torch.zeros_like(z)
        for c in range(3):
            chosen = label == c
            target[chosen] = mixture_velocity(z[chosen], sigma[chosen], CLASS_MODES[c])
        loss = (network(z, sigma, label) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return network.eval().requires_grad_(False)


def student_of(network: nn.Module) -> nn.Module:
    return copy.deepcopy(network).train().requires_grad_(True)


def test_toy_cfg_distilled_student_gives_the_guided_velocity_in_one_evaluation(teacher):
    torch.manual_seed(0)
    scale = 5.0
    student = student_of(teacher)
    optimizer = torch.optim.Adam(student.parameters(), 1e-3)

    def batch(n: int, generator=None):
        label = torch.randint(2, (n,), generator=generator)
        modes = 2 * torch.randint(MODES // 2, (n,), generator=generator) + label
        x = MEANS[modes] + STD * torch.randn(n, 2, generator=generator)
        sigma = flow.sample_sigma(n, generator=generator)  # the training σ distribution (logit-normal)
        z = flow.interpolate(x, torch.randn(n, 2, generator=generator), sigma)
        target = torch.empty_like(z)
        for c in range(2):  # the guided velocity of class c: its own conditional, the unconditional branch
            chosen = label == c
            target[chosen] = distill.guided_target(
                branch(teacher, c), branch(teacher, UNCONDITIONAL), scale, z[chosen], sigma[chosen]
            )
        return z, sigma, label, target

    def relative_error(network) -> float:
        z, sigma, label, target = batch(2000, torch.Generator().manual_seed(3))
        with torch.no_grad():
            return ((network(z, sigma, label) - target).norm() / target.norm()).item()

    before = relative_error(teacher)
    for _ in range(300):
        z, sigma, label, target = batch(256)
        loss = (student(z, sigma, label) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = relative_error(student)
    print(
        f"CFG distillation: relative error of one evaluation vs the guided velocity {before:.3f} → {after:.3f}"
    )
    assert after < 0.1 and after < 0.2 * before


def test_toy_progressive_distillation_to_8_steps_beats_the_teachers_8_steps(teacher):
    torch.manual_seed(0)
    reference = toy_samples(branch(teacher, UNCONDITIONAL), 128)
    current, steps = teacher, 64  # the teacher at 64 steps, then 32, 16, 8 (one round each)
    while steps > 8:
        steps //= 2
        student = student_of(current)
        optimizer = torch.optim.Adam(student.parameters(), 1e-3)
        for _ in range(150):
            noise = torch.randn(256, 2)
            x = reference[torch.randint(len(reference), (256,))]
            sigma_from, sigma_to = distill.student_segments(256, steps, 1.0)
            z = flow.interpolate(x, noise, sigma_from)
            target = distill.progressive_target(branch(current, UNCONDITIONAL), z, sigma_from, sigma_to, 1.0)
            loss = (branch(student, UNCONDITIONAL)(z, sigma_from.float()) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        current = student.eval().requires_grad_(False)
    distilled = sliced_w2(toy_samples(branch(current, UNCONDITIONAL), 8), reference)
    own = sliced_w2(toy_samples(branch(teacher, UNCONDITIONAL), 8), reference)
    print(f"progressive: SW2 to the teacher's 128 steps, 8 steps: student {distilled:.4f}, teacher {own:.4f}")
    assert distilled < 0.6 * own


def test_toy_sida_to_8_steps_beats_the_teachers_8_steps(teacher):
    torch.manual_seed(0)
    steps, alpha, adversarial_weight, batch = 8, 1.2, 0.1, 128
    reference = toy_samples(branch(teacher, UNCONDITIONAL), 128)
    real_data = toy_samples(branch(teacher, UNCONDITIONAL), 128, count=20000, seed=9)
    generator, fake = student_of(teacher), student_of(teacher)
    head = nn.Linear(128, 1)
    generator_optimizer = torch.optim.Adam(generator.parameters(), 3e-5, betas=(0.0, 0.99))
    fake_optimizer = torch.optim.Adam([*fake.parameters(), *head.parameters()], 1e-3, betas=(0.0, 0.99))
    label = torch.full((batch,), UNCONDITIONAL)
    for _ in range(200):
        # fake score + discriminator: flow matching on the generator's samples, real vs generated features
        with torch.no_grad():
            x_g = distill.few_step_sample(branch(generator, UNCONDITIONAL), torch.randn(batch, 2), steps, 1.0)
        sigma, noise = torch.rand(batch), torch.randn(batch, 2)
        v_fake, fake_features = fake.features(flow.interpolate(x_g, noise, sigma), sigma, label)
        x_real = real_data[torch.randint(len(real_data), (batch,))]
        _, real_features = fake.features(flow.interpolate(x_real, noise, sigma), sigma, label)
        loss = (v_fake - (noise - x_g)).pow(2).mean()
        loss = loss + adversarial_weight * discriminator_loss([head(real_features)], [head(fake_features)])
        fake_optimizer.zero_grad()
        loss.backward()
        fake_optimizer.step()
        # generator: gradient through the steps from a random slot on
        slot = int(torch.randint(steps, ()))
        x_g = distill.few_step_sample(
            branch(generator, UNCONDITIONAL), torch.randn(batch, 2), steps, 1.0, slot
        )
        sigma, noise = torch.rand(batch), torch.randn(batch, 2)
        z = flow.interpolate(x_g, noise, sigma)
        v_fake, features = fake.features(z, sigma, label)
        sid, adversarial = distill.sida_generator_losses(
            x_g, z, sigma, teacher(z, sigma, label), v_fake, head(features), alpha
        )
        generator_optimizer.zero_grad()
        (sid + adversarial_weight * adversarial).backward()
        generator_optimizer.step()
    distilled = sliced_w2(toy_samples(branch(generator, UNCONDITIONAL), steps), reference)
    own = sliced_w2(toy_samples(branch(teacher, UNCONDITIONAL), steps), reference)
    print(f"SiDA: SW2 to the teacher's 128 steps, 8 steps: student {distilled:.4f}, teacher {own:.4f}")
    assert distilled < 0.85 * own

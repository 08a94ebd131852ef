import logging
import math

import pytest
import torch
import torch.nn.functional as F

from fsvideo.discriminator import DiscriminatorConfig, MultiscaleDiscriminator3D
from fsvideo.losses import (
    PerceptualLoss,
    VideoVFConfig,
    VideoVFLoss,
    discriminator_loss,
    downscale_regularization,
    generator_loss,
    pool_frame_features,
    r1_penalty,
    upscale_regularization,
    v_mcos_loss,
    v_mdms_loss,
)

# 1. GAN ---------------------------------------------------------------------------------------------


def test_gan_losses_match_formulas():
    real = [torch.tensor([[2.0, -1.0]]), torch.tensor([0.5])]
    fake = [torch.tensor([[-3.0, 0.0]]), torch.tensor([1.0])]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    g = ((sp(3.0) + sp(0.0)) / 2 + sp(-1.0)) / 2
    d = ((sp(-3.0) + sp(0.0)) / 2 + (sp(-2.0) + sp(1.0)) / 2 + sp(1.0) + sp(-0.5)) / 2
    assert generator_loss(fake).item() == pytest.approx(g, rel=1e-6)
    assert discriminator_loss(real, fake).item() == pytest.approx(d, rel=1e-6)
    # zero logits: log 2 for G, 2·log 2 for D
    zeros = [torch.zeros(2, 1, 1, 2, 2)]
    assert generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))


class _LinearCritic(torch.nn.Module):
    """D(x) = Σ w·x + b per sample: ∇_x D = w, so R1 = γ/2·‖w‖²."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return [(x * self.w).flatten(1).sum(1).view(-1, 1, 1, 1, 1), torch.zeros(x.shape[0], 1, 1, 1, 1)]


def test_r1_penalty_exact_for_linear_critic():
    torch.manual_seed(0)
    critic = _LinearCritic((3, 2, 4, 4))
    real = torch.randn(5, 3, 2, 4, 4)
    penalty = r1_penalty(critic, real, gamma=3.0)
    assert penalty.item() == pytest.approx(1.5 * critic.w.pow(2).sum().item(), rel=1e-5)
    penalty.backward()  # create_graph: the penalty trains D, d/dw (γ/2·‖w‖²) = γ·w
    torch.testing.assert_close(critic.w.grad, 3.0 * critic.w.detach())


def test_r1_penalty_on_multiscale_discriminator_reaches_parameters():
    torch.manual_seed(0)
    disc = MultiscaleDiscriminator3D(DiscriminatorConfig.tiny())
    real = torch.randn(2, 3, 5, 16, 16)
    penalty = r1_penalty(disc, real, gamma=1.0)
    assert penalty.item() > 0 and not real.requires_grad
    penalty.backward()
    # biases right before (piecewise-linear) outputs do not change ∇_x D, every weight does
    weights = [p for name, p in disc.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


# 2. Perceptual ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_alex() -> PerceptualLoss:
    torch.manual_seed(0)
    return PerceptualLoss(net="alex")


def test_perceptual_random_backbone_warns_and_is_frozen(caplog):
    with caplog.at_level(logging.WARNING, logger="fsvideo.losses"):
        loss = PerceptualLoss(net="alex")
    assert "RANDOM" in caplog.text
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.lpips.training and loss.training


def test_perceptual_slicing_matches_unsliced_value_and_gradient(lpips_alex):
    torch.manual_seed(1)
    target = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    x = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    lpips_alex.frames_per_slice = None
    full = lpips_alex(x, target)
    (grad_full,) = torch.autograd.grad(full, x)
    lpips_alex.frames_per_slice = 2
    sliced = lpips_alex(x, target)
    (grad_sliced,) = torch.autograd.grad(sliced, x)
    lpips_alex.frames_per_slice = None
    torch.testing.assert_close(sliced, full)
    torch.testing.assert_close(grad_sliced, grad_full)
    assert full.item() > 0 and grad_full.abs().sum() > 0
    # the mean over frames equals the mean of per-frame LPIPS of lpips itself
    per_frame = torch.stack([lpips_alex.lpips(x[:, :, i], target[:, :, i]).flatten() for i in range(5)])
    torch.testing.assert_close(full, per_frame.mean())


def test_perceptual_identical_is_zero_and_images_accepted(lpips_alex):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips_alex(x, x).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        lpips_alex(x, x[:1])


def test_perceptual_loads_local_backbone(tmp_path, lpips_alex):
    torch.manual_seed(2)
    # a torchvision-style alexnet state dict: features.N.* (+ a classifier head, ignored)
    state = {
        f"features.{name}.{param}": torch.randn_like(value)
        for block in lpips_alex.lpips.net.children()
        for name, layer in block.named_children()
        for param, value in layer.named_parameters()
    }
    state["classifier.1.weight"] = torch.randn(4, 4)
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    loss = PerceptualLoss(net="alex", backbone_path=path)
    conv0 = loss.lpips.net.slice1[0]
    torch.testing.assert_close(conv0.weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(loss.lpips.net.slice5, "10").bias, state["features.10.bias"])
    del state["features.3.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not match"):
        PerceptualLoss(net="alex", backbone_path=path)
    with pytest.raises(ValueError, match="does not exist"):
        PerceptualLoss(net="alex", backbone_path=tmp_path / "missing.pth")


# 3. Video VF loss -------------------------------------------------------------------------------


def _slow_mcos(z, f, m1):
    b, _, t, h, w = z.shape
    total = 0.0
    for n in range(b):
        for i in range(t):
            for j in range(h):
                for k in range(w):
                    a, c = z[n, :, i, j, k], f[n, :, i, j, k]
                    total += max(0.0, 1 - m1 - float(a @ c / (a.norm() * c.norm())))
    return total / (b * t * h * w)


def _slow_mdms(z, f, m2):
    b = z.shape[0]
    zt, ft = z.flatten(2), f.flatten(2)  # (B, c, N)
    n = zt.shape[2]
    total = 0.0
    for s in range(b):
        for p in range(n):
            for q in range(n):
                cz = zt[s, :, p] @ zt[s, :, q] / (zt[s, :, p].norm() * zt[s, :, q].norm())
                cf = ft[s, :, p] @ ft[s, :, q] / (ft[s, :, p].norm() * ft[s, :, q].norm())
                total += max(0.0, abs(float(cz - cf)) - m2)
    return total / (b * n * n)


def test_vf_losses_match_slow_equations():
    torch.manual_seed(0)
    z, f = torch.randn(2, 6, 2, 3, 3, dtype=torch.float64), torch.randn(2, 6, 2, 3, 3, dtype=torch.float64)
    f = f + 0.8 * z  # correlated, so both margins are partly active
    assert v_mcos_loss(z, f, 0.5).item() == pytest.approx(_slow_mcos(z, f, 0.5), rel=1e-9)
    assert v_mdms_loss(z, f, 0.25).item() == pytest.approx(_slow_mdms(z, f, 0.25), rel=1e-9)
    assert 0 < v_mcos_loss(z, f, 0.5).item() < v_mcos_loss(z, f, 0.0).item()
    assert 0 < v_mdms_loss(z, f, 0.25).item() < v_mdms_loss(z, f, 0.0).item()


def test_mdms_chunked_equals_dense_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 3, 4, 5, requires_grad=True)  # N = 60 tokens
    f = torch.randn(2, 8, 3, 4, 5)
    dense = v_mdms_loss(z, f, 0.25, chunk_size=1000)
    (g_dense,) = torch.autograd.grad(dense, z)
    chunked = v_mdms_loss(z, f, 0.25, chunk_size=7)
    (g_chunked,) = torch.autograd.grad(chunked, z)
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(g_chunked, g_dense)


def test_mdms_token_sampling_is_unbiased():
    torch.manual_seed(0)
    z, f = torch.randn(1, 8, 1, 5, 8), torch.randn(1, 8, 1, 5, 8)  # N = 40
    exact = v_mdms_loss(z, f, 0.25).item()
    assert v_mdms_loss(z, f, 0.25, max_tokens=40).item() == pytest.approx(exact)
    gen = torch.Generator().manual_seed(0)
    draws = [v_mdms_loss(z, f, 0.25, max_tokens=12, generator=gen).item() for _ in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(exact, rel=0.02)
    assert min(draws) != max(draws)


def test_margins_clip_as_relu_says():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 2, 3, 3)
    assert v_mcos_loss(f, f, 0.5).item() == 0.0
    assert v_mdms_loss(f, f, 0.25).item() == 0.0
    # cosine ≈ 0.8 > 1 - m1 = 0.5 everywhere: the cosine term is clipped to 0, not with m1 = 0
    z = f + 0.6 * f.norm(dim=1, keepdim=True) / 4 * torch.randn_like(f)
    cos = F.cosine_similarity(z, f, dim=1)
    assert cos.min() > 0.5
    assert v_mcos_loss(z, f, 0.5).item() == 0.0
    assert v_mcos_loss(z, f, 0.0).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    # every pairwise-similarity gap below m2: the distance-matrix term is 0
    gap = (
        F.normalize(z.flatten(2), dim=1).transpose(1, 2) @ F.normalize(z.flatten(2), dim=1)
        - F.normalize(f.flatten(2), dim=1).transpose(1, 2) @ F.normalize(f.flatten(2), dim=1)
    ).abs()
    assert v_mdms_loss(z, f, gap.max().item() + 1e-4).item() == 0.0
    assert v_mdms_loss(z, f, 0.0).item() == pytest.approx(gap.mean().item(), rel=1e-5)


def test_pool_frame_features_keeps_first_frame():
    f = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 3, 9, 2, 2)
    pooled = pool_frame_features(f, 4)
    assert pooled.shape == (2, 3, 3, 2, 2)
    assert pooled[0, 0, :, 0, 0].tolist() == [0.0, 2.5, 6.5]
    with pytest.raises(ValueError, match="1 \\+ 4·k"):
        pool_frame_features(f[:, :, :8], 4)


def test_video_vf_loss_aligns_and_trains_projection():
    torch.manual_seed(0)
    cfg = VideoVFConfig.tiny()
    vf = VideoVFLoss(cfg)
    latent = torch.randn(2, 8, 3, 2, 2, requires_grad=True)
    features = torch.randn(2, 16, 9, 5, 7)
    z, f = vf.align(latent, features)
    assert z.shape == f.shape == (2, 16, 3, 5, 7)
    # the paper's order (project, then resize frame by frame) done by hand
    projected = torch.einsum("bcthw,dc->bdthw", latent, vf.proj.weight) + vf.proj.bias.view(1, -1, 1, 1, 1)
    frames = projected.transpose(1, 2).reshape(6, 16, 2, 2)
    manual = F.interpolate(frames, size=(5, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(z, manual.view(2, 3, 16, 5, 7).transpose(1, 2))
    out = vf(latent, features)
    assert out.loss.item() == pytest.approx(0.5 * (out.mcos.item() + out.mdms.item()))
    assert out.mcos.item() == pytest.approx(v_mcos_loss(z, f, 0.5).item())
    assert out.mdms.item() == pytest.approx(v_mdms_loss(z, f, 0.25).item())
    out.loss.backward()
    assert latent.grad.abs().sum() > 0 and vf.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="disagree in batch or time"):
        vf(latent, features[:, :, :5])


# 4. Scale-equivariance baselines ---------------------------------------------------------------


def _upsample2(z):
    """A 'decoder' with 2× spatial compression: nearest upsampling of a 3-channel latent."""
    b, c, t, h, w = z.shape
    frames = z.transpose(1, 2).reshape(b * t, c, h, w)
    return F.interpolate(frames, scale_factor=2, mode="nearest").view(b, t, c, 2 * h, 2 * w).transpose(1, 2)


def test_scale_regularization_zero_for_equivariant_decoder():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 5, 16, 16)
    identity = lambda z: z  # noqa: E731  (a 1× "autoencoder" is trivially scale-equivariant)
    assert downscale_regularization(identity, video, video, 0.5).item() == 0.0
    assert upscale_regularization(identity, video, video, 2.0).item() == 0.0
    shifted = lambda z: z + 1.0  # noqa: E731
    assert downscale_regularization(shifted, video, video, 0.25).item() == pytest.approx(1.0)


def test_scale_regularization_computes_definition():
    torch.manual_seed(0)
    latent = torch.randn(2, 3, 3, 8, 8, requires_grad=True)
    video = torch.randn(2, 3, 3, 16, 16)

    def resize(x, size):
        b, c, t, h, w = x.shape
        y = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), size=size, mode="bilinear")
        return y.view(b, t, c, *size).transpose(1, 2)

    down = downscale_regularization(_upsample2, latent, video, 0.5)
    expected_down = (_upsample2(resize(latent, (4, 4))) - resize(video, (8, 8))).abs().mean()
    torch.testing.assert_close(down, expected_down)
    up = upscale_regularization(_upsample2, latent, video, 1.5)
    expected_up = (_upsample2(resize(latent, (12, 12))) - resize(video, (24, 24))).abs().mean()
    torch.testing.assert_close(up, expected_up)
    down.backward()
    assert latent.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="\\(0, 1\\)"):
        downscale_regularization(_upsample2, latent, video, 2.0)
    with pytest.raises(ValueError, match="> 1"):
        upscale_regularization(_upsample2, latent, video, 0.5)

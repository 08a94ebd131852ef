"""DiT structure: shapes, input checks, presets, meta-device build."""

from __future__ import annotations

import pytest
import torch

from fsvideo import flow
from fsvideo.dit import DiT, DiTConfig, build_i2v_condition


@pytest.mark.parametrize("patch_size", [(1, 1, 1), (1, 2, 2)])
def test_output_shape_and_text_mask(inputs, randomize, patch_size):
    latent_in, sigma, text, image = inputs
    model = randomize(DiT(DiTConfig.tiny(patch_size=patch_size)))
    out = model(latent_in, sigma, text, image)
    assert out.shape == (2, 8, 3, 4, 4) and torch.isfinite(out).all()
    # masking the padded text tokens changes the result; masking nothing does not
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    with torch.no_grad():
        masked = model(latent_in, sigma, text, image, text_mask=mask)
        unmasked = model(latent_in, sigma, text, image, text_mask=torch.ones(2, 6, dtype=torch.bool))
    torch.testing.assert_close(unmasked, out.detach())
    torch.testing.assert_close(masked[0], out[0].detach())
    assert not torch.allclose(masked[1], out[1].detach())


def test_zero_initialised_head_predicts_zero(inputs):
    out = DiT(DiTConfig.tiny())(*inputs)
    assert torch.count_nonzero(out) == 0


def test_timestep_changes_the_prediction(inputs, randomize):
    latent_in, _, text, image = inputs
    model = randomize(DiT(DiTConfig.tiny()))
    with torch.no_grad():
        low = model(latent_in, torch.tensor([0.1, 0.1]), text, image)
        high = model(latent_in, torch.tensor([0.9, 0.9]), text, image)
    assert (low - high).abs().max() > 1e-3


def test_without_image_branch(inputs):
    latent_in, sigma, text, image = inputs
    model = DiT(DiTConfig.tiny(image_dim=None))
    assert not any("img" in name or "image" in name for name, _ in model.named_parameters())
    assert model(latent_in, sigma, text).shape == (2, 8, 3, 4, 4)
    with pytest.raises(ValueError, match="no image branch"):
        model(latent_in, sigma, text, image)


def test_input_errors(inputs):
    latent_in, sigma, text, image = inputs
    model = DiT(DiTConfig.tiny(patch_size=(1, 2, 2)))
    with pytest.raises(ValueError, match="noise 8 \\+ mask 4 \\+ condition 8"):
        model(latent_in[:, :-1], sigma, text, image)
    with pytest.raises(ValueError, match="divisible by patch"):
        model(latent_in[..., :3], sigma, text, image)
    with pytest.raises(ValueError, match="sigma must have shape"):
        model(latent_in, sigma[:1], text, image)
    with pytest.raises(ValueError, match="image_tokens must be"):
        model(latent_in, sigma, text, None)
    with pytest.raises(ValueError, match="text_tokens must be"):
        model(latent_in, sigma, text[..., :-1], image)


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig.tiny(num_heads=5)
    with pytest.raises(ValueError, match="3D RoPE"):
        DiTConfig.tiny(dim=16, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig.tiny(patch_size=(1, 2))
    assert DiTConfig.paper().in_channels == 2 * 128 + 4
    assert DiTConfig.wan_i2v_14b().in_channels == 36


def test_meta_build_then_materialise(inputs):
    config = DiTConfig.tiny()
    with torch.device("meta"):
        model = DiT(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    reference = DiT(config)
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert param.shape == ref.shape and torch.isfinite(param).all(), name
    for router, ref in zip(model.routers, reference.routers):
        torch.testing.assert_close(router.proj.bias, ref.proj.bias)
        assert router.proj.bias[-1] == config.router_init_margin and router.gate == 0
    assert model(*inputs).shape == (2, 8, 3, 4, 4)


def test_paper_preset_parameter_count():
    counts = {}
    for layer_memory in (False, True):
        with torch.device("meta"):
            model = DiT(DiTConfig.paper(layer_memory=layer_memory))
        counts[layer_memory] = sum(p.numel() for p in model.parameters())
        routers = sum(p.numel() for r in model.routers for p in r.parameters())
    print(
        f"paper DiT: {counts[False] / 1e9:.3f} B parameters without Layer Memory, "
        f"{counts[True] / 1e9:.3f} B with ({routers:,} router parameters, "
        f"{100 * routers / counts[False]:.4f} %)"
    )
    assert counts[True] - counts[False] == routers == sum(n * 5120 + n + 1 for n in range(2, 41))
    assert routers < 0.01 * counts[False]
    assert 15e9 < counts[False] < 18e9  # Wan2.1-I2V-14B's block widths (≈16.4 B with the image branch)


def test_sampling_through_the_dit_with_guidance(randomize):
    config = DiTConfig.tiny()
    model = randomize(DiT(config)).eval()
    first_frame = torch.randn(1, config.latent_channels, 1, 2, 3)
    condition = build_i2v_condition(first_frame, num_latent_frames=3)
    text, image = torch.randn(1, 6, config.text_dim), torch.randn(1, 5, config.image_dim)

    def velocity(text_tokens):
        return lambda z, sigma: model(torch.cat([z, condition], dim=1), sigma, text_tokens, image)

    guided = flow.classifier_free_guidance(velocity(text), velocity(torch.zeros_like(text)), scale=5.0)
    noise = torch.randn(1, config.latent_channels, 3, 2, 3)
    with torch.no_grad():
        out = flow.sample(guided, noise, steps=3, shift=3.0, sampler="unipc")
    assert out.shape == noise.shape and torch.isfinite(out).all() and not torch.allclose(out, noise)

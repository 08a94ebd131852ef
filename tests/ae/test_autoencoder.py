import pytest
import torch

from fsvideo.ae import FSAE, NUM_FIRST_FRAME_FEATURES, FSAEConfig


def test_config_presets_compress_64x_space_4x_time():
    for config in (FSAEConfig.tiny(), FSAEConfig.paper()):
        assert config.spatial_compression == 64
        assert config.temporal_compression == 4
    assert FSAEConfig.paper().latent_channels == 128
    assert FSAEConfig.paper().widths[:6] == (128, 256, 512, 512, 1024, 1024)
    assert FSAEConfig.tiny(latent_channels=8).latent_channels == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"encoder_depths": (1, 1)}, "one entry per stage"),
        ({"widths": (8, 16, 32, 32, 64, 64, 60)}, "divisible by attention_head_dim"),
        ({"latent_channels": 48}, "multiple of latent_channels"),
        ({"time_resample_stages": 7}, "time_resample_stages"),
    ],
)
def test_config_rejects_inconsistent_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        FSAEConfig.tiny(**overrides)


def test_video_and_image_shapes(tiny_model, random_video):
    with torch.no_grad():
        video = random_video(17, 128, batch=3)
        latent = tiny_model.encode(video)
        assert latent.shape == (3, 16, 5, 2, 2)
        assert tiny_model.decode(latent).shape == video.shape
        image = random_video(1, 64, batch=1)
        image_latent = tiny_model.encode(image)
        assert image_latent.shape == (1, 16, 1, 1, 1)
        assert tiny_model(image).shape == image.shape


def test_first_frame_features_are_those_of_the_image_alone(tiny_model, random_video):
    video = random_video(9, 128)
    with torch.no_grad():
        latent, features = tiny_model.encode(video, return_first_frame_features=True)
        image_latent, image_features = tiny_model.encode(video[:, :, :1], return_first_frame_features=True)
    config = tiny_model.config
    assert len(features) == NUM_FIRST_FRAME_FEATURES
    for stage, feature, image_feature in zip(tiny_model.feature_stages, features, image_features):
        side = 128 // 2**stage
        assert feature.shape == (2, config.widths[stage], 1, side, side)
        torch.testing.assert_close(feature, image_feature, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latent[:, :, :1], image_latent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 16, 64, 64), "1 \\+ 4·k"),
        ((1, 3, 5, 96, 64), "multiples of 64"),
        ((1, 4, 5, 64, 64), "3 \\(RGB\\) channels"),
        ((1, 3, 64, 64), "image.unsqueeze\\(2\\)"),
    ],
)
def test_encode_rejects_bad_shapes(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(torch.zeros(shape))


def test_encode_rejects_values_outside_range(tiny_model):
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        tiny_model.encode(torch.full((1, 3, 1, 64, 64), 255.0))
    tiny_model.encode(torch.full((1, 3, 1, 64, 64), 1.005))  # within tolerance


def test_decode_rejects_wrong_latent_channels(tiny_model):
    with pytest.raises(ValueError, match="B×16×t×h×w"):
        tiny_model.decode(torch.zeros(1, 8, 2, 1, 1))


def test_encoder_and_decoder_are_causal(tiny_model, random_video):
    video = random_video(17, 64)
    changed = video.clone()
    changed[:, :, 5] = -changed[:, :, 5]  # frame 5 belongs to latent frame 2 (frames 5..8)
    with torch.no_grad():
        latent, latent_changed = tiny_model.encode(video), tiny_model.encode(changed)
        torch.testing.assert_close(latent[:, :, :2], latent_changed[:, :, :2], atol=1e-6, rtol=0)
        assert (latent[:, :, 2] - latent_changed[:, :, 2]).abs().max() > 1e-3
        decoded, decoded_changed = tiny_model.decode(latent), tiny_model.decode(latent_changed)
    torch.testing.assert_close(decoded[:, :, :5], decoded_changed[:, :, :5], atol=1e-6, rtol=0)
    assert (decoded[:, :, 5] - decoded_changed[:, :, 5]).abs().max() > 1e-3


def test_paper_preset_builds_on_meta_device():
    with torch.device("meta"):
        model = FSAE(FSAEConfig.paper())
    n = sum(p.numel() for p in model.parameters())
    print(f"FSAE paper preset: {n / 1e6:.1f}M params")
    assert all(p.is_meta for p in model.parameters())
    assert 500e6 < n < 1500e6


def test_meta_model_materialises_with_init_weights():
    with torch.device("meta"):
        model = FSAE(FSAEConfig.tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    norm = model.decoder.norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, 5, 64, 64))).all()


def test_tiny_forward_backward_and_gradient_checkpointing(random_video):
    torch.manual_seed(0)
    model = FSAE(FSAEConfig.tiny()).train()
    video = random_video(5, 64)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss = (model(video) - video).abs().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert sum(int(g.abs().sum() > 0) for g in plain.values()) > 0.9 * len(plain)
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)

import pytest
import torch

from fsvideo.discriminator import DiscriminatorConfig, MultiscaleDiscriminator3D


@pytest.fixture(scope="module")
def disc() -> MultiscaleDiscriminator3D:
    torch.manual_seed(0)
    return MultiscaleDiscriminator3D(DiscriminatorConfig.tiny())


def test_logit_shapes_video_and_image(disc):
    # tiny: 2 scales, 2 stride-2 layers (the first also strides time), then stride-1 convs
    logits = disc(torch.randn(2, 3, 9, 32, 48))
    assert [tuple(x.shape) for x in logits] == [(2, 1, 5, 8, 12), (2, 1, 5, 4, 6)]
    image_logits = disc(torch.randn(2, 3, 1, 32, 32))
    assert [tuple(x.shape) for x in image_logits] == [(2, 1, 1, 8, 8), (2, 1, 1, 4, 4)]


def test_image_batch_equals_single_frame_video(disc):
    image = torch.randn(2, 3, 32, 32)
    for a, b in zip(disc(image), disc(image.unsqueeze(2))):
        torch.testing.assert_close(a, b)


def test_samples_do_not_interact(disc):
    # no batch statistics: sample 0's logits must not depend on sample 1 (R1 needs this)
    x = torch.randn(2, 3, 5, 32, 32)
    y = x.clone()
    y[1] = torch.randn(3, 5, 32, 32)
    for a, b in zip(disc(x), disc(y)):
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[1], b[1])
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())


def test_second_scale_sees_pooled_input(disc):
    x = torch.randn(1, 3, 5, 32, 32)
    pooled = torch.nn.functional.avg_pool3d(x, (1, 2, 2))
    torch.testing.assert_close(disc(x)[1], disc.scales[1](pooled))


def test_rejects_too_small_input_and_bad_config(disc):
    with pytest.raises(ValueError, match="H and W must be >= 8"):
        disc(torch.randn(1, 3, 1, 4, 32))
    with pytest.raises(ValueError, match="B×3×T×H×W"):
        disc(torch.randn(1, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="GroupNorm"):
        DiscriminatorConfig(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="temporal_downsample_layers"):
        DiscriminatorConfig(num_layers=2, temporal_downsample_layers=3)


def test_paper_preset_builds_on_meta_device():
    with torch.device("meta"):
        model = MultiscaleDiscriminator3D(DiscriminatorConfig.paper())
    assert len(model.scales) == 3
    assert DiscriminatorConfig.paper().widths() == [64, 128, 256, 512]
    # per scale: 3·64·48+64 + 64·128·48+128 + 128·256·48+256 + 256·512·27+512 + 512·27+1 (plus GroupNorm)
    n_params = sum(p.numel() for p in model.parameters())
    convs = (
        3 * 64 * 48 + 64 + 64 * 128 * 48 + 128 + 128 * 256 * 48 + 256 + 256 * 512 * 27 + 512 + 512 * 27 + 1
    )
    norms = 2 * (128 + 256 + 512)
    assert n_params == 3 * (convs + norms)

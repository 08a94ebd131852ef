"""The latent upsampler network (§2.4.1): shapes, layout, initialisation, saved-model round trip, meta build."""

from __future__ import annotations

import pytest
import torch

from fsvideo.parallel import ParallelConfig, parallelize
from fsvideo.pretrained import load_network
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig, interpolate_latent


def tiny_upsampler(seed: int = 0, **overrides) -> LatentUpsampler:
    """A tiny upsampler with every weight moved off its init (``proj_out`` starts at zero)."""
    torch.manual_seed(seed)
    network = LatentUpsampler(LatentUpsamplerConfig.tiny(**overrides))
    network.init_weights()
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return network


def test_doubles_space_and_keeps_time():
    network = tiny_upsampler()
    latent = torch.randn(2, 16, 3, 2, 3)  # B×C×t×h×w
    assert network(latent).shape == (2, 16, 3, 4, 6)


def test_pixel_shuffle_comes_before_the_residual_blocks():
    network = tiny_upsampler()
    seen = []
    for block in network.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    network(torch.randn(1, 16, 2, 3, 5))
    width = network.config.width
    assert seen == [(1, width, 2, 6, 10)] * network.config.num_blocks  # every block works at 2h×2w


def test_fresh_network_is_latent_trilinear_interpolation():
    network = LatentUpsampler(LatentUpsamplerConfig.tiny())
    network.init_weights()
    latent = torch.randn(1, 16, 2, 2, 2)
    torch.testing.assert_close(network(latent), interpolate_latent(latent))
    without = LatentUpsampler(LatentUpsamplerConfig.tiny(interpolation_shortcut=False))
    without.init_weights()
    assert without.proj_out.weight.abs().sum() > 0


def test_temporal_kernel_size_sets_the_blocks_time_extent():
    assert tiny_upsampler().blocks[0].conv1.weight.shape[2:] == (3, 3, 3)
    assert tiny_upsampler(temporal_kernel_size=1).blocks[0].conv1.weight.shape[2:] == (1, 3, 3)
    assert tiny_upsampler().proj_in.weight.dim() == 4  # the projection before the shuffle is per frame


def test_save_load_round_trip_is_bit_identical(tmp_path):
    network = tiny_upsampler(norm_groups=2)
    folder = network.save_pretrained(tmp_path / "upsampler")
    loaded = LatentUpsampler.from_pretrained(folder)
    assert loaded.config == network.config
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    latent = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(loaded(latent), network.eval()(latent))
    assert isinstance(load_network(folder), LatentUpsampler)  # found by class name, like every network


def test_meta_build_then_materialise():
    with torch.device("meta"):
        network = LatentUpsampler(LatentUpsamplerConfig.paper())
    assert all(p.is_meta for p in network.parameters())
    assert sum(p.numel() for p in network.parameters()) > 50_000_000  # 16 blocks of two 3×3×3 convs at 512
    with torch.device("meta"):
        tiny = LatentUpsampler(LatentUpsamplerConfig.tiny())
    tiny.to_empty(device="cpu")
    tiny.init_weights()
    assert torch.isfinite(tiny(torch.randn(1, 16, 1, 1, 1))).all()


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="norm_groups"):
        LatentUpsamplerConfig.tiny(norm_groups=5)
    with pytest.raises(ValueError, match="odd"):
        LatentUpsamplerConfig.tiny(temporal_kernel_size=2)
    network = tiny_upsampler()
    with pytest.raises(ValueError, match="raw FSAE latent"):
        network(torch.randn(1, 8, 1, 2, 2))
    with pytest.raises(ValueError, match="unsqueeze"):
        network(torch.randn(1, 16, 2, 2))


def test_activation_checkpointing_from_outside_gives_the_same_gradients():
    latent = torch.randn(1, 16, 2, 2, 2)
    grads = []
    for checkpointing in (False, True):
        network = tiny_upsampler()
        parallelize([network], [], ParallelConfig(activation_checkpointing=checkpointing))
        network(latent).square().sum().backward()
        grads.append(network.blocks[0].conv1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])

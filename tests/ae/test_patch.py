import pytest
import torch

from fsvideo.ae import FSAE, Box, FSAEConfig
from fsvideo.ae.patch import tail_margins


@pytest.fixture(scope="module")
def latent_and_full(tiny_model):
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 13, 128, 128, generator=generator) * 2 - 1
    with torch.no_grad():
        latent = tiny_model.encode(video)
        return latent, tiny_model.decode(latent)


def test_tail_margins_count_spoilt_frames_and_pixels():
    # tiny: one ResBlock per stage; per stage: upsample (×2 then +kt-1 / +1), two convs; then conv_out.
    assert tail_margins(FSAEConfig.tiny(), 1) == (2 + 4 + 2, 1 + 2 + 1)
    assert tail_margins(FSAEConfig.tiny(), 3) == (44, 22)
    # paper: three ResBlocks per stage, so a patch carries up to 100 frames (25 latent frames) of history
    assert tail_margins(FSAEConfig.paper(), 3) == (100, 50)


def test_spatial_patch_matches_full_decode_inside_valid_region(tiny_model, latent_and_full):
    latent, full = latent_and_full
    with torch.no_grad():
        out = tiny_model.decode_patch(latent, patch_size=(4, 10, 10), origin=(0, 3, 4))
    assert out.region == Box(0, 13, 24, 104, 32, 112)
    assert out.video.shape == (2, 3, *out.region.shape)
    assert out.valid == Box(0, 13, 24 + 22, 104 - 22, 32 + 22, 112 - 22)
    torch.testing.assert_close(out.valid_video(), full[out.valid.index()], atol=1e-5, rtol=1e-5)
    # outside the valid region the zero padding of the crop shows
    assert (out.video - full[out.region.index()]).abs().max() > 1e-3


@pytest.mark.parametrize("t0", [2, 5])  # 5: the history the crop carries starts after frame 0
def test_space_time_patch_from_mid_video_is_exact_and_tight(tiny_model, latent_and_full, t0):
    latent, full = latent_and_full
    with torch.no_grad():
        out = tiny_model.decode_patch(latent, patch_size=(2, 40, 40), origin=(t0, 10, 12), tail_stages=1)
    _, bad_pixels = tail_margins(tiny_model.config, 1)
    # tail_stages=1: the crop is in stage-1 features (H/2, 2 frames per frame after the first)
    t_start, t_end = 2 * (t0 - 1) + 1, 2 * (t0 + 1) + 1
    assert out.region == Box(t_start, t_end, 20, 100, 24, 104)
    assert out.valid == Box(
        t_start, t_end, 20 + bad_pixels, 100 - bad_pixels, 24 + bad_pixels, 104 - bad_pixels
    )
    torch.testing.assert_close(out.valid_video(), full[out.valid.index()], atol=1e-5, rtol=1e-5)
    # the spatial margins are tight: one pixel outside the valid box already differs
    diff = (out.video - full[out.region.index()]).abs().amax(dim=(0, 1, 2))
    v = out.valid.relative_to(out.region)
    assert diff[v.y0 - 1, v.x0 : v.x1].max() > 1e-4
    assert diff[v.y1, v.x0 : v.x1].max() > 1e-4
    assert diff[v.y0 : v.y1, v.x1].max() > 1e-4


def test_random_patch_origin_follows_the_generator(tiny_model, latent_and_full):
    latent, full = latent_and_full
    with torch.no_grad():
        first = tiny_model.decode_patch(latent, (2, 12, 12), generator=torch.Generator().manual_seed(3))
        again = tiny_model.decode_patch(latent, (2, 12, 12), generator=torch.Generator().manual_seed(3))
    assert first.region == again.region
    assert first.region.shape == ((1 if first.region.t0 == 0 else 4) + 4, 96, 96)
    assert first.valid.shape[0] == first.region.shape[0] and not first.valid.is_empty
    torch.testing.assert_close(first.valid_video(), full[first.valid.index()], atol=1e-5, rtol=1e-5)


def test_patch_decoding_refuses_attention_tail_and_oversized_patch(tiny_model, latent_and_full):
    latent, _ = latent_and_full
    with pytest.raises(ValueError, match="include attention"):
        tiny_model.decode_patch(latent, (1, 1, 1), tail_stages=4)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_model.decode_patch(latent, (7, 4, 4))


def test_patch_decoding_trains_through_the_tail(random_video):
    torch.manual_seed(0)
    model = FSAE(FSAEConfig.tiny()).train()
    model.enable_gradient_checkpointing()
    latent = model.encode(random_video(5, 64))
    out = model.decode_patch(latent, (2, 6, 6), origin=(0, 1, 1))
    assert out.valid.shape == (5, 4, 4)
    out.valid_video().square().mean().backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0

import pytest
import torch
import torch.nn.functional as F

from fsvideo.ae import TilingConfig, decode_chunked, encode_chunked
from fsvideo.ae.tiling import run_tiled


@pytest.fixture(scope="module")
def one_shot(tiny_model):
    video = torch.rand(2, 3, 21, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = tiny_model.encode(video)
        return video, latent, tiny_model.decode(latent)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_temporal_splitting_matches_one_shot(tiny_model, one_shot, chunk):
    video, latent, decoded = one_shot
    with torch.no_grad():
        chunked_latent = encode_chunked(tiny_model.encoder, video, chunk)
        chunked_video = decode_chunked(tiny_model.decoder, latent, chunk)
    assert chunked_latent.shape == latent.shape == (2, 16, 6, 1, 1)
    torch.testing.assert_close(chunked_latent, latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_video, decoded, atol=1e-5, rtol=1e-5)


def test_tiling_config_through_the_model_api(tiny_model, random_video):
    video = random_video(9, 64)
    tiling = TilingConfig(chunk_latent_frames=1)
    with torch.no_grad():
        latent = tiny_model.encode(video)
        tiled_latent, features = tiny_model.encode(video, return_first_frame_features=True, tiling=tiling)
        _, one_shot_features = tiny_model.encode(video, return_first_frame_features=True)
        torch.testing.assert_close(tiled_latent, latent, atol=1e-5, rtol=1e-5)
        for feature, expected in zip(features, one_shot_features):
            torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            tiny_model.decode(latent, tiling), tiny_model.decode(latent), atol=1e-5, rtol=1e-5
        )


def _nearest_decoder(latent: torch.Tensor, starts_at_first_frame: bool) -> torch.Tensor:
    """A stand-in decoder with no context: every latent pixel becomes a 64×64×4 block (first frame ×1)."""
    video = F.interpolate(latent[:, :3], scale_factor=(4, 64, 64), mode="nearest")
    return video[:, :, 3:] if starts_at_first_frame else video


def test_tiles_of_a_context_free_map_blend_back_exactly():
    latent = torch.randn(1, 3, 5, 3, 4)
    full = _nearest_decoder(latent, True)
    tiling = TilingConfig(tile_latent_size=(2, 2, 2), tile_latent_overlap=(1, 1, 1))
    tiled = run_tiled(_nearest_decoder, latent, (5, 3, 4), tiling, 4, 64, encoding=False)
    assert tiled.shape == full.shape == (1, 3, 17, 192, 256)
    torch.testing.assert_close(tiled, full, atol=1e-6, rtol=1e-6)

    def nearest_encoder(video: torch.Tensor, starts_at_first_frame: bool) -> torch.Tensor:
        frames = (
            video if not starts_at_first_frame else torch.cat([video[:, :, :1]] * 4 + [video[:, :, 1:]], 2)
        )
        return frames[:, :, ::4, ::64, ::64]

    encoded = run_tiled(nearest_encoder, full, (5, 3, 4), tiling, 4, 64, encoding=True)
    torch.testing.assert_close(encoded, latent, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tiles, overlap, size", [((2, 0, 0), (1, 0, 0), 64), ((0, 1, 1), (0, 0, 0), 128)])
def test_temporal_splitting_inside_tiles_is_exact(tiny_model, random_video, tiles, overlap, size):
    video = random_video(9, size)
    with torch.no_grad():
        latent = tiny_model.encode(video)
        tiled = TilingConfig(tile_latent_size=tiles, tile_latent_overlap=overlap)
        chunked = TilingConfig(chunk_latent_frames=1, tile_latent_size=tiles, tile_latent_overlap=overlap)
        decoded_tiled = tiny_model.decode(latent, tiled)
        torch.testing.assert_close(tiny_model.decode(latent, chunked), decoded_tiled, atol=1e-5, rtol=1e-5)
        encoded_tiled = tiny_model.encode(video, tiling=tiled)
        torch.testing.assert_close(
            tiny_model.encode(video, tiling=chunked), encoded_tiled, atol=1e-5, rtol=1e-5
        )


def test_spatial_tiling_stays_within_tolerance_of_one_shot(tiny_model, random_video):
    """Tiles see neither their neighbours' pixels nor the whole frame in attention, so tiling is not
    exact. Stated tolerance: relative L2 error below 0.5 for the random-weight tiny model with
    2×2-latent tiles overlapping by 1 (measured ≈ 0.3-0.36), far from the ≈ 1.4 of misplaced tiles."""
    video = random_video(5, 192)
    tiling = TilingConfig(tile_latent_size=(0, 2, 2), tile_latent_overlap=(0, 1, 1))
    with torch.no_grad():
        latent = tiny_model.encode(video)
        decoded = tiny_model.decode(latent)
        tiled_video = tiny_model.decode(latent, tiling)
        tiled_latent = tiny_model.encode(video, tiling=tiling)
    assert tiled_video.shape == decoded.shape and tiled_latent.shape == latent.shape
    assert (tiled_video - decoded).norm() / decoded.norm() < 0.5
    assert (tiled_latent - latent).norm() / latent.norm() < 0.5


def test_tiling_config_rejects_overlap_not_smaller_than_tile():
    with pytest.raises(ValueError, match="smaller than their tile"):
        TilingConfig(tile_latent_size=(0, 2, 2), tile_latent_overlap=(0, 2, 2))

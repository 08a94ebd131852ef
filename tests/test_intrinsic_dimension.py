import numpy as np
import pytest
import torch
from dadapy import Data

from fsvideo.intrinsic_dimension import PAPER_SCALES, gride_id, latents_to_points


def _linear_manifold(n=2000, dim=3, ambient=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)) @ rng.standard_normal((dim, ambient))


def test_gride_recovers_dimension_of_linear_manifold():
    points = _linear_manifold()
    ids = gride_id(points)
    assert list(ids) == list(PAPER_SCALES)
    # a 3-D Gaussian cloud in R^50: every scale within ±0.5 of 3 (measured 2.92–3.05)
    assert all(abs(d - 3.0) < 0.5 for d in ids.values()), ids
    direct = Data(points, verbose=False).return_id_scaling_gride(range_max=64)[0]
    assert list(ids.values()) == pytest.approx(list(direct), rel=1e-12)


def test_gride_subset_of_scales_tensor_input_and_duplicates():
    points = _linear_manifold(n=500, dim=2, ambient=10, seed=1)
    full = gride_id(points, scales=(2, 4, 8, 16))
    assert gride_id(torch.from_numpy(points), scales=(16, 4)) == {4: full[4], 16: full[16]}
    # duplicated points carry no distance information and are dropped
    assert gride_id(np.concatenate([points, points[:50]]), scales=(2, 4, 8, 16)) == pytest.approx(full)
    with pytest.raises(ValueError, match="powers of two"):
        gride_id(points, scales=(2, 6))
    with pytest.raises(ValueError, match="cannot resolve 64 neighbours"):
        gride_id(points[:64])


def test_latents_to_points_modes_and_subsampling():
    latents = torch.randn(2, 4, 3, 5, 6)
    tokens = latents_to_points(latents, "token")
    assert tokens.shape == (2 * 3 * 5 * 6, 4) and tokens.dtype == np.float64
    # row order is (b, t, h, w): row 1·90 + 2·30 + 3·6 + 4 is the channel vector at (1, 2, 3, 4)
    np.testing.assert_allclose(tokens[90 + 60 + 18 + 4], latents[1, :, 2, 3, 4].double().numpy())
    whole = latents_to_points(latents, "latent")
    assert whole.shape == (2, 4 * 3 * 5 * 6)
    np.testing.assert_allclose(whole[1], latents[1].flatten().double().numpy())
    sub = latents_to_points(latents, "token", max_points=50, seed=3)
    assert sub.shape == (50, 4)
    np.testing.assert_array_equal(sub, latents_to_points(latents, "token", max_points=50, seed=3))
    assert not np.array_equal(sub, latents_to_points(latents, "token", max_points=50, seed=4))
    assert {tuple(r) for r in sub} <= {tuple(r) for r in tokens}
    with pytest.raises(ValueError, match="'token' or 'latent'"):
        latents_to_points(latents, "pixel")


def test_token_points_of_low_rank_latents():
    # latent channel vectors confined to a 3-D subspace of R^32 → token ID ≈ 3
    rng = np.random.default_rng(2)
    coords = torch.from_numpy(rng.standard_normal((4, 3, 5, 10, 10)))
    basis = torch.from_numpy(rng.standard_normal((32, 3)))
    latents = torch.einsum("ck,bkthw->bcthw", basis, coords)
    ids = gride_id(latents_to_points(latents, "token", max_points=1500, seed=0))
    assert all(abs(d - 3.0) < 0.5 for d in ids.values()), ids

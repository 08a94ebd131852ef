import numpy as np
import pytest
import scipy.linalg
import torch

from fsvideo.fvd import (
    I3D_CALL_KWARGS,
    FeatureStatistics,
    VideoFeatureExtractor,
    frechet_distance,
    load_video_feature_extractor,
    resize_center_crop,
)


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _random_spd(rng, d, n=200):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # = 5 + 1 + 1 + 7.5625
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_distance_zero_for_identical_and_robust_to_rank_deficiency():
    rng = np.random.default_rng(1)
    mu = rng.standard_normal(32)
    sigma = np.cov(rng.standard_normal((10, 32)), rowvar=False)  # rank 9 of 32
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    other = np.cov(rng.standard_normal((10, 32)), rowvar=False)
    value = frechet_distance(mu, sigma, mu, other)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(mu, sigma, mu[:5], sigma)


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 6)) * 3 + 1e4 for n in (1, 7, 32, 5)]  # large offset
    stats = FeatureStatistics(6)
    for chunk in chunks:
        stats.update(torch.from_numpy(chunk).float())
    allx = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    mu, sigma = stats.compute()
    assert stats.count == 45
    np.testing.assert_allclose(mu, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(allx, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(6).compute()
    with pytest.raises(ValueError, match="N×6"):
        stats.update(torch.zeros(3, 5))


def test_resize_center_crop():
    constant = torch.full((1, 3, 2, 24, 48), 0.3)
    torch.testing.assert_close(resize_center_crop(constant, 16), torch.full((1, 3, 2, 16, 16), 0.3))
    # left half -1, right half +1: a centred crop is antisymmetric about its middle column
    video = torch.ones(1, 3, 2, 24, 48)
    video[..., :24] = -1.0
    out = resize_center_crop(video, 16)
    assert out.shape == (1, 3, 2, 16, 16)
    torch.testing.assert_close(out[..., :8], -out[..., 8:].flip(-1))
    assert out[..., :4].max() == -1.0 and out[..., 12:].min() == 1.0
    same = torch.randn(1, 3, 2, 16, 16)
    assert resize_center_crop(same, 16) is same


class _TinyVideoNet(torch.nn.Module):
    """Stand-in for I3D with its call signature: B×3×T×S×S in [-1, 1] → B×8."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, stride=2, padding=1)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return h if return_features else h.softmax(-1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_loader_round_trip_and_fvd(tmp_path):
    torch.manual_seed(0)
    net = _TinyVideoNet()
    path = tmp_path / "tiny_i3d.pt"
    torch.jit.script(net).save(str(path))
    extractor = load_video_feature_extractor(path, resolution=16)
    assert isinstance(extractor, VideoFeatureExtractor) and extractor.call_kwargs == I3D_CALL_KWARGS
    videos = torch.rand(6, 3, 4, 20, 24) * 2 - 1
    feats = extractor(videos)
    expected = net(resize_center_crop(videos, 16), **I3D_CALL_KWARGS)
    torch.testing.assert_close(feats, expected)
    assert not feats.requires_grad

    real, same, shifted = FeatureStatistics(8), FeatureStatistics(8), FeatureStatistics(8)
    real.update(feats)
    same.update(extractor(videos))
    shifted.update(extractor((videos * 0.5 + 0.4).clamp(-1, 1)))
    assert abs(frechet_distance(*real.compute(), *same.compute())) < 1e-9
    assert frechet_distance(*real.compute(), *shifted.compute()) > 1e-4

    with pytest.raises(ValueError, match="no TorchScript file"):
        load_video_feature_extractor(tmp_path / "missing.pt")

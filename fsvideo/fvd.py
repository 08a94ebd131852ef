"""Fréchet Video Distance (Unterthiner et al. 2018): Fréchet distance between Gaussians fitted to
the features a frozen video network (I3D) gives to real and to generated videos.

The I3D network is the TorchScript file used by StyleGAN-V and most PyTorch FVD code,
``i3d_torchscript.pt`` (a port of the tf.hub Kinetics-400 I3D used by the original FVD). It is
never downloaded here: pass a local path. Its call contract, as used by those projects:
``net(x, rescale=False, resize=False, return_features=True)`` with ``x`` a float
``B×3×T×224×224`` video in [-1, 1] (``rescale=True`` would instead take [0, 255];
``resize=True`` would resize inside the network), returning ``B×400`` features (the logits
before the softmax). Use at least 10 frames (16 is customary) for I3D.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

I3D_CALL_KWARGS: dict[str, Any] = {"rescale": False, "resize": False, "return_features": True}
"""Keyword arguments of the StyleGAN-V I3D TorchScript call for [-1, 1] input, pre-resized."""

I3D_RESOLUTION = 224


def _drop_roundoff(eigvals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (negative, or below ``D·ε·λ_max``) set to 0.

    Left in, ``sqrt`` would turn each ~1e-16 round-off eigenvalue of a rank-deficient covariance
    (fewer samples than features) into a ~1e-8 error in the trace.
    """
    threshold = eigvals.size * np.finfo(np.float64).eps * max(eigvals.max(initial=0.0), 0.0)
    return np.where(eigvals > threshold, eigvals, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``, in float64.

    ``tr (Σ1 Σ2)^{1/2}`` is computed as ``Σ sqrt(eig(S1 Σ2 S1))`` with ``S1 = Σ1^{1/2}``: that
    matrix is symmetric positive semi-definite and has the same eigenvalues as ``Σ1 Σ2``, so a
    symmetric eigensolver is enough and no complex square root (or its ``eps`` retries) is needed.
    Round-off eigenvalues are set to 0 (see :func:`_drop_roundoff`).

    Args:
        mu1, mu2: means ``D``; sigma1, sigma2: covariances ``D×D``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}; "
            "expected D and D×D statistics of one feature extractor."
        )
    eigvals, eigvecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigvecs * np.sqrt(_drop_roundoff(eigvals))) @ eigvecs.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(_drop_roundoff(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureStatistics:
    """Running mean and covariance of feature vectors, in float64.

    Batches are merged with Chan et al.'s pairwise update (counts, means and centred
    sums of outer products), which stays accurate where ``E[xxᵀ] − μμᵀ`` would cancel.
    """

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.count = 0
        self._mean = torch.zeros(num_features, dtype=torch.float64)
        self._centred_sum = torch.zeros(num_features, num_features, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch ``N×D`` of features."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be N×{self.num_features}, got {tuple(features.shape)}.")
        x = features.detach().to("cpu", torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - self._mean
        total = self.count + n
        self._centred_sum += centred.T @ centred + torch.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``D`` and unbiased covariance ``D×D`` (as ``np.cov``) of everything added."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}.")
        return self._mean.numpy().copy(), (self._centred_sum / (self.count - 1)).numpy()


def resize_center_crop(videos: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize each frame so its shorter side is ``resolution``, then centre-crop to a square.

    ``B×3×T×H×W`` → ``B×3×T×resolution×resolution`` (bilinear; no-op at the target size).
    """
    b, c, t, h, w = videos.shape
    if (h, w) == (resolution, resolution):
        return videos
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    frames = videos.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    frames = frames[:, :, top : top + resolution, left : left + resolution]
    return frames.reshape(b, t, c, resolution, resolution).transpose(1, 2)


class VideoFeatureExtractor(nn.Module):
    """A frozen video network returning one feature vector per video.

    Args:
        network: any module mapping ``B×3×T×S×S`` in [-1, 1] to ``B×D``
            (a TorchScript I3D, or a tiny stand-in in tests).
        call_kwargs: keyword arguments for every call of ``network``.
        resolution: frame side ``S`` the network expects; inputs are resized and centre-cropped.
    """

    def __init__(
        self,
        network: nn.Module,
        call_kwargs: Mapping[str, Any] | None = None,
        resolution: int = I3D_RESOLUTION,
    ) -> None:
        super().__init__()
        self.network = network.eval()
        for param in self.network.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self.call_kwargs = dict(call_kwargs or {})
        self.resolution = resolution

    def train(self, mode: bool = True) -> VideoFeatureExtractor:
        super().train(mode)
        self.network.eval()  # frozen metric network
        return self

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """``B×3×T×H×W`` in [-1, 1] → features ``B×D`` (float32)."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected RGB videos B×3×T×H×W in [-1, 1], got {tuple(videos.shape)}.")
        x = resize_center_crop(videos.float(), self.resolution).clamp(-1, 1)
        return self.network(x, **self.call_kwargs).float()


def load_video_feature_extractor(
    path: str | Path,
    call_kwargs: Mapping[str, Any] | None = None,
    resolution: int = I3D_RESOLUTION,
    device: str | torch.device = "cpu",
) -> VideoFeatureExtractor:
    """Load a TorchScript video network from a local file (``torch.jit.load``) for FVD.

    Defaults are those of the StyleGAN-V ``i3d_torchscript.pt`` (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"no TorchScript file at {path}; FVD needs a local I3D (i3d_torchscript.pt, the one used by "
            "StyleGAN-V) — nothing is downloaded at run time."
        )
    with warnings.catch_warnings():
        # the published I3D exists only as TorchScript, so its loader's deprecation note is moot
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load")
        network = torch.jit.load(str(path), map_location=device)
    kwargs = I3D_CALL_KWARGS if call_kwargs is None else call_kwargs
    return VideoFeatureExtractor(network, kwargs, resolution)

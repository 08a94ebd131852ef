"""Intrinsic dimension of the latent space with Gride (spec §2.2.2, Table 1).

Gride (Denti et al. 2022) estimates the intrinsic dimension from the ratios of the distances
to the ``k``-th and ``2k``-th nearest neighbours; doubling ``k`` probes the manifold at growing
scales. The spec reports it for ``k`` = 2, 4, …, 64 neighbours, computed with DADApy
(``Data(X).return_id_scaling_gride(range_max=64)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from dadapy import Data

PAPER_SCALES = (2, 4, 8, 16, 32, 64)
"""Neighbour ranks of Table 1."""


def latents_to_points(
    latents: torch.Tensor,
    mode: Literal["token", "latent"] = "token",
    max_points: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Turn latents into a point cloud for :func:`gride_id`.

    Args:
        latents: ``B×C×t×h×w`` (images: ``t = 1``).
        mode: ``"token"``: every latent position is a point, its ``C`` channels the
            coordinates (``B·t·h·w`` points in ``R^C``: the space the DiT's tokens live in);
            ``"latent"``: every whole latent is one point in ``R^{C·t·h·w}`` (``B`` points).
        max_points: keep at most this many points, drawn without replacement.
        seed: seed of that draw.

    Returns:
        ``N×D`` float64 array.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be B×C×t×h×w, got shape {tuple(latents.shape)}.")
    x = latents.detach().to("cpu", torch.float64)
    if mode == "token":
        points = x.movedim(1, -1).reshape(-1, x.shape[1])
    elif mode == "latent":
        points = x.reshape(x.shape[0], -1)
    else:
        raise ValueError(f"mode must be 'token' or 'latent', got {mode!r}.")
    points = points.numpy()
    if max_points is not None and len(points) > max_points:
        keep = np.random.default_rng(seed).choice(len(points), size=max_points, replace=False)
        points = points[np.sort(keep)]
    return points


def gride_id(points: np.ndarray | torch.Tensor, scales: Sequence[int] = PAPER_SCALES) -> dict[int, float]:
    """Gride intrinsic dimension at each neighbour rank in ``scales``.

    DADApy returns one estimate per rank ``k = 2, 4, …, range_max`` (``range_max = max(scales)``),
    each from the ratio of the ``k``-th to the ``k/2``-th neighbour distance. Duplicate points
    (zero distances) are dropped first, since Gride's distance ratios are undefined for them.

    Args:
        points: ``N×D`` with ``N > max(scales)``.
        scales: neighbour ranks, powers of two >= 2.

    Returns:
        ``{rank: intrinsic dimension}`` for the requested ranks.
    """
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64)
    scales = sorted(set(scales))
    if not scales or any(k < 2 or k & (k - 1) for k in scales):
        raise ValueError(f"scales must be powers of two >= 2 (e.g. {PAPER_SCALES}), got {scales}.")
    if points.ndim != 2:
        raise ValueError(f"points must be N×D, got shape {points.shape}.")
    unique = np.unique(points, axis=0)
    if len(unique) < len(points):
        points = unique
    if len(points) <= scales[-1]:
        raise ValueError(
            f"{len(points)} distinct points cannot resolve {scales[-1]} neighbours; "
            "give more points or smaller scales."
        )
    ids, _, ranks = Data(points, verbose=False).return_id_scaling_gride(
        range_max=scales[-1], return_ranks=True
    )
    by_rank = {int(k): float(d) for k, d in zip(ranks, ids)}
    return {k: by_rank[k] for k in scales}

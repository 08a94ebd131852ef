"""3D rotary position embedding as in Wan2.1.

The head dim d is split into a time share ``d − 4·⌊d/6⌋`` and height / width shares ``2·⌊d/6⌋``
each (contiguous, in that order). Inside each share, adjacent channel pairs (0,1), (2,3), … are
rotated by ``pos · θ^(−2i/share)``.

Public API:
    rope_axis_dims(head_dim) -> (t, h, w)
    rope_angles(grid, head_dim, theta, device) -> (cos, sin), each ``N×d/2`` (float32)
    apply_rope(x, cos, sin) -> x rotated, ``B×heads×N×d``
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(positions: int, dims: int, theta: float, device: torch.device) -> torch.Tensor:
    # float64 like Wan and diffusers: at position ~1000 float32 angles lose the low bits.
    inv_freq = 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)
    return torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv_freq)


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin of the rotation angles for a token grid ``(t, h, w)`` flattened t-major.

    Returns:
        ``(cos, sin)``, each ``N×head_dim/2`` in float32, ``N = t·h·w``.
    """
    t, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    angles_t = _axis_angles(t, dt, theta, device)[:, None, None, :].expand(t, h, w, -1)
    angles_h = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(t, h, w, -1)
    angles_w = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(t, h, w, -1)
    angles = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(t * h * w, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (``B×heads×N×d``) by the angles of ``rope_angles``."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, nh, N, d/2, 2)
    even, odd = pairs.unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)

"""3D rotary position embedding as in Wan2.1.

The head dim d is split into a time share ``d − 4·⌊d/6⌋`` and height / width shares ``2·⌊d/6⌋``
each (contiguous, in that order). Inside each share, adjacent channel pairs (0,1), (2,3), … are
rotated by ``pos · θ^(−2i/share)``.

A pair (even, odd) is the complex number ``even + i·odd`` and a rotation is a product with a unit
complex number, as in Wan's own code: one elementwise kernel forward and one backward, where the
real-valued form needs about seven temporaries of the size of ``x``.

Public API:
    rope_axis_dims(head_dim) -> (t, h, w)
    rope_rotations(grid, head_dim, theta, device) -> ``N×d/2`` complex64 unit rotations
    apply_rope(x, rotations) -> x rotated, ``B×N×dim`` (all heads)
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


def rope_rotations(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device
) -> torch.Tensor:
    """Unit complex rotations ``e^(i·angle)`` for a token grid ``(t, h, w)`` flattened t-major.

    Returns:
        ``N×head_dim/2`` complex64, ``N = t·h·w``; column j rotates the channel pair (2j, 2j+1).
    """
    t, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    angles_t = _axis_angles(t, dt, theta, device)[:, None, None, :].expand(t, h, w, -1)
    angles_h = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(t, h, w, -1)
    angles_w = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(t, h, w, -1)
    angles = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(t * h * w, head_dim // 2)
    return torch.complex(angles.cos().float(), angles.sin().float())


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of every head of ``x`` (``B×N×heads·d``, heads side by side) by
    ``rotations`` (``N×d/2``, from ``rope_rotations``); computed in float32, returned in x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, rotations.shape[-1], 2)))  # (B, N, nh, d/2)
    return torch.view_as_real(pairs * rotations[:, None]).flatten(2).type_as(x)

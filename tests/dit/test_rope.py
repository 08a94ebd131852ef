"""3D RoPE: Wan's head-dim split and pair rotation, scores that depend only on relative position."""

from __future__ import annotations

import torch

from fsvideo.dit.rope import apply_rope, rope_axis_dims, rope_rotations


def test_axis_split_as_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)


def test_rotates_adjacent_pairs_of_every_head_as_wan():
    head_dim, heads, grid = 16, 3, (2, 3, 4)
    rotations = rope_rotations(grid, head_dim, 10000.0, torch.device("cpu"))
    assert rotations.shape == (24, 8) and rotations.dtype == torch.complex64
    # Wan's angle of pair j = 1 of the time share (8 channels) at t = 1 (token 12): 1·10000^(−2/8)
    torch.testing.assert_close(rotations[12, 1].angle(), torch.tensor(10000.0 ** (-0.25)))
    x = torch.randn(2, 24, heads * head_dim)
    out = apply_rope(x, rotations)
    cos, sin = rotations.real, rotations.imag  # (N, d/2)
    even, odd = x.unflatten(-1, (heads, -1, 2)).unbind(-1)  # (B, N, nh, d/2)
    expected = torch.stack(
        [even * cos[:, None] - odd * sin[:, None], even * sin[:, None] + odd * cos[:, None]], -1
    )
    torch.testing.assert_close(out, expected.flatten(2))
    low = apply_rope(x.bfloat16(), rotations)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, rtol=2e-2, atol=2e-2)


def test_scores_depend_on_relative_position_only():
    head_dim, grid = 16, (4, 5, 6)
    rotations = rope_rotations(grid, head_dim, 10000.0, torch.device("cpu"))
    n = rotations.shape[0]
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = apply_rope(q.expand(1, n, -1), rotations)[0]
    rk = apply_rope(k.expand(1, n, -1), rotations)[0]

    def index(t, h, w):
        return (t * 5 + h) * 6 + w

    # same offset (1, 2, -1) at two places: same score; a rotation keeps norms
    a = rq[index(0, 0, 3)] @ rk[index(1, 2, 2)]
    b = rq[index(2, 1, 4)] @ rk[index(3, 3, 3)]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n))
    assert not torch.allclose(
        rq[index(0, 0, 0)] @ rk[index(1, 0, 0)], rq[index(0, 0, 0)] @ rk[index(0, 1, 0)]
    )

"""3D RoPE: Wan's head-dim split, and attention scores that depend only on relative position."""

from __future__ import annotations

import torch

from fsvideo.dit.rope import apply_rope, rope_angles, rope_axis_dims


def test_axis_split_as_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)


def test_scores_depend_on_relative_position_only():
    head_dim, grid = 16, (4, 5, 6)
    cos, sin = rope_angles(grid, head_dim, 10000.0, torch.device("cpu"))
    assert cos.shape == sin.shape == (4 * 5 * 6, head_dim // 2)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    n = cos.shape[0]
    rq = apply_rope(q.expand(1, 1, n, -1), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, n, -1), cos, sin)[0, 0]

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

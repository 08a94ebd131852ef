"""The I2V condition: Wan's mask folding and [first-frame latent, zeros]."""

from __future__ import annotations

import pytest
import torch

from fsvideo.dit import build_i2v_condition, fold_frame_mask


def wan_mask(num_pixel_frames: int, h: int, w: int) -> torch.Tensor:
    """Wan2.1 image2video.py's construction: 1 on frame 0, first frame repeated 4×, view as t×4."""
    msk = torch.ones(1, num_pixel_frames, h, w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)


def test_condition_matches_wan_layout():
    first = torch.randn(2, 8, 1, 3, 5)
    condition = build_i2v_condition(first, num_latent_frames=5)
    assert condition.shape == (2, 4 + 8, 5, 3, 5)
    torch.testing.assert_close(condition[:, :4], wan_mask(17, 3, 5).expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(condition[:, 4:, :1], first)
    assert torch.count_nonzero(condition[:, 4:, 1:]) == 0
    single = build_i2v_condition(first, num_latent_frames=1)
    assert single.shape == (2, 12, 1, 3, 5) and torch.all(single[:, :4] == 1)


def test_fold_keeps_soft_mask_values():
    pixel_mask = torch.linspace(0, 1, 9)[None, :, None, None].expand(1, 9, 2, 2)
    folded = fold_frame_mask(pixel_mask)
    assert folded.shape == (1, 4, 3, 2, 2)
    torch.testing.assert_close(folded[0, :, 0, 0, 0], torch.zeros(4))
    torch.testing.assert_close(folded[0, :, 2, 0, 0], torch.linspace(0, 1, 9)[5:9])


def test_condition_errors():
    with pytest.raises(ValueError, match="1 \\+ 4·n"):
        fold_frame_mask(torch.zeros(1, 6, 2, 2))
    with pytest.raises(ValueError, match="B×C×1×h×w"):
        build_i2v_condition(torch.zeros(1, 8, 2, 3, 3), 4)
    with pytest.raises(ValueError, match="num_latent_frames"):
        build_i2v_condition(torch.zeros(1, 8, 1, 3, 3), 0)

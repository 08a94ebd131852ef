"""The refiner's masked video-to-video condition (§2.4.2): dynamic mask, replacement, frame shuffle."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fsvideo.refiner import (
    SHUFFLE_KINDS,
    DynamicMaskConfig,
    RefinerTrainingConfig,
    draw_shuffle_kind,
    dynamic_confidence,
    masked_video_to_video,
    shuffle_draft_frames,
)


def test_dynamic_confidence_maps_the_first_frame_error_into_the_range():
    config = DynamicMaskConfig(low=0.3, high=0.9, error_scale=2.0)
    truth = torch.zeros(4, 8, 1, 2, 2)
    errors = torch.tensor([0.0, 1.0, 2.0, 5.0])
    draft = truth + errors.view(4, 1, 1, 1, 1)
    confidence = dynamic_confidence(truth, draft, config)
    torch.testing.assert_close(confidence, torch.tensor([0.9, 0.6, 0.3, 0.3]))
    with pytest.raises(ValueError, match="0 < low < high < 1"):
        DynamicMaskConfig(low=0.5, high=1.0)


def test_mask_is_one_at_frame_0_and_replaced_frames_and_the_confidence_elsewhere():
    g = torch.Generator().manual_seed(0)
    first, draft, truth = (torch.randn(2, 8, t, 3, 3, generator=g) for t in (1, 4, 4))
    replaced = torch.tensor([[False, False, True, False], [False, False, False, False]])
    condition = masked_video_to_video(first, draft, torch.tensor([0.4, 0.7]), 4, replaced, truth)
    mask = condition.mask  # (B, 4, t, h, w): one value per latent frame in every channel and position
    assert mask.shape == (2, 4, 4, 3, 3)
    per_frame = mask.amax(dim=(1, 3, 4))
    assert torch.equal(per_frame, mask.amin(dim=(1, 3, 4)))
    torch.testing.assert_close(per_frame, torch.tensor([[1.0, 0.4, 1.0, 0.4], [1.0, 0.7, 0.7, 0.7]]))
    assert ((mask > 0) & (mask <= 1)).all()
    assert torch.equal(condition.latent[:, :, :1], first)
    assert torch.equal(condition.latent[0, :, 2], truth[0, :, 2])  # the replaced frame holds the truth
    assert torch.equal(condition.latent[0, :, 3], draft[0, :, 3]) and torch.equal(
        condition.latent[1, :, 1:], draft[1, :, 1:]
    )
    assert condition.given.tolist() == [True, False, False, False]


def test_shuffle_kinds_are_drawn_six_three_one():
    g = torch.Generator().manual_seed(0)
    counts = Counter(draw_shuffle_kind((6.0, 3.0, 1.0), g) for _ in range(20000))
    for kind, share in zip(SHUFFLE_KINDS, (0.6, 0.3, 0.1)):
        assert abs(counts[kind] / 20000 - share) < 0.015, counts  # ~4.5 standard errors


def test_shuffles_keep_frame_0_and_permute_as_defined():
    draft = torch.arange(7.0).view(1, 7, 1, 1)  # C×t×h×w, frame k holds k
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        local = shuffle_draft_frames(draft, "local", g).flatten().tolist()
        moved = [i for i, v in enumerate(local) if v != i]
        assert local[0] == 0 and len(moved) == 2 and moved[1] - moved[0] == 1
        far = shuffle_draft_frames(draft, "non_adjacent", g).flatten().tolist()
        moved = [i for i, v in enumerate(far) if v != i]
        assert far[0] == 0 and len(moved) == 2 and moved[1] - moved[0] >= 2
        whole = shuffle_draft_frames(draft, "whole", g).flatten().tolist()
        assert whole[0] == 0 and sorted(whole) == list(range(7))
    two = torch.arange(3.0).view(1, 3, 1, 1)  # two draft frames: a non-adjacent swap falls back to local
    assert shuffle_draft_frames(two, "non_adjacent", g).flatten().tolist() == [0, 2, 1]
    one = torch.arange(2.0).view(1, 2, 1, 1)
    assert torch.equal(shuffle_draft_frames(one, "whole", g), one)


def test_training_config_checks_its_values():
    with pytest.raises(ValueError, match="condition_dropout"):
        RefinerTrainingConfig(condition_dropout=1.5)
    with pytest.raises(ValueError, match="shuffle_weights"):
        RefinerTrainingConfig(shuffle_weights=(1.0, 1.0))
    assert RefinerTrainingConfig(mask={"low": 0.2, "high": 0.8}).mask.low == 0.2

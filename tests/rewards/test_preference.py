"""Bradley–Terry with ties (Rao–Kupper) against its direct formula."""

from __future__ import annotations

import math

import pytest
import torch

from fsvideo.rewards.preference import (
    A_PREFERRED,
    B_PREFERRED,
    MISSING,
    TIE,
    bt_ties_loss,
    pair_accuracy,
    preference_log_probs,
)


def _direct(ra: float, rb: float, theta: float) -> list[float]:
    pa, pb = math.exp(ra), math.exp(rb)
    a_wins, b_wins = pa / (pa + theta * pb), pb / (pb + theta * pa)
    tie = (theta**2 - 1) * pa * pb / ((pa + theta * pb) * (pb + theta * pa))
    return [a_wins, b_wins, tie]


@pytest.mark.parametrize("theta", [1.5, 5.0])
def test_loss_matches_the_direct_formula(theta):
    generator = torch.Generator().manual_seed(0)
    ra, rb = torch.randn(12, generator=generator, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    labels = torch.tensor([A_PREFERRED, B_PREFERRED, TIE, MISSING] * 3)
    probs = torch.tensor(
        [_direct(a, b, theta) for a, b in zip(ra.tolist(), rb.tolist(), strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(probs.sum(-1), torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(preference_log_probs(ra, rb, theta).exp(), probs)
    present = labels != MISSING
    expected = -probs[present].gather(1, labels[present, None]).log().mean()
    torch.testing.assert_close(bt_ties_loss(ra, rb, labels, theta), expected)


def test_loss_is_stable_for_large_margins():
    ra, rb = torch.tensor([60.0, -60.0]), torch.tensor([-60.0, 60.0])
    loss = bt_ties_loss(ra, rb, torch.tensor([TIE, TIE]), 5.0)
    assert torch.isfinite(loss) and loss > 100


def test_pair_accuracy_counts_strict_preferences_only():
    ra, rb = torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    labels = torch.tensor([A_PREFERRED, A_PREFERRED, TIE, B_PREFERRED])
    assert pair_accuracy(ra, rb, labels) == (1, 3)

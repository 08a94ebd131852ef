"""Pairwise preference losses for reward models: Bradley–Terry with ties (Rao–Kupper), as VideoReward trains.

With rewards r_A, r_B and a tie parameter θ > 1 (Rao & Kupper 1967):

    P(A ≻ B) = e^{r_A} / (e^{r_A} + θ e^{r_B}) = σ(r_A − r_B − log θ)
    P(B ≻ A) = σ(r_B − r_A − log θ)
    P(tie)   = (θ² − 1) e^{r_A} e^{r_B} / ((e^{r_A} + θ e^{r_B}) (e^{r_B} + θ e^{r_A}))

The three sum to one; θ → 1 recovers plain Bradley–Terry without ties.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

A_PREFERRED, B_PREFERRED, TIE = 0, 1, 2
"""Preference labels."""
MISSING = -1
"""A pair with no label for a dimension; left out of the loss."""
LABELS = {"A": A_PREFERRED, "B": B_PREFERRED, "tie": TIE}
"""Labels as written in a pairs JSONL."""


def preference_log_probs(reward_a: torch.Tensor, reward_b: torch.Tensor, theta: float) -> torch.Tensor:
    """``…`` rewards → ``…×3`` log-probabilities of (A ≻ B, B ≻ A, tie) under Rao–Kupper."""
    if theta <= 1.0:
        raise ValueError(f"the tie parameter theta must be > 1, got {theta}")
    log_theta = math.log(theta)
    a_wins = F.logsigmoid(reward_a - reward_b - log_theta)
    b_wins = F.logsigmoid(reward_b - reward_a - log_theta)
    tie = (
        math.log(theta**2 - 1)
        + reward_a
        + reward_b
        - torch.logaddexp(reward_a, reward_b + log_theta)
        - torch.logaddexp(reward_b, reward_a + log_theta)
    )
    return torch.stack([a_wins, b_wins, tie], dim=-1)


def bt_ties_loss(
    reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor, theta: float
) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` (A_PREFERRED, B_PREFERRED, TIE; MISSING skipped) over the
    pairs; rewards and labels of the same shape. Zero (with gradient) when every label is missing."""
    log_probs = preference_log_probs(reward_a, reward_b, theta)
    present = labels != MISSING
    picked = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * present).sum() / present.sum().clamp(min=1)


def pair_accuracy(reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(pairs ranked right, pairs with a strict preference): ties and missing labels are not counted."""
    strict = (labels == A_PREFERRED) | (labels == B_PREFERRED)
    right = ((reward_a > reward_b) == (labels == A_PREFERRED)) & strict
    return int(right.sum()), int(strict.sum())

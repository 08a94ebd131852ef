"""The MPS-style frame reward: the N lowest frames are chosen without gradient and only they carry gradient."""

from __future__ import annotations

import torch
from run_dirs import write_network_run

from fsvideo.pretrained import load_network
from fsvideo.rewards import FrameReward, FrameRewardConfig

PROMPTS = ["a cat walks across the garden", "a bright scene"]


def _reward(models, **overrides) -> FrameReward:
    torch.manual_seed(0)
    return FrameReward.from_backbone(FrameRewardConfig(backbone=str(models["clip"]), **overrides))


def test_lowest_frames_carry_the_gradient(tiny_reward_models):
    reward = _reward(tiny_reward_models)  # N = 10, the paper's
    video = (torch.rand(2, 3, 13, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(
        True
    )
    scores = reward.frame_scores(video, PROMPTS)  # (B, T), no gradient
    chosen = reward.lowest_frames(video, PROMPTS)
    assert chosen.shape == (2, 10) and torch.equal(chosen, scores.argsort(dim=1)[:, :10])
    total = reward.score(video, None, PROMPTS)
    torch.testing.assert_close(total.detach(), scores.gather(1, chosen).mean(dim=1))
    total.sum().backward()
    has_grad = video.grad.abs().sum(dim=(1, 3, 4)) > 0  # (B, T)
    expected = torch.zeros_like(has_grad).scatter_(1, chosen, True)
    assert torch.equal(has_grad, expected)


def test_round_trip_is_bit_identical(tiny_reward_models, tmp_path):
    reward = _reward(tiny_reward_models, frames_with_grad=3).eval()
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    folder = reward.save_pretrained(tmp_path / "frame_reward")
    with torch.no_grad():
        expected = reward.score(video, None, PROMPTS)
        for loaded in (FrameReward.from_pretrained(folder), load_network(folder)):
            assert loaded.config.frames_with_grad == 3
            assert torch.equal(loaded.score(video, None, PROMPTS), expected)


def test_a_run_checkpoint_loads_by_the_same_path(tiny_reward_models, tmp_path):
    reward = _reward(tiny_reward_models, frames_with_grad=2).eval()
    video = torch.rand(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    run = write_network_run(tmp_path / "run", "frame_reward", reward)
    with torch.no_grad():
        assert torch.equal(
            FrameReward.from_pretrained(run).score(video, None, PROMPTS[:1]),
            reward.score(video, None, PROMPTS[:1]),
        )

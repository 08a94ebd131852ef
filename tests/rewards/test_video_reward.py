"""The VideoAlign-style video reward: the user's loading path, bit-identical round trips, differentiable pixels,
the processor's patch layout, the first frame as a condition and the configured score weights."""

from __future__ import annotations

import pytest
import torch
from run_dirs import write_network_run
from tiny_rewards import tiny_video_config
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from fsvideo.pretrained import load_network
from fsvideo.rewards import VideoReward
from fsvideo.rewards.video_reward import patchify

PROMPTS = ["a cat walks across the garden", "the camera pans over a city at night"]


def _inputs(seed: int = 0, frames: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    video = torch.rand(2, 3, frames, 60, 72, generator=generator) * 2 - 1
    return video, video[:, :, 0].clone()


def _reward(models, seed: int = 0, **overrides) -> VideoReward:
    torch.manual_seed(seed)
    return VideoReward.from_backbone(tiny_video_config(models, **overrides))


def test_round_trip_is_bit_identical(tiny_reward_models, tmp_path):
    reward = _reward(tiny_reward_models).eval()
    video, first = _inputs()
    folder = reward.save_pretrained(tmp_path / "video_reward")
    assert (folder / "backbone" / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # the backbone folder is transformers' own format: transformers alone reads it
    Qwen2VLForConditionalGeneration.from_pretrained(folder / "backbone", local_files_only=True)
    with torch.no_grad():
        expected = reward.score(video, first, PROMPTS)
        for loaded in (VideoReward.from_pretrained(folder), load_network(folder)):
            assert isinstance(loaded, VideoReward)
            assert torch.equal(loaded.score(video, first, PROMPTS), expected)


def test_score_is_differentiable_in_the_sampled_frames(tiny_reward_models):
    reward = _reward(tiny_reward_models, sample_fps=4.0)  # every other frame of an 8 fps clip
    video, first = _inputs(frames=5)
    video.requires_grad_(True)
    reward.score(video, first, PROMPTS).sum().backward()
    per_frame = video.grad.abs().sum(dim=(0, 1, 3, 4))
    assert reward.config.frame_indices(5) == [0, 2, 4]
    assert (per_frame[[0, 2, 4]] > 0).all() and (per_frame[[1, 3]] == 0).all()


def test_patchify_matches_the_transformers_processor():
    frames = torch.randn(
        3, 3, 56, 84
    )  # an odd frame count: padded with the last frame, as the processor does
    ours, grid = patchify(frames, patch=14, merge=2, temporal_patch=2)
    theirs, *their_grid = Qwen2VLVideoProcessor().patchify(frames[None], 14, 2, 2)
    assert grid == list(their_grid) and torch.equal(ours, theirs[0])


def test_first_frame_is_a_condition(tiny_reward_models):
    reward = _reward(tiny_reward_models).eval()
    video, first = _inputs()
    with torch.no_grad():
        assert not torch.equal(reward.score(video, first, PROMPTS), reward.score(video, -first, PROMPTS))
    with pytest.raises(ValueError, match="first frame"):
        reward.score(video, None, PROMPTS)


def test_score_weights_and_normalisation_come_from_the_config(tiny_reward_models):
    video, first = _inputs()
    plain = _reward(tiny_reward_models).eval()
    weighted = _reward(
        tiny_reward_models, weights=(2.0, 0.0, -1.0), mean=(0.5, 0.0, 1.0), std=(2.0, 1.0, 4.0)
    )
    with torch.no_grad():
        raw = plain.dimension_scores(video, first, PROMPTS)  # mean 0, std 1: the raw head outputs
        expected = 2.0 * (raw[:, 0] - 0.5) / 2.0 - (raw[:, 2] - 1.0) / 4.0
        torch.testing.assert_close(weighted.eval().score(video, first, PROMPTS), expected)
    assert raw.shape == (2, 3)


def test_bad_inputs_are_refused(tiny_reward_models):
    reward = _reward(tiny_reward_models)
    video, first = _inputs()
    with pytest.raises(ValueError, match="B×3×T×H×W"):
        reward.score(video[:, :, 0], first, PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        reward.score(video, first, PROMPTS[:1])
    with pytest.raises(ValueError, match="multiples of 28"):
        _reward(tiny_reward_models, frame_height=50)
    with pytest.raises(ValueError, match="not a directory"):
        VideoReward(tiny_video_config({"qwen2_vl": "missing/folder"}))


def test_a_run_checkpoint_loads_by_the_same_path(tiny_reward_models, tmp_path):
    """A run holds every weight in its checkpoint; the backbone's derived buffers (rotary frequencies) are
    recomputed when the network is materialised from the meta device."""
    reward = _reward(tiny_reward_models).eval()
    video, first = _inputs()
    run = write_network_run(tmp_path / "run", "video_reward", reward)
    with torch.no_grad():
        assert torch.equal(
            VideoReward.from_pretrained(run).score(video, first, PROMPTS), reward.score(video, first, PROMPTS)
        )

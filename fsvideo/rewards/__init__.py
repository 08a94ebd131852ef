"""Reward models (§2.3.2): one interface, ``score(video, first_frame, prompts) -> B`` (differentiable), and
saved-model folders whose transformers backbone sits in a ``backbone/`` subfolder.

    VideoReward / VideoRewardConfig    VideoAlign-style: Qwen2-VL + reward head (VQ, MQ, TA), first frame as input
    FrameReward / FrameRewardConfig    MPS-style: CLIP per-frame score, gradient through the N lowest frames only
    bt_ties_loss, pair_accuracy        Bradley–Terry with ties (Rao–Kupper) for reward finetuning
    save_tiny_reward_models(dir)       tiny random Qwen2-VL and CLIP folders (tests, CPU demos)
"""

from fsvideo.rewards.base import RewardModel
from fsvideo.rewards.frame_reward import FrameReward, FrameRewardConfig
from fsvideo.rewards.preference import bt_ties_loss, pair_accuracy, preference_log_probs
from fsvideo.rewards.tiny import save_tiny_reward_models
from fsvideo.rewards.video_reward import VideoReward, VideoRewardConfig

__all__ = [
    "FrameReward",
    "FrameRewardConfig",
    "RewardModel",
    "VideoReward",
    "VideoRewardConfig",
    "bt_ties_loss",
    "pair_accuracy",
    "preference_log_probs",
    "save_tiny_reward_models",
]

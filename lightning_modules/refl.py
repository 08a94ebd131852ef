"""ReFL post-training of the base DiT (§2.3.2): reward feedback through the last denoising step (``fsvideo.refl``).

Per training batch of clips (``datamodules.latents``; frame 0's latent is the input image's, ``caption`` the
prompts): a sample from pure noise stops at a random late step, the next step is taken with gradient and its ẑ0
(eq. 12) decoded (61 frames) by the frozen FSAE decoder; the video reward scores it with the first frame and the
prompt, the frame reward its 10 lowest frames. The loss adds λ·(flow-matching loss of ``DiTModule`` on the real
batch). Validation is ``DiTModule``'s held-out flow-matching loss (``val/loss``).

Multi-round (README, "ReFL"): a round is ReFL against the current video reward, then a new small labelled set
from this DiT (``fsvideo rewards pool``), then reward finetuning (``configs/rewards/finetune.yaml``); the next
round starts from this run's DiT with the finetuned reward. The frame reward stays the same in every round. Both
rewards are frozen networks (never in an optimizer or a checkpoint). The round index is logged and recorded with
the saved DiT.

Reward-hacking watch (``lightning_modules.reward_watch``): every ``watch.every_n_steps`` steps (from step 0) the
first ``watch.batches`` held-out batches are sampled in full (seeded, the ReFL schedule and guidance) with the weights that are exported, decoded
like training samples and scored by the training rewards (``watch/reward_video``, ``watch/reward_frame``) and by
a second frozen video reward (``watch/reward_watch``): a training reward that keeps rising while the watch reward
falls is reward hacking. The watch reward defaults to the round's starting video reward, which ReFL never
changes, so the default shares its network with the training reward; name an earlier round's (or the original
VideoAlign) to watch against a reward that was not finetuned on this DiT's videos.
"""

from __future__ import annotations

from typing import Any

import torch

from fsvideo.ae import FSAE
from fsvideo.dit import FrameCondition, image_to_video
from fsvideo.pretrained import load_network
from fsvideo.refl import (
    ReFLConfig,
    decode_for_reward,
    predict_with_last_step_gradient,
    refl_objective,
    score_video,
)
from fsvideo.rewards import FrameReward, FrameRewardConfig, VideoReward
from fsvideo.stages import LatentNormalization, sample_conditioned
from lightning_modules.dit import DiTModule
from lightning_modules.reward_watch import RewardWatch, RewardWatchConfig

REFL_RECORD = "refl"
"""Record of a saved DiT naming its ReFL round and the rewards it was trained against."""


class ReFLModule(DiTModule):
    """ReFL of the base DiT (module docstring).

    Args:
        video_reward: the round's video reward (``VideoReward`` saved-model folder, or a run of reward
            finetuning): VideoAlign finetuned on this DiT's generations (§2.3.2 tricks 1 and 2).
        frame_reward: the frame reward (MPS-style, a local CLIP folder); ``frames_with_grad`` is the number of
            lowest frames scored with gradient (10). The same in every round.
        autoencoder: the FSAE whose decoder turns ẑ0 into pixels; None takes the one that encoded the training
            latents (the DataModule's ``encoder_paths``).
        refl: sampling schedule, gradient step range, truncation and loss weights.
        watch: the held-out reward-hacking watch.
        round: index of this ReFL round (1 = against the reward adapted to the SFT model); logged and recorded.
        **kwargs: ``DiTModule``'s arguments; ``init_from`` is the SFT DiT (round 1) or the previous round's run.
    """

    def __init__(
        self,
        video_reward: str,
        frame_reward: FrameRewardConfig,
        autoencoder: str | None = None,
        refl: ReFLConfig | None = None,
        watch: RewardWatchConfig | None = None,
        round: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if round < 1:
            raise ValueError(f"round counts from 1, got {round}")
        self.refl = refl or ReFLConfig()
        self.watch = watch or RewardWatchConfig()
        self.round = round
        self.video_reward_path = video_reward
        self.frame_reward_config = frame_reward
        self.frozen.add("video_reward", load_network(video_reward, expected=VideoReward), replicate=True)
        self.frozen.add("frame_reward", FrameReward.from_backbone(frame_reward), replicate=True)
        if self.watch.reward is not None:
            self.frozen.add(
                "watch_reward", load_network(self.watch.reward, expected=VideoReward), replicate=True
            )
        self.autoencoder_path = autoencoder
        if autoencoder is not None:
            self.frozen.add("autoencoder", load_network(autoencoder, expected=FSAE), replicate=True)
        self.reward_watch = RewardWatch(self.watch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.hold_data_autoencoder("ReFL")

    def dit_records(self) -> dict[str, Any]:
        refl = {
            "round": self.round,
            "video_reward": self.video_reward_path,
            "frame_reward": self.frame_reward_config.backbone,
        }
        return {**super().dit_records(), REFL_RECORD: refl}

    # ---- one ReFL sample -----------------------------------------------------------------------------------

    def normalization(self) -> LatentNormalization:
        return LatentNormalization(self.latent_mean, self.latent_std)

    def negative_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's tokens ``B×L×D`` and mask ``B×L``: the unconditional guidance branch."""
        if self.empty_text_tokens is None:
            raise ValueError(
                "ReFL's guidance needs the empty prompt's tokens, which the DataModule provides (datamodules.latents)."
            )
        return (
            self.empty_text_tokens.expand(batch_size, -1, -1),
            self.empty_text_mask.expand(batch_size, -1),
        )

    def sampling_inputs(
        self, z0: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[FrameCondition, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], Any]:
        """The image-to-video condition of the batch's first frames (``z0`` ``B×C×t×h×w`` normalised), its
        prompts' tokens, the empty prompt's and the image tokens, as the pipeline samples (no CFG dropout)."""
        if z0.shape[2] < 2:
            raise ValueError(
                "ReFL trains image-to-video on clips; set data.init_args.image_fraction: 0 (this batch is stills)."
            )
        condition = image_to_video(z0[:, :, :1], z0.shape[2], self.dit.config.mask_channels)
        text, text_mask, image = self.conditions(batch, True, drop=False)
        return condition, (text, text_mask), self.negative_text(z0.shape[0]), image

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``B×C×t×h×w`` → the truncated pixels the rewards score (``decode_for_reward``)."""
        return decode_for_reward(self.frozen["autoencoder"], self.normalization().denormalize(z0), self.refl)

    # ---- training ------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.reward_watch.due(self.global_step):
            self.reward_watch.run(self, self.watch_scores)
        z0 = self.normalize(batch["latent"])
        prompts = list(batch["caption"])
        step = self.refl.draw_gradient_step()
        condition, text, negative, image = self.sampling_inputs(z0, batch)
        z0_hat = predict_with_last_step_gradient(
            self.dit, condition, text, negative, image, torch.randn_like(z0), self.refl, step
        )
        video = self.decode(z0_hat)
        r_video, r_frame = score_video(
            video, prompts, self.frozen["video_reward"], self.frozen["frame_reward"]
        )
        if self.refl.flow_weight > 0:
            flow, _ = self.flow_loss(
                self.dit, z0, batch, self.sample_sigma(z0), torch.randn_like(z0), drop=True
            )
        else:
            flow = z0.new_zeros(())
        loss = refl_objective(r_video, r_frame, flow, self.refl)
        self.step_dit(loss)
        b = z0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/reward_video", r_video.mean(), prog_bar=True, batch_size=b)
        self.log("train/reward_frame", r_frame.mean(), batch_size=b)
        self.log("train/flow_loss", flow, batch_size=b)
        self.log("train/refl_step", float(step), batch_size=b)
        self.log("train/refl_round", float(self.round), batch_size=b)
        return loss

    # ---- reward-hacking watch ------------------------------------------------------------------------------

    def watch_scores(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A held-out batch sampled in full (the ReFL schedule and guidance, seeded noise), decoded like training
        samples, scored by the training rewards and the watch reward (``B`` each)."""
        z0 = self.normalize(batch["latent"])
        condition, text, negative, image = self.sampling_inputs(z0, batch)
        generated = sample_conditioned(
            self.inference_dit(),
            condition,
            text,
            negative,
            image,
            self.refl.steps,
            self.refl.guidance_scale,
            self.refl.shift,
            "euler",
            generator,
        )
        video = self.decode(generated)
        prompts = list(batch["caption"])
        r_video, r_frame = score_video(
            video, prompts, self.frozen["video_reward"], self.frozen["frame_reward"]
        )
        watch_reward = self.frozen["watch_reward" if "watch_reward" in self.frozen else "video_reward"]
        return {
            "watch/reward_video": r_video,
            "watch/reward_frame": r_frame,
            "watch/reward_watch": watch_reward.score(video, video[:, :, 0], prompts),
        }

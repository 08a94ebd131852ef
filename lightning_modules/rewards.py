"""Reward-model finetuning (§2.3.2): the video reward trained on labelled pairs with Bradley–Terry with ties.

The first round of the paper's multi-round ReFL adapts VideoAlign to the SFT model's outputs (trick 1, pairs
from ``fsvideo rewards pool``) and teaches it the first frame as a condition (trick 2, ``use_first_frame``).
Each step scores both videos of every pair in one batch; the loss is Rao–Kupper's negative log-likelihood of
the overall label on the combined score, plus, for pairs labelled per dimension, of each dimension's label on
that dimension's score. Validation logs the held-out pair accuracy (pairs with a strict preference).
"""

from __future__ import annotations

from typing import Any

import torch

from fsvideo.pretrained import load_network
from fsvideo.rewards.preference import bt_ties_loss, pair_accuracy
from fsvideo.rewards.video_reward import VideoReward, VideoRewardConfig
from lightning_modules.base import OptimizerConfig, SavedNetwork, TrainingStage


class RewardFinetuneModule(TrainingStage):
    """Trains a ``VideoReward`` on preference pairs.

    Args:
        init_from: the video reward to start from: a saved-model folder (``VideoReward.save_pretrained``, a
            converted VideoReward), a run directory or a checkpoint of this stage (the previous round).
        reward: with no ``init_from``, a fresh video reward on the Qwen2-VL folder it names (random head).
        optimizer: AdamW settings (default lr 1e-5).
        tie_theta: Rao–Kupper's tie parameter θ > 1 (larger: ties more likely at equal rewards).
        dimension_loss_weight: weight of the per-dimension losses (pairs labelled per dimension only).
        train_vision: also train the vision tower; by default only the language model and the head train.
        ema_decay, max_nonfinite_in_row: see ``TrainingStage`` (EMA off by default here).
    """

    def __init__(
        self,
        init_from: str | None = None,
        reward: VideoRewardConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        tie_theta: float = 5.0,
        dimension_loss_weight: float = 1.0,
        train_vision: bool = False,
        ema_decay: float = 0.0,
        max_nonfinite_in_row: int = 20,
    ) -> None:
        super().__init__(ema_decay=ema_decay, max_nonfinite_in_row=max_nonfinite_in_row)
        if (init_from is None) == (reward is None):
            raise ValueError(
                "give exactly one of model.init_args.init_from (a saved video reward, or a run of this stage) and "
                "model.init_args.reward (a fresh reward on a local Qwen2-VL folder)."
            )
        if tie_theta <= 1.0:
            raise ValueError(f"tie_theta must be > 1, got {tie_theta}")
        self.save_hyperparameters()
        self.optimizer_config = optimizer or OptimizerConfig(lr=1e-5)
        self.tie_theta, self.dimension_loss_weight = tie_theta, dimension_loss_weight
        if init_from is not None:
            self.video_reward = load_network(init_from, expected=VideoReward)
        else:
            self.video_reward = VideoReward.from_backbone(reward)
        self.video_reward.requires_grad_(True)
        if not train_vision:
            self.video_reward.backbone.model.visual.requires_grad_(False)
        self.video_reward.train()

    def saved_networks(self) -> dict[str, SavedNetwork]:
        return {"video_reward": SavedNetwork(self.video_reward)}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.video_reward.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_config.build(self.trained_parameters())
        return [optimizer], [scheduler]

    def pair_scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dimension scores ``B×3`` of video A and of video B, both scored in one call."""
        b = batch["video_a"].shape[0]
        scores = self.video_reward.dimension_scores(
            torch.cat([batch["video_a"], batch["video_b"]]),
            torch.cat([batch["first_frame"], batch["first_frame"]]),
            list(batch["prompts"]) * 2,
        )
        return scores[:b], scores[b:]

    def model_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, combined score of A ``B``, of B ``B``)."""
        dims_a, dims_b = self.pair_scores(batch)
        total_a, total_b = self.video_reward.combine(dims_a), self.video_reward.combine(dims_b)
        loss = bt_ties_loss(total_a, total_b, batch["preference"], self.tie_theta)
        if (batch["dimensions"] >= 0).any():
            loss = loss + self.dimension_loss_weight * bt_ties_loss(
                dims_a, dims_b, batch["dimensions"], self.tie_theta
            )
        return loss, total_a, total_b

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch["prompts"]:  # every pair of the batch failed to decode (counted by the DataModule)
            return None
        loss, total_a, total_b = self.model_step(batch)
        self.guarded_step(
            loss,
            self.optimizers(),
            self.trained_parameters(),
            self.optimizer_config.grad_clip_norm,
            self.lr_schedulers(),
        )
        right, counted = pair_accuracy(total_a.detach(), total_b.detach(), batch["preference"])
        n = len(batch["prompts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if counted:
            self.log("train/pair_accuracy", right / counted, batch_size=counted)
        self.log_dict({k: float(v) for k, v in batch["skipped"].items()}, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_counts = [0, 0]

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not batch["prompts"]:
            return
        loss, total_a, total_b = self.model_step(batch)
        right, counted = pair_accuracy(total_a, total_b, batch["preference"])
        self.val_counts[0] += right
        self.val_counts[1] += counted
        self.log("val/loss", loss, batch_size=len(batch["prompts"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor(self.val_counts, dtype=torch.float64, device=self.device)
        counts = self.all_gather(counts).reshape(-1, 2).sum(0)
        if counts[1] > 0:
            self.log("val/pair_accuracy", counts[0] / counts[1], prog_bar=True)

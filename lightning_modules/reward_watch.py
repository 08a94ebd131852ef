"""The reward-hacking watch of the reward-trained stages (ReFL of the base DiT, GRPO of the refiner; §2.3.2).

Every ``every_n_steps`` training steps (from step 0, the baseline) the first ``batches`` held-out clip batches of
the DataModule's validation set are sampled in full with seeded noise by the weights that are exported, decoded
like training samples and scored by the training reward(s) and by a second frozen video reward: a training reward
that keeps rising while the watch reward falls is reward hacking. The stage says how a batch is sampled and
scored (``RewardWatch.rewards``' ``score``); this module reads the held-out set once and averages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


@dataclass
class RewardWatchConfig:
    """The held-out reward-hacking watch."""

    every_n_steps: int = 50
    """Score the held-out set every this many training steps, from step 0 (the round's baseline); 0 disables."""
    batches: int = 1
    """Held-out batches scored: the first ones of the DataModule's validation set (clips only)."""
    reward: str | None = None
    """The second frozen video reward (saved-model folder or run); None: the stage's starting video reward."""
    seed: int = 0
    """Seed of the held-out samples' noise (batch i uses seed + i), so every watch compares the same noise."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.batches < 1:
            raise ValueError("watch.every_n_steps must be >= 0 and watch.batches >= 1.")


WatchScore = Callable[[dict[str, Any], torch.Generator], dict[str, torch.Tensor]]
"""``(held-out batch, seeded CPU generator) -> {"watch/<name>": B rewards}``: sample, decode and score one batch."""


class RewardWatch:
    """The held-out set of a stage (read once) and the mean rewards of its seeded samples."""

    def __init__(self, config: RewardWatchConfig) -> None:
        self.config = config
        self.batches: list[dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        """Whether the watch runs before training step ``step``."""
        return bool(self.config.every_n_steps) and step % self.config.every_n_steps == 0

    def held_out(self, stage: L.LightningModule) -> list[dict[str, Any]]:
        """The first ``batches`` clip batches of ``stage``'s validation set, on its device, read once and kept."""
        if self.batches is None:
            trainer = stage._trainer
            datamodule = trainer.datamodule if trainer is not None else None
            loader = [] if datamodule is None else datamodule.val_dataloader()
            self.batches = []
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)  # with the DataModule's transfer hooks
                if batch["latent"].shape[2] > 1:
                    self.batches.append(batch)
                if len(self.batches) == self.config.batches:
                    break
            if not self.batches:
                rank_zero_warn("the reward-hacking watch found no held-out clips (data.init_args.val_cache).")
        return self.batches

    @torch.no_grad()
    def rewards(self, stage: L.LightningModule, score: WatchScore) -> dict[str, float] | None:
        """Mean of each reward ``score`` returns over the held-out samples (batch i's noise seeded with
        ``seed + i``), or None without held-out clips."""
        totals: dict[str, float] = {}
        count = 0
        for i, batch in enumerate(self.held_out(stage)):
            scores = score(batch, torch.Generator().manual_seed(self.config.seed + i))
            for key, values in scores.items():
                totals[key] = totals.get(key, 0.0) + float(values.sum())
            count += batch["latent"].shape[0]
        return {key: value / count for key, value in totals.items()} if count else None

    def run(self, stage: L.LightningModule, score: WatchScore) -> None:
        """Log the held-out rewards (``rewards``) with ``stage`` at this step."""
        rewards = self.rewards(stage, score)
        if rewards is not None:
            stage.log_dict(rewards, on_step=True, on_epoch=False, batch_size=1)

"""GRPO of the distilled refiner (§2.4.3, last paragraph) with MixGRPO's sliding window (``fsvideo.grpo``).

After distillation to 8 NFE the refiner is trained with GRPO against the finetuned video reward of the ReFL stage.
No gradient goes through the FSAE decoder (the rewards only weigh the policy's log-probabilities), which is why
the report prefers it to ReFL for the refiner: far less memory (``benchmarks/grpo.py`` measures it).

Per training step (one batch of paired latents, ``datamodules.latents.EncodingVideoDataModule`` with
``low_resolution_latents: true``, as refiner training; the batch's B clips are B groups):

1. condition: the clean draft of refiner validation (the frozen upsampler on the low-resolution latent, dynamic
   mask, first frame given; no augmentation), the prompts' tokens (no CFG dropout: the distilled refiner runs
   conditionally). With several data-parallel ranks the batch of rank 0 is broadcast: every group spans the
   ranks, each holding ``group_size / world`` samples of it;
2. rollout without gradient on the refiner's recorded grid (``distilled_steps`` at ``distilled_shift``, guidance
   1, as the pipeline samples it): SDE steps inside the window, Euler steps outside (``fsvideo.grpo.rollout``);
   the given first frame stays exact and draws no noise;
3. decode the first ``decoded_latent_frames`` latent frames without gradient; the video reward scores them with
   the first frame and the prompt;
4. advantages normalised within each group (rewards gathered over ranks), clipped to ±``advantage_clip``;
5. ``updates_per_rollout`` optimizer updates: each backpropagates the loss of every window step in turn
   (clipped ratio objective + β·KL to the frozen reference, ``fsvideo.grpo.window_losses``) and steps once. The
   first update is the training step (``global_step``), later ones reuse the rollout off-policy.

Logged: ``train/reward_mean`` and ``train/reward_std`` (per group, averaged over the batch's groups),
``train/advantage_mean`` / ``_std`` / ``_abs_max``, ``train/ratio_mean`` / ``_min`` / ``_max``,
``train/clip_fraction``, ``train/kl``, ``train/window_position``, ``train/loss``; and the reward-hacking watch of
ReFL (``lightning_modules.reward_watch``): held-out clips refined with the deterministic sampler and fixed noise,
scored by the training reward (``watch/reward_video``) and a second frozen video reward (``watch/reward_watch``).

The refiner is saved as ``refiner`` with the distilled refiner's records (so the pipeline samples it the same way)
and a ``grpo`` record. No base DiT is needed (``base_dit: null``, ``conditioning.deviation: false``). Several ranks
run with FSDP2 (``ModelParallelStrategy``, ``parallel.fsdp``): each window step is its own backward pass, which
DDP's reducer refuses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy

from fsvideo.ae import FSAE
from fsvideo.distill import (
    DISTILLED_GUIDANCE_SCALE,
    DISTILLED_SHIFT,
    DISTILLED_STEPS,
    GUIDANCE_DISTILLED,
    refine_settings,
)
from fsvideo.dit import DiT, FrameCondition
from fsvideo.flow import sigma_schedule
from fsvideo.grpo import SlidingWindow, group_advantages, rollout, window_losses
from fsvideo.pretrained import load_network
from fsvideo.refl import decode_for_reward
from fsvideo.rewards import VideoReward
from fsvideo.stages import sample_conditioned
from lightning_modules.distill import RefinerDistillModule, TextConditions
from lightning_modules.refiner import RefinerModule
from lightning_modules.reward_watch import RewardWatch, RewardWatchConfig

GRPO_RECORD = "grpo"
"""Record of a saved refiner naming the reward it was trained against and the GRPO settings."""


@dataclass
class GRPOConfig:
    """GRPO's group, SDE, objective and window. The report names GRPO, MixGRPO's window and the reward only;
    every value here is ours (Flow-GRPO's and MixGRPO's defaults where they apply)."""

    group_size: int = 12
    """G: samples per condition (first frame + draft + prompt), split evenly over the data-parallel ranks."""
    eta: float = 0.7
    """η of the SDE step: the fresh noise of a step σ → σ' has std η·σ' (``fsvideo.grpo``); 0 would be the ODE.
    Flow-GRPO's noise level 0.7."""
    clip_range: float = 1e-4
    """ε of the clipped ratio ``clip(r, 1 − ε, 1 + ε)``; r is per element (Flow-GRPO's 1e-4)."""
    advantage_clip: float = 5.0
    """Advantages are clipped to ±this (Flow-GRPO's 5)."""
    kl_coefficient: float = 0.0
    """β of the KL of each window step to the frozen reference refiner (the ``init_from`` network); 0 disables it
    and holds no reference."""
    updates_per_rollout: int = 1
    """Optimizer updates per rollout (1: on-policy, the ratio is 1 and nothing is clipped; more reuse the rollout,
    where the clip acts)."""
    window: SlidingWindow = field(default_factory=SlidingWindow)
    """MixGRPO's sliding window over the refiner's steps (size, stride, interval, schedule)."""
    decoded_latent_frames: int = 16
    """Latent frames of the sample decoded for the reward, from frame 0 (16 = 61 frames, as ReFL's video reward;
    0: all)."""
    decoder_chunk_latent_frames: int = 4
    """Latent frames per decoder chunk (decoded without gradient)."""

    def __post_init__(self) -> None:
        if isinstance(self.window, dict):
            self.window = SlidingWindow(**self.window)
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}."
            )
        if not 0.0 < self.eta < 1.0:
            raise ValueError(f"eta must be in (0, 1), got {self.eta}.")
        if self.clip_range <= 0 or self.advantage_clip <= 0 or self.kl_coefficient < 0:
            raise ValueError("clip_range and advantage_clip must be positive and kl_coefficient >= 0.")
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be >= 1, got {self.updates_per_rollout}.")
        if self.decoded_latent_frames < 0 or self.decoder_chunk_latent_frames < 0:
            raise ValueError("decoded_latent_frames and decoder_chunk_latent_frames must be >= 0 (0: all).")


def repeat_condition(condition: FrameCondition, repeats: int) -> FrameCondition:
    """Each sample of ``condition`` ``repeats`` times in a row (``B`` → ``B·repeats``; groups are contiguous)."""
    return FrameCondition(
        condition.mask.repeat_interleave(repeats, dim=0),
        condition.latent.repeat_interleave(repeats, dim=0),
        condition.given,
    )


class RefinerGRPOModule(RefinerModule):
    """GRPO of the distilled refiner (module docstring).

    Args:
        video_reward: the finetuned video reward of the ReFL stage (``VideoReward`` saved-model folder or a run of
            reward finetuning).
        autoencoder: the FSAE whose decoder turns samples into pixels; None takes the one that encoded the data
            (the DataModule's ``encoders``).
        grpo: group, SDE, objective, window and decoding settings.
        watch: the held-out reward-hacking watch (``watch.reward`` None: the training video reward).
        **kwargs: ``RefinerModule``'s; ``init_from`` is the distilled refiner (stage C's export), which must record
            ``guidance_distilled``, ``distilled_steps`` and ``distilled_shift``; it is also the frozen reference of
            the KL term.
    """

    def __init__(
        self,
        video_reward: str,
        autoencoder: str | None = None,
        grpo: GRPOConfig | None = None,
        watch: RewardWatchConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.grpo = grpo or GRPOConfig()
        self.watch = watch or RewardWatchConfig()
        records = {} if self.init_snapshot is None else self.init_snapshot.records
        if DISTILLED_STEPS not in records or not records.get(GUIDANCE_DISTILLED):
            raise ValueError(
                f"init_from {self.init_from} records no step and guidance distillation; GRPO trains the distilled "
                "refiner: set init_from to the export of refiner/distill-sida."
            )
        self.sampling = refine_settings(records, None, str(self.init_from))
        self.grpo.window.last_position(self.sampling.steps)  # a window that does not fit fails here
        self.distilled_records = {
            k: records[k]
            for k in (GUIDANCE_DISTILLED, DISTILLED_GUIDANCE_SCALE, DISTILLED_STEPS, DISTILLED_SHIFT)
            if k in records
        }
        self.video_reward_path = video_reward
        self.frozen.add("video_reward", load_network(video_reward, expected=VideoReward), replicate=True)
        if self.watch.reward is not None:
            self.frozen.add(
                "watch_reward", load_network(self.watch.reward, expected=VideoReward), replicate=True
            )
        if self.grpo.kl_coefficient > 0:
            self.frozen.add_saved("reference", self.init_from, DiT, shard=self.parallel.fsdp)
        if autoencoder is not None:
            self.frozen.add("autoencoder", load_network(autoencoder, expected=FSAE), replicate=True)
        self.reward_watch = RewardWatch(self.watch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and isinstance(self.trainer.strategy, DDPStrategy):
            raise ValueError(
                "GRPO backpropagates each window step on its own, which DDP's reducer refuses (one backward per "
                "forward); for several ranks use trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy "
                "with model.init_args.parallel.fsdp: true."
            )
        if self.grpo.group_size % world:
            raise ValueError(
                f"group_size {self.grpo.group_size} is not divisible by the {world} data-parallel ranks: every rank "
                "holds the same number of samples of each group."
            )
        self.hold_data_autoencoder("GRPO")

    def dit_records(self) -> dict[str, Any]:
        grpo = {"video_reward": self.video_reward_path, **asdict(self.grpo)}
        return {**super().dit_records(), **self.distilled_records, GRPO_RECORD: grpo}

    # ---- inputs --------------------------------------------------------------------------------------------

    def group_inputs(self, batch: dict[str, Any]) -> tuple[FrameCondition, TextConditions, list[str]]:
        """The clean refiner condition, the prompts' conditions and the prompts of ``batch`` (B clips)."""
        z0 = self.normalize(batch["latent"])
        condition = self.build_condition(z0, batch, augment=False)
        return condition, self.conditions(batch, True, drop=False), list(batch["caption"])

    def rewards(self, sample: torch.Tensor, prompts: list[str], reward: str = "video_reward") -> torch.Tensor:
        """``B`` rewards of normalised samples ``B×C×t×h×w``: decoded (truncated, no gradient), scored with the
        first frame and the prompts."""
        with torch.no_grad():
            video = decode_for_reward(
                self.frozen["autoencoder"], self.normalization().denormalize(sample), self.grpo
            )
            return self.frozen[reward].score(video, video[:, :, 0], prompts).float()

    # ---- training ------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.reward_watch.due(self.global_step):
            self.reward_watch.run(self, self.watch_scores)
        cfg = self.grpo
        # 1. groups: rank 0's batch on every rank, this rank's share of each group
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:  # pickled on the CPU: a CUDA tensor would unpickle onto rank 0's device
            batch = self.trainer.strategy.broadcast(move_data_to_device(batch, "cpu"), src=0)
            batch = move_data_to_device(batch, self.device)
        per_rank = cfg.group_size // world
        condition, text, prompts = self.group_inputs(batch)
        groups = len(prompts)
        condition = repeat_condition(condition, per_rank)
        text = tuple(None if t is None else t.repeat_interleave(per_rank, dim=0) for t in text)
        prompts = [p for p in prompts for _ in range(per_rank)]

        # 2. rollout on the refiner's grid, SDE inside the window (noise differs per rank)
        generator = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, ())) + rank)
        noise = torch.randn(condition.latent.shape, generator=generator, device=self.device)
        velocity = RefinerDistillModule.velocity_fn(self.dit, condition, text, noise)
        position = cfg.window.position(self.global_step, self.sampling.steps)
        window = range(position, position + cfg.window.size)
        free = ~condition.given.to(self.device).view(1, 1, -1, 1, 1)  # the given first frame draws no noise
        sigmas = sigma_schedule(self.sampling.steps, self.sampling.shift)
        path = rollout(velocity, noise, sigmas, window, cfg.eta, generator, free)

        # 3.–4. rewards without gradient, group-relative advantages over every rank's samples
        rewards = self.rewards(condition.fix_sample(path.sample), prompts)
        stats = group_advantages(rewards.view(groups, per_rank))
        advantages = stats.advantages.flatten().clamp(-cfg.advantage_clip, cfg.advantage_clip)

        # 5. clipped objective per window step, accumulated, one optimizer step per update
        reference = None
        if cfg.kl_coefficient > 0:
            reference = RefinerDistillModule.velocity_fn(self.frozen["reference"], condition, text, noise)
        losses = []
        for update in range(cfg.updates_per_rollout):
            self.optimizers().zero_grad(set_to_none=True)
            parts = []
            for step in window_losses(
                velocity, path, advantages, cfg.eta, cfg.clip_range, free, reference, cfg.kl_coefficient
            ):
                self.manual_backward(step.loss / len(window))
                parts.append((step.loss.detach(), step.ratio, step.kl))
            loss = torch.stack([part[0] for part in parts]).mean()
            self.step_dit(loss, counts_as_step=update == 0, accumulated=True)
            losses.append(loss)
        # logged: the last update's ratios (the first update's are exactly 1)
        ratio, kl = torch.stack([part[1] for part in parts]), torch.stack([part[2] for part in parts])
        self.log_dict(
            {
                "train/loss": losses[0],
                "train/reward_mean": stats.mean.mean(),
                "train/reward_std": stats.std.mean(),
                "train/advantage_mean": advantages.mean(),
                "train/advantage_std": advantages.std(unbiased=False),
                "train/advantage_abs_max": advantages.abs().max(),
                "train/ratio_mean": ratio.mean(),
                "train/ratio_min": ratio.min(),
                "train/ratio_max": ratio.max(),
                "train/clip_fraction": ((ratio - 1).abs() > cfg.clip_range).float().mean(),
                "train/kl": kl.mean(),
                "train/window_position": float(position),
            },
            batch_size=groups,
        )
        return losses[0]

    # ---- reward-hacking watch ------------------------------------------------------------------------------

    def watch_scores(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A held-out batch refined as the pipeline does (Euler on the recorded grid, guidance 1, seeded noise),
        scored by the training reward and the watch reward (``B`` each)."""
        condition, (tokens, mask, image), prompts = self.group_inputs(batch)
        sample = sample_conditioned(
            self.inference_dit(),
            condition,
            (tokens, mask),
            (tokens, mask),  # guidance 1: the unconditional branch is never evaluated
            image,
            self.sampling.steps,
            1.0,
            self.sampling.shift,
            "euler",
            generator,
        )
        scores = {"watch/reward_video": self.rewards(sample, prompts)}
        scores["watch/reward_watch"] = (
            self.rewards(sample, prompts, "watch_reward")
            if "watch_reward" in self.frozen
            else scores["watch/reward_video"]
        )
        return scores

"""GRPO of the distilled refiner (§2.4.3): on a toy refiner with a brightness reward GRPO raises the held-out reward
without any gradient through the decoder; the module refuses an undistilled refiner and bad windows, repeats each
condition into contiguous groups, keeps the distilled records, and `fsvideo fit` of the tiny config trains against a
tiny real video reward with the ratio exactly 1 on-policy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from run_dirs import shard_data_args, tiny_fit_args
from toy_networks import CHANNELS, toy_conditions, toy_decoder, toy_dit
from two_process import SHARDED_FIT_ARGS, run_cli

from fsvideo import distill
from fsvideo.ae import FSAE
from fsvideo.dit import DiT, DiTConfig, image_to_video
from fsvideo.flow import sigma_schedule
from fsvideo.grpo import SlidingWindow, group_advantages, rollout, window_losses
from fsvideo.latent_space import LatentStats
from fsvideo.pretrained import MANIFEST_KEY, read_records
from fsvideo.refiner import RefinerTrainingConfig
from fsvideo.refl import ReFLConfig, decode_for_reward
from fsvideo.rewards import VideoReward, VideoRewardConfig
from fsvideo.stages import sample_conditioned
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig
from lightning_modules.cli import FSVideoCLI
from lightning_modules.grpo import GRPOConfig, RefinerGRPOModule, repeat_condition

DECODE = ReFLConfig(decoded_latent_frames=0, decoder_chunk_latent_frames=0)
"""Decode every latent frame in one pass (the toy clips have 3)."""

TOY_STEPS, TOY_SHIFT, GROUP, ETA, CLIP = 8, 3.0, 4, 0.7, 1e-3
TOY_GRPO_STEPS, MIN_REWARD_GAIN = 6, 0.03
"""Within TOY_GRPO_STEPS CPU steps (2 conditions × GROUP samples each, window of 2 moving every 3 steps) the
held-out brightness of deterministic samples (pixels in [-1, 1]) rises by at least MIN_REWARD_GAIN (measured in the
README, section "GRPO for the distilled refiner")."""


def brightness(autoencoder: FSAE, latent: torch.Tensor) -> torch.Tensor:
    """The toy reward: mean decoded pixel ``B``, without gradient."""
    with torch.no_grad():
        return decode_for_reward(autoencoder, latent, DECODE).mean(dim=(1, 2, 3, 4))


def velocity_of(dit: DiT, condition, c: dict[str, torch.Tensor], noise: torch.Tensor):
    def velocity(z, sigma):
        out = dit(condition.model_input(z), sigma, c["text"], c["image"], c["mask"])
        return condition.fix_velocity(out, noise)

    return velocity


@torch.no_grad()
def held_out_reward(dit: DiT, autoencoder: FSAE, c: dict[str, torch.Tensor]) -> float:
    n = c["first"].shape[0]
    condition = image_to_video(c["first"], 3, dit.config.mask_channels)
    text = (c["text"], c["mask"])
    sample = sample_conditioned(
        dit,
        condition,
        text,
        text,
        c["image"],
        TOY_STEPS,
        1.0,
        TOY_SHIFT,
        "euler",
        torch.Generator().manual_seed(0),
    )
    assert sample.shape[0] == n
    return float(brightness(autoencoder, sample).mean())


def test_toy_grpo_raises_the_held_out_reward_without_decoder_gradient():
    dit, autoencoder = toy_dit(), toy_decoder()
    train, val = toy_conditions(6, seed=1), toy_conditions(4, seed=2)
    decoder_calls: list[bool] = []
    autoencoder.decoder.register_forward_pre_hook(lambda *_: decoder_calls.append(torch.is_grad_enabled()))
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    window = SlidingWindow(size=2, stride=1, interval=3)
    sigmas = sigma_schedule(TOY_STEPS, TOY_SHIFT)
    curve = [held_out_reward(dit, autoencoder, val)]
    torch.manual_seed(0)
    for step in range(TOY_GRPO_STEPS):
        pick = [(2 * step) % 6, (2 * step + 1) % 6]
        c = {k: v[pick].repeat_interleave(GROUP, dim=0) for k, v in train.items()}
        condition = image_to_video(c["first"], 3, dit.config.mask_channels)
        noise = torch.randn(2 * GROUP, CHANNELS, 3, 1, 1)
        velocity = velocity_of(dit, condition, c, noise)
        start = window.position(step, TOY_STEPS)
        free = ~condition.given.view(1, 1, -1, 1, 1)
        path = rollout(velocity, noise, sigmas, range(start, start + window.size), ETA, free=free)
        rewards = brightness(autoencoder, condition.fix_sample(path.sample))
        advantages = group_advantages(rewards.view(2, GROUP)).advantages.flatten()
        optimizer.zero_grad()
        for loss in window_losses(velocity, path, advantages, ETA, CLIP, free):
            (loss.loss / window.size).backward()
        optimizer.step()
        curve.append(held_out_reward(dit, autoencoder, val))
    print("held-out brightness per GRPO step:", " ".join(f"{r:+.4f}" for r in curve))
    assert decoder_calls and not any(decoder_calls)  # the decoder never ran with autograd on
    assert curve[-1] >= curve[0] + MIN_REWARD_GAIN


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A random tiny refiner recorded as distilled to 8 steps at shift 3 (and the same without records), and a
    random upsampler, as saved-model folders."""
    root = tmp_path_factory.mktemp("grpo_parts")
    dit = toy_dit()
    stats = {"latent_stats": LatentStats([0.2] * CHANNELS, [1.5] * CHANNELS, 0).record()}
    distilled = {distill.GUIDANCE_DISTILLED: True, distill.DISTILLED_STEPS: 8, distill.DISTILLED_SHIFT: 3.0}
    upsampler = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=CHANNELS))
    return {
        "undistilled": dit.save_pretrained(root / "undistilled", records=stats),
        "refiner": dit.save_pretrained(root / "distilled" / "refiner", records={**stats, **distilled}),
        "upsampler": upsampler.save_pretrained(root / "upsampler"),
    }


@pytest.fixture(scope="module")
def video_reward(tiny_reward_models, tmp_path_factory) -> Path:
    config = VideoRewardConfig(
        backbone=str(tiny_reward_models["qwen2_vl"]),
        input_fps=8.0,
        sample_fps=8.0,
        frame_height=56,
        frame_width=56,
    )
    return VideoReward.from_backbone(config).save_pretrained(
        tmp_path_factory.mktemp("grpo_reward") / "video_reward"
    )


def make_module(parts, video_reward, refiner: str = "refiner", **grpo) -> RefinerGRPOModule:
    return RefinerGRPOModule(
        video_reward=str(video_reward),
        grpo=GRPOConfig(**grpo),
        base_dit=None,  # GRPO refines the clean draft: no base DiT held
        upsampler=str(parts["upsampler"]),
        conditioning=RefinerTrainingConfig(deviation=False),
        dit=DiTConfig.tiny(),
        init_from=str(parts[refiner]),
        ema_decay=0,
    )


def test_module_checks_its_refiner_and_window_and_keeps_the_distilled_records(parts, video_reward):
    with pytest.raises(ValueError, match="records no step and guidance distillation"):
        make_module(parts, video_reward, refiner="undistilled")
    with pytest.raises(ValueError, match="does not fit"):
        make_module(parts, video_reward, window=SlidingWindow(size=8))
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="conditioning.deviation"):
        RefinerGRPOModule(
            video_reward=str(video_reward),
            base_dit=None,
            upsampler=str(parts["upsampler"]),
            dit=DiTConfig.tiny(),
            init_from=str(parts["refiner"]),
        )
    module = make_module(parts, video_reward, kl_coefficient=0.1, window={"size": 3, "schedule": "fixed"})
    assert (module.sampling.steps, module.sampling.shift, module.sampling.guidance_scale) == (8, 3.0, 1.0)
    assert (
        "reference" in module.frozen and "video_reward" in module.frozen and "base_dit" not in module.frozen
    )
    records = module.dit_records()
    assert records[distill.DISTILLED_STEPS] == 8 and records[distill.GUIDANCE_DISTILLED] is True
    assert records["grpo"]["window"]["size"] == 3 and records["grpo"]["video_reward"] == str(video_reward)
    assert distill.refine_settings(records, None, "grpo").steps == 8  # the pipeline samples it as before
    assert list(module.saved_networks()) == ["refiner"]
    assert not any("reward" in k or "reference" in k for k in module.state_dict())
    condition = image_to_video(torch.arange(2.0).view(2, 1, 1, 1, 1).expand(2, CHANNELS, 1, 1, 1), 3)
    repeated = repeat_condition(condition, 3)
    assert repeated.latent[:, 0, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]  # groups are contiguous


def grpo_fit_args(parts, video_reward, run_dir: Path) -> list[str]:
    """A 2-step `fsvideo fit` of configs/tiny/refiner-grpo.yaml from the distilled refiner of ``parts``."""
    return [
        *tiny_fit_args("refiner-grpo.yaml", run_dir, 2),
        f"--model.init_args.init_from={parts['refiner']}",
        f"--model.init_args.video_reward={video_reward}",
        f"--model.init_args.upsampler={parts['upsampler']}",
        "--model.init_args.dit.latent_channels=8",
    ]


@pytest.mark.slow
def test_fit_of_the_tiny_config_trains_against_a_video_reward(
    parts, video_reward, tiny_latents, sample_shards, tmp_path
):
    """`fsvideo fit` of configs/tiny/refiner-grpo.yaml: finite rewards, on-policy ratio exactly 1 and nothing
    clipped, the watch logged, rewards and reference out of the checkpoint, the refiner exported with its records."""
    run_dir = tmp_path / "run"
    cli = FSVideoCLI(
        args=[
            *grpo_fit_args(parts, video_reward, run_dir),
            "--model.init_args.grpo.updates_per_rollout=1",
            "--model.init_args.watch.every_n_steps=1",
            *shard_data_args(tiny_latents, sample_shards, batches_per_epoch=2, val_shards=sample_shards.val),
        ]
    )
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("train/reward_mean", "train/reward_std", "train/kl", "watch/reward_watch", "train/loss"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/ratio_min"]) == float(metrics["train/ratio_max"]) == 1.0  # on-policy
    assert float(metrics["train/clip_fraction"]) == 0.0
    assert abs(float(metrics["train/advantage_mean"])) < 1e-5
    assert float(metrics["train/window_position"]) == 0.0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(checkpoint[MANIFEST_KEY]) == ["refiner"]
    assert not any("reward" in k or "reference" in k or "upsampler" in k for k in checkpoint["state_dict"])
    records = read_records(run_dir / "export" / "refiner")
    assert records[distill.DISTILLED_STEPS] == 8 and records["grpo"]["group_size"] == 4


@pytest.mark.slow
def test_groups_span_two_sharded_gloo_ranks(parts, video_reward, tiny_latents, sample_shards, tmp_path):
    """`fsvideo fit` on two CPU processes (FSDP2 over gloo): each rank draws 2 of the group's 4 samples, the batch
    of rank 0 broadcast, the rewards gathered; the run trains and exports one refiner."""
    run_dir = tmp_path / "run"
    run_cli(
        [
            *grpo_fit_args(parts, video_reward, run_dir),
            *SHARDED_FIT_ARGS,
            "--model.init_args.watch.every_n_steps=0",
            *shard_data_args(tiny_latents, sample_shards, batches_per_epoch=2),
        ],
        cwd=tmp_path,
    )
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and list(checkpoint[MANIFEST_KEY]) == ["refiner"]
    assert read_records(run_dir / "export" / "refiner")[distill.DISTILLED_STEPS] == 8

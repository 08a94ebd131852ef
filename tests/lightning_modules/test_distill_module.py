"""The refiner-distillation modules (§2.4.3): the CFG target with the pipeline's unconditional branch, the
progressive target and its round check, the SiDA networks and their one fake-score forward, the three tiny fits
chained by init_from, each keeping its teacher out of its checkpoint, and SiDA sharded (FSDP2) and
context-parallel over two gloo processes against one process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from two_process import SHARDED_FIT_ARGS, run_cli

from callbacks.loss_history import read_loss_history
from fsvideo import distill
from fsvideo.dit import DiT, DiTConfig
from fsvideo.flow import interpolate, pseudo_huber_loss
from fsvideo.latent_space import LatentStats
from fsvideo.pretrained import MANIFEST_KEY, read_records
from fsvideo.refiner import RefinerTrainingConfig
from fsvideo.stages import SamplingSettings
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig
from lightning_modules.cli import FSVideoCLI
from lightning_modules.distill import (
    RefinerCFGDistillModule,
    RefinerProgressiveDistillModule,
    RefinerSiDAModule,
)

REPO = Path(__file__).resolve().parents[2]
CHANNELS, TEXT_LEN = 8, 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A random DiT (base DiT and refiner alike, with latent statistics), the same DiT recorded as CFG-distilled
    and progressively distilled for 32 steps, and a random upsampler, as saved-model folders."""
    root = tmp_path_factory.mktemp("distill_parts")
    torch.manual_seed(0)
    dit = DiT(DiTConfig.tiny())
    with torch.no_grad():  # off the zero-initialised head, so the DiT predicts something
        for param in dit.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    stats = {"latent_stats": LatentStats([0.2] * CHANNELS, [1.5] * CHANNELS, 0).record()}
    distilled = {distill.GUIDANCE_DISTILLED: True, distill.DISTILLED_STEPS: 32, distill.DISTILLED_SHIFT: 3.0}
    upsampler = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=CHANNELS))
    return {
        "refiner": dit.save_pretrained(root / "refiner", records=stats),
        "distilled": dit.save_pretrained(root / "distilled" / "refiner", records={**stats, **distilled}),
        "upsampler": upsampler.save_pretrained(root / "upsampler"),
    }


def make_module(cls, parts, teacher: str = "refiner", **kwargs):
    module = cls(
        teacher=str(parts[teacher]),
        base_dit=str(parts["refiner"]),
        upsampler=str(parts["upsampler"]),
        conditioning=RefinerTrainingConfig(deviation=False),
        dit=DiTConfig.tiny(),
        init_from=str(parts[teacher]),
        ema_decay=0,
        **kwargs,
    )
    module.set_empty_text(torch.randn(1, TEXT_LEN, 32), torch.ones(1, TEXT_LEN, dtype=torch.bool))
    return module


def make_batch(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent": 0.2 + 1.5 * torch.randn(batch, CHANNELS, 4, 4, 4, generator=g),
        "latent_low": 0.2 + 1.5 * torch.randn(batch, CHANNELS, 4, 2, 2, generator=g),
        "text_tokens": torch.randn(batch, TEXT_LEN, 32, generator=g),
        "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool),
        "image_tokens": torch.randn(batch, 5, 32, generator=g),
        "is_image": torch.zeros(batch, dtype=torch.bool),
    }


@torch.no_grad()
def test_cfg_target_is_the_teachers_guided_velocity_with_the_pipelines_unconditional_branch(parts):
    module = make_module(RefinerCFGDistillModule, parts, guidance_scale=4.0)
    batch = make_batch()
    torch.manual_seed(5)
    loss = module.distill_loss(module.dit, batch, augment=False)
    # directly: the same draws (noise, then σ); v_u with the empty prompt and the same image tokens and latent input
    z0 = module.normalize(batch["latent"])
    condition = module.build_condition(z0, batch, augment=False)
    torch.manual_seed(5)
    noise = torch.randn_like(z0)
    sigma = module.sample_sigma(z0)
    latent_in = condition.model_input(interpolate(z0, noise, sigma))
    teacher = module.frozen["teacher"]
    text = batch["text_tokens"], batch["image_tokens"], batch["text_mask"]
    empty = (
        module.empty_text_tokens.expand(2, -1, -1),
        batch["image_tokens"],
        module.empty_text_mask.expand(2, -1),
    )
    v_c, v_u = teacher(latent_in, sigma, *text), teacher(latent_in, sigma, *empty)
    student = module.dit(latent_in, sigma, *text)
    expected = pseudo_huber_loss(student[:, :, 1:], (v_u + 4.0 * (v_c - v_u))[:, :, 1:])
    torch.testing.assert_close(loss, expected)
    # at guidance 1 the target is the conditional velocity, which the student starts as
    plain = make_module(RefinerCFGDistillModule, parts, guidance_scale=1.0)
    assert abs(plain.distill_loss(plain.dit, batch, augment=False)) < 1e-6
    assert module.dit_records()[distill.GUIDANCE_DISTILLED] is True
    assert module.dit_records()[distill.DISTILLED_GUIDANCE_SCALE] == 4.0


def test_progressive_round_follows_its_teachers_records(parts):
    with pytest.raises(ValueError, match="distilled for 32 steps"):
        make_module(RefinerProgressiveDistillModule, parts, teacher="distilled", teacher_steps=64, shift=3.0)
    module = make_module(
        RefinerProgressiveDistillModule, parts, teacher="distilled", teacher_steps=32, shift=3.0
    )
    records = module.dit_records()
    assert records[distill.DISTILLED_STEPS] == 16 and records[distill.DISTILLED_SHIFT] == 3.0
    assert records[distill.GUIDANCE_DISTILLED] is True  # carried over from the teacher
    assert distill.refine_settings(records, None, "student") == SamplingSettings(16, 1.0, 3.0, "euler")
    loss = module.distill_loss(module.dit, make_batch(), augment=True)
    assert loss.requires_grad and math.isfinite(loss.item())


def test_sida_networks_start_from_the_teacher_and_only_the_generator_is_saved(parts):
    module = make_module(RefinerSiDAModule, parts, teacher="distilled")
    teacher = module.frozen["teacher"]
    for own, fake, frozen in zip(
        module.dit.parameters(), module.fake_score.parameters(), teacher.parameters()
    ):
        assert torch.equal(own, frozen) and torch.equal(fake, frozen)
    assert all(p.requires_grad for p in module.fake_score.parameters())
    assert list(module.saved_networks()) == ["refiner"]
    assert module.feature_block == DiTConfig.tiny().num_layers // 2
    records = module.dit_records()
    assert (records[distill.DISTILLED_STEPS], records[distill.DISTILLED_SHIFT]) == (8, 3.0)
    assert not any(name.startswith("frozen") or "teacher" in name for name in module.state_dict())
    # the generator's loss reaches the generator only through the sample, the fake score not at all
    with torch.no_grad():
        loss = module.distill_loss(module.dit, make_batch(), augment=False)
    assert math.isfinite(loss.item())


@torch.no_grad()
def test_sida_fake_score_features_of_several_latents_are_those_of_one_forward_each(parts):
    module = make_module(RefinerSiDAModule, parts, teacher="distilled")
    batch = make_batch()
    z0, condition, text = module.distill_inputs(batch, augment=False)
    module.discriminator.linear.weight.normal_()  # off its zero start, so the logits differ per token
    sigma, latents = torch.tensor([0.3, 0.8]), [torch.randn_like(z0), torch.randn_like(z0)]
    velocities, logits = module.fake_score_features(latents, sigma, condition, text)
    for z, velocity, logit in zip(latents, velocities, logits):
        (alone,), (alone_logits,) = module.fake_score_features([z], sigma, condition, text)
        assert logit.shape == (2, z0[0, 0].numel())
        torch.testing.assert_close(velocity, alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logit, alone_logits, rtol=1e-4, atol=1e-5)  # batch-size rounding


@pytest.mark.slow
def test_tiny_distillation_fits_chain_and_keep_teachers_out_of_checkpoints(
    parts, tiny_latents, sample_shards, tmp_path
):
    encoders = {
        "autoencoder": str(tiny_latents.fsae_run),
        "text_encoder": str(tiny_latents.encoders["text"]),
        "image_encoder": str(tiny_latents.encoders["image"]),
        "text_len": TEXT_LEN,
    }
    teacher = parts["refiner"]
    for stage in ("cfg", "progressive", "sida"):
        run_dir = tmp_path / stage
        FSVideoCLI(
            args=[
                "fit",
                "--config",
                str(REPO / f"configs/tiny/refiner-distill-{stage}.yaml"),
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[{class_path: callbacks.loss_history.LossHistory}, {class_path: callbacks.export.ExportNetworks}]",
                "--wandb.mode=disabled",
                f"--model.init_args.init_from={teacher}",
                f"--model.init_args.teacher={teacher}",
                f"--model.init_args.base_dit={parts['refiner']}",
                f"--model.init_args.upsampler={parts['upsampler']}",
                "--model.init_args.dit.latent_channels=8",
                f"--data.init_args.encoders={yaml.safe_dump(encoders, default_flow_style=True).strip()}",
                f"--data.init_args.latent_stats={tiny_latents.train.root / 'stats.json'}",
                f"--data.init_args.train_shards={sample_shards.root / 'train-000000.tar'}",
                "--data.init_args.val_shards=null",
                "--data.init_args.num_frames=5",
                "--data.init_args.buckets.size=128",
                "--data.init_args.num_workers=0",
                "--data.init_args.batches_per_epoch=2",
            ]
        )
        steps, losses = read_loss_history(run_dir)
        assert steps.tolist() == [1, 2] and all(math.isfinite(x) for x in losses)
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert list(checkpoint[MANIFEST_KEY]) == ["refiner"]
        keys = checkpoint["state_dict"]
        assert not any("teacher" in k or "base_dit" in k or "upsampler" in k for k in keys)
        assert any(k.startswith("fake_score.") for k in keys) == (stage == "sida")
        teacher = run_dir / "export" / "refiner"  # the next stage's teacher and init_from
        assert (teacher / "config.json").is_file()
    records = read_records(teacher)
    assert distill.refine_settings(records, None, str(teacher)) == SamplingSettings(8, 1.0, 3.0, "euler")


def sida_fit(
    parts, tiny_latents, sample_shards, run_dir: Path, *args: str, in_process: bool = False
) -> np.ndarray:
    """The per-step generator losses of a 2-step tiny SiDA ``fsvideo fit`` (noise and σ from the same seed
    whatever the number of processes: ``ReseedAtTrainStart``)."""
    encoders = {
        "autoencoder": str(tiny_latents.fsae_run),
        "text_encoder": str(tiny_latents.encoders["text"]),
        "image_encoder": str(tiny_latents.encoders["image"]),
        "text_len": TEXT_LEN,
    }
    run_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs/tiny/refiner-distill-sida.yaml"),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=100",
            "--trainer.callbacks=[callbacks.loss_history.LossHistory, two_process.ReseedAtTrainStart]",
            "--wandb.mode=disabled",
            f"--model.init_args.init_from={parts['distilled']}",
            f"--model.init_args.teacher={parts['distilled']}",
            f"--model.init_args.base_dit={parts['refiner']}",
            f"--model.init_args.upsampler={parts['upsampler']}",
            "--model.init_args.dit.latent_channels=8",
            "--model.init_args.optimizer.warmup_steps=0",
            "--model.init_args.sida.fake_score_optimizer.warmup_steps=0",
            f"--data.init_args.encoders={yaml.safe_dump(encoders, default_flow_style=True).strip()}",
            f"--data.init_args.latent_stats={tiny_latents.train.root / 'stats.json'}",
            f"--data.init_args.train_shards={sample_shards.root / 'train-000000.tar'}",
            "--data.init_args.val_shards=null",
            "--data.init_args.num_frames=5",
            "--data.init_args.buckets.size=128",
            "--data.init_args.num_workers=0",
            "--data.init_args.batches_per_epoch=2",
            *args,
        ],
        cwd=run_dir.parent,
        in_process=in_process,
    )
    steps, losses = read_loss_history(run_dir)
    assert steps.tolist() == [1, 2] and np.isfinite(losses).all()
    return losses


@pytest.mark.slow
def test_sida_fit_sharded_and_context_parallel_matches_one_process(
    parts, tiny_latents, sample_shards, tmp_path
):
    """dp1 × cp2 over two gloo processes, FSDP sharding the generator, the fake score and the discriminator
    head over both ranks, which read the same sample and split its tokens: the per-step losses are those of one
    process — the second step's through the first step's updates of all three networks (the head's and the fake
    score's gradients averaged over the ranks by FSDP)."""
    one = sida_fit(parts, tiny_latents, sample_shards, tmp_path / "one", in_process=True)
    two = sida_fit(
        parts,
        tiny_latents,
        sample_shards,
        tmp_path / "cp2",
        *SHARDED_FIT_ARGS,
        "--model.init_args.parallel.context_parallel=2",
    )
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)

"""`fsvideo fit` with context parallel over two gloo processes (dp1 × cp2: both ranks see the same sample, FSDP
shards over both) gives the per-step losses of one process training on its own: the tiny base DiT, the tiny
refiner with its frozen base DiT (sharded and context-parallel too) and upsampler, and CFG distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from run_dirs import latent_cache_args, shard_data_args, tiny_fit_args, write_dit_stage_checkpoint
from two_process import SHARDED_FIT_ARGS, run_cli

from callbacks.loss_history import read_loss_history
from fsvideo.dit import DiT, DiTConfig
from fsvideo.latent_space import LatentStats
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-5
"""Float32 per-step losses of a few AdamW steps: the split computation rounds differently (about 1e-7 a step)."""

CONTEXT_PARALLEL_ARGS = (*SHARDED_FIT_ARGS, "--model.init_args.parallel.context_parallel=2")


def fit(run_dir: Path, config: str, steps: int, *args: str) -> np.ndarray:
    """The per-step losses of ``fsvideo fit --config configs/tiny/<config> *args`` (noise and σ drawn from the
    same seed whatever the number of processes: ``ReseedAtTrainStart``)."""
    run_cli(
        [
            *tiny_fit_args(config, run_dir, steps),
            "--checkpoint.every_n_train_steps=100",
            "--trainer.callbacks=[callbacks.loss_history.LossHistory, two_process.ReseedAtTrainStart]",
            "--model.init_args.dit.latent_channels=8",
            "--model.init_args.optimizer.warmup_steps=0",
            *args,
        ],
        cwd=run_dir.parent,
    )
    logged_steps, losses = read_loss_history(run_dir)
    assert list(logged_steps) == list(range(1, steps + 1))
    return losses


def test_context_parallel_fit_matches_one_process(tiny_latents, tmp_path):
    init_from = tmp_path / "init.ckpt"
    write_dit_stage_checkpoint(init_from)
    data = [*latent_cache_args(tiny_latents.train.root), f"--model.init_args.init_from={init_from}"]
    one = fit(tmp_path / "one", "dit-pretrain-video.yaml", 4, *data)
    two = fit(tmp_path / "cp2", "dit-pretrain-video.yaml", 4, *data, *CONTEXT_PARALLEL_ARGS)
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_TOLERANCE)


def refiner_args(tiny_latents, sample_shards, directory: Path) -> list[str]:
    """Arguments of a tiny refiner-stage fit: a random DiT (the refiner's start, its frozen base DiT and a
    distillation teacher), a random upsampler, the tiny encoders and a sample shard decoded at 128²."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig.tiny())
    with torch.no_grad():  # off the zero-initialised head, so the DiT predicts something
        for param in dit.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    stats = LatentStats([0.2] * 8, [1.5] * 8, 0)
    dit_dir = dit.save_pretrained(directory / "dit", records={"latent_stats": stats.record()})
    upsampler = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=8)).save_pretrained(
        directory / "up"
    )
    return [
        f"--model.init_args.init_from={dit_dir}",
        f"--model.init_args.base_dit={dit_dir}",
        f"--model.init_args.upsampler={upsampler}",
        *shard_data_args(tiny_latents, sample_shards, batches_per_epoch=3),
    ]


def test_context_parallel_refiner_fit_matches_one_process(tiny_latents, sample_shards, tmp_path):
    args = refiner_args(tiny_latents, sample_shards, tmp_path)
    one = fit(tmp_path / "one", "refiner-pretrain.yaml", 3, *args)
    two = fit(tmp_path / "cp2", "refiner-pretrain.yaml", 3, *args, *CONTEXT_PARALLEL_ARGS)
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_TOLERANCE)


def test_context_parallel_cfg_distillation_matches_one_process(tiny_latents, sample_shards, tmp_path):
    """CFG distillation: the student trains against the guided velocity of the frozen teacher; the student,
    the teacher and the base DiT run context-parallel."""
    args = refiner_args(tiny_latents, sample_shards, tmp_path)
    teacher = args[0].split("=", 1)[1]
    args += [f"--model.init_args.teacher={teacher}"]
    one = fit(tmp_path / "one", "refiner-distill-cfg.yaml", 2, *args)
    two = fit(tmp_path / "cp2", "refiner-distill-cfg.yaml", 2, *args, *CONTEXT_PARALLEL_ARGS)
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_TOLERANCE)

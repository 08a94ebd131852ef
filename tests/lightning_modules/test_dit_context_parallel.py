"""`fsvideo fit` of the tiny DiT with context parallel over two gloo processes (dp1 × cp2: both ranks see the
same sample, FSDP shards over both) gives the per-step losses of one process training on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from two_process import REPO, SHARDED_FIT_ARGS, run_cli

from callbacks.loss_history import read_loss_history
from fsvideo.dit import DiTConfig
from fsvideo.latent_space import LatentStats
from lightning_modules.dit import DiTModule

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-5
"""Float32 per-step losses of 4 AdamW steps: the split computation rounds differently (about 1e-7 a step)."""


def fit(run_dir: Path, cache: Path, init_from: Path, *parallel: str) -> np.ndarray:
    args = [
        "fit",
        "--config",
        str(REPO / "configs/tiny/dit-pretrain-video.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.max_steps=4",
        *parallel,
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_train_steps=100",
        "--trainer.callbacks=[callbacks.loss_history.LossHistory, two_process.ReseedAtTrainStart]",
        "--wandb.mode=disabled",
        f"--data.init_args.train_cache={cache}",
        "--data.init_args.val_cache=null",
        "--data.init_args.image_fraction=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=4",
        f"--model.init_args.init_from={init_from}",
        "--model.init_args.dit.latent_channels=8",
        "--model.init_args.optimizer.warmup_steps=0",
    ]
    run_cli(args, cwd=run_dir.parent)
    steps, losses = read_loss_history(run_dir)
    assert list(steps) == [1, 2, 3, 4]
    return losses


def test_context_parallel_fit_matches_one_process(tiny_latents, tmp_path):
    torch.manual_seed(1)
    source = DiTModule(DiTConfig.tiny(), ema_decay=0.9)
    source.set_latent_stats(LatentStats([0.0] * 8, [1.0] * 8, 1))
    init_from = tmp_path / "init.ckpt"
    torch.save({"state_dict": source.state_dict(), "networks": source.network_manifest()}, init_from)
    cache = tiny_latents.train.root

    one = fit(tmp_path / "one", cache, init_from)
    two = fit(
        tmp_path / "cp2",
        cache,
        init_from,
        *SHARDED_FIT_ARGS,
        "--model.init_args.parallel.context_parallel=2",
    )
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_TOLERANCE)

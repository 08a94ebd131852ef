"""`fsvideo fit` with context parallel over two gloo processes (dp1 × cp2: both ranks see the same sample, FSDP
shards over both) gives the per-step losses of one process training on its own: the tiny base DiT. The refiner
stages (a frozen base DiT and teacher sharded and context-parallel too) are checked by the SiDA fit of
``test_distill_module.py``, which holds all of them and two trained networks more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from run_dirs import latent_cache_args, tiny_fit_args, write_dit_stage_checkpoint
from two_process import SHARDED_FIT_ARGS, run_cli

from callbacks.loss_history import read_loss_history

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-5
"""Float32 per-step losses of a few AdamW steps: the split computation rounds differently (about 1e-7 a step)."""

CONTEXT_PARALLEL_ARGS = (*SHARDED_FIT_ARGS, "--model.init_args.parallel.context_parallel=2")


def fit(run_dir: Path, config: str, steps: int, *args: str, in_process: bool = False) -> np.ndarray:
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
        in_process=in_process,
    )
    logged_steps, losses = read_loss_history(run_dir)
    assert list(logged_steps) == list(range(1, steps + 1))
    return losses


def test_context_parallel_fit_matches_one_process(tiny_latents, tmp_path):
    init_from = tmp_path / "init.ckpt"
    write_dit_stage_checkpoint(init_from)
    data = [*latent_cache_args(tiny_latents.train.root), f"--model.init_args.init_from={init_from}"]
    one = fit(tmp_path / "one", "dit-pretrain-video.yaml", 4, *data, in_process=True)
    two = fit(tmp_path / "cp2", "dit-pretrain-video.yaml", 4, *data, *CONTEXT_PARALLEL_ARGS)
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_TOLERANCE)

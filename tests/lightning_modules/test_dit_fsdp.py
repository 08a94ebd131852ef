"""Paper-scale DiT training path on the CPU: `fsvideo fit` with two processes, FSDP2
(`model.init_args.parallel.fsdp` through `fsvideo.parallel`, ModelParallelStrategy over gloo) builds the DiT and
its EMA twin on the meta device, materialises each rank's shards, loads `init_from` into them, trains, writes
one full checkpoint file, and resumes from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from run_dirs import latent_cache_args, tiny_fit_args, write_dit_stage_checkpoint
from two_process import SHARDED_FIT_ARGS, run_cli

pytestmark = pytest.mark.slow


def fit(run_dir: Path, cache: Path, init_from: Path, max_steps: int, *extra: str) -> None:
    args = [
        *tiny_fit_args("dit-pretrain-video.yaml", run_dir, max_steps),
        *SHARDED_FIT_ARGS,
        "--trainer.precision=bf16-mixed",  # as the paper configs
        "--trainer.callbacks=[]",
        "--checkpoint.every_n_train_steps=2",
        *latent_cache_args(cache),
        f"--model.init_args.init_from={init_from}",
        "--model.init_args.dit.latent_channels=8",
        "--model.init_args.ema_decay=1.0",
        "--model.init_args.optimizer.warmup_steps=0",
        *extra,
    ]
    run_cli(args, cwd=run_dir.parent)


def test_sharded_dit_trains_saves_one_file_and_resumes(tiny_latents, tmp_path):
    init_from = tmp_path / "init.ckpt"
    source = write_dit_stage_checkpoint(init_from)
    start = {k: v for k, v in source.state_dict().items() if k.startswith("dit.")}
    run_dir = tmp_path / "run"

    # EMA decay 1: the EMA twin keeps the weights loaded into the shards, while the DiT itself trains
    fit(run_dir, tiny_latents.train.root, init_from, 2)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    state = first["state_dict"]
    assert all(type(v) is torch.Tensor for v in state.values()), "a plain (gathered) checkpoint, no DTensors"
    for name, tensor in start.items():
        assert torch.equal(state[name.replace("dit.", "dit_ema.", 1)], tensor), name
    moved = [not torch.equal(state[k], v) for k, v in start.items()]
    assert sum(moved) > len(moved) // 2, "the sharded DiT must train"

    fit(run_dir, tiny_latents.train.root, init_from, 4, "--ckpt_path=last")
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    moved = [not torch.equal(resumed["state_dict"][k], state[k]) for k in start]
    assert sum(moved) > len(moved) // 2, "the resumed run must go on training"
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values() if v.is_floating_point())

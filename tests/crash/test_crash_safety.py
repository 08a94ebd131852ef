"""A run killed with SIGKILL — mid-epoch, or while writing a checkpoint — resumes with `--ckpt_path last`
and loses at most the steps since its last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run_command

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def fit(sample_shards, run_dir: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        "--config",
        str(REPO / "configs/tiny/fsae-stage1.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_train_steps=2",
        "--wandb.mode=disabled",
        f"--data.init_args.train_shards={sample_shards.train}",
        "--data.init_args.val_shards=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=20",
        "--data.init_args.buckets.size=64",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{REPO}"}
    return run_command(command, cwd=run_dir.parent, env=env, timeout=600)


def last_step(run_dir: Path) -> int:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["global_step"]


def test_sigkill_mid_epoch_then_resume(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    killed = fit(
        sample_shards,
        run_dir,
        8,
        "--trainer.callbacks+=crash_plugins.KillAtStep",
        "--trainer.callbacks.step=5",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert last_step(run_dir) == 4, "the last checkpoint before the kill (every 2 steps) must be intact"

    resumed = fit(sample_shards, run_dir, 8, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert last_step(run_dir) == 8


def test_sigkill_while_saving_leaves_the_previous_checkpoint(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    # saves come in pairs (step-N.ckpt, last.ckpt): the 3rd save is step 4's first file
    killed = fit(
        sample_shards,
        run_dir,
        8,
        "--trainer.plugins=crash_plugins.KillDuringSave",
        "--trainer.plugins.kill_at_save=3",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((run_dir / "checkpoints").glob(".*.tmp-*")), "the torn write should be a temp file only"
    assert last_step(run_dir) == 2

    resumed = fit(sample_shards, run_dir, 6, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_step(run_dir) == 6

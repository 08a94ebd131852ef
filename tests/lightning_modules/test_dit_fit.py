"""`fsvideo fit` of the tiny DiT on a latent cache: finite losses, checkpoint, per-step loss history, router
heatmap, deterministic fixed-σ validation, and a resume that continues the loss history."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from run_dirs import tiny_latent_encoders

from callbacks.loss_history import read_loss_history
from lightning_modules.cli import FSVideoCLI

REPO = Path(__file__).resolve().parents[2]
# The test FSAE has 8 latent channels (run_dirs.SMALL_FSAE); the tiny encoders' widths are the configs'.
SMALL_LATENT = ["--model.init_args.dit.latent_channels=8"]
VIDEO = "configs/tiny/dit-pretrain-video.yaml"
FROM_SCRATCH = "--model.init_args.init_from=null"


def dit_fit_args(config: str, run_dir: Path, latents, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / config),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false",
        "--wandb.mode=disabled",
        f"--data.init_args.train_cache={latents.train.root}",
        f"--data.init_args.val_cache={latents.val.root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=3",
        "--data.init_args.val_batches=1",
        *SMALL_LATENT,
        *extra,
    ]


def test_fit_logs_losses_heatmap_and_resumes(tiny_latents, tmp_path):
    run_dir = tmp_path / "run"
    cli = FSVideoCLI(args=dit_fit_args(VIDEO, run_dir, tiny_latents, 3, FROM_SCRATCH))
    assert cli.trainer.global_step == 3

    steps, losses = read_loss_history(run_dir)
    assert steps.tolist() == [1, 2, 3]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert (run_dir / "router_heatmaps" / "step-0000003.png").stat().st_size > 1000

    metrics = cli.trainer.callback_metrics
    val_loss = float(metrics["val/loss"])
    assert math.isfinite(val_loss) and val_loss > 0
    per_sigma = [float(metrics[f"val/loss_sigma_{s:.2f}"]) for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert math.isclose(sum(per_sigma) / 5, val_loss, rel_tol=1e-5)
    # fixed σ and seeded noise: validating the same weights twice gives the same numbers
    again = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert again["val/loss"] == val_loss

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.allclose(state["latent_mean"], torch.tensor(tiny_latents.train.stats.mean))
    assert any(k.startswith("dit_ema.") for k in state)

    FSVideoCLI(args=[*dit_fit_args(VIDEO, run_dir, tiny_latents, 5, FROM_SCRATCH), "--ckpt_path=last"])
    steps, losses = read_loss_history(run_dir)
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_fit_on_video_shards_encodes_on_the_fly(tiny_latents, sample_shards, tmp_path):
    """The same stage config with ``data`` swapped for EncodingVideoDataModule: no cache, same batches; run
    under bf16 autocast with gradient checkpointing, as the paper configs train."""
    data = {
        "class_path": "datamodules.latents.EncodingVideoDataModule",
        "init_args": {
            "encoders": tiny_latent_encoders(tiny_latents),
            "latent_stats": str(tiny_latents.train.root / "stats.json"),
            "train_shards": str(sample_shards.root / "train-000000.tar"),
            "num_frames": 5,
            "buckets": {"size": 64},
            "image_fraction": 0.0,
        },
    }
    (tmp_path / "raw.yaml").write_text(yaml.safe_dump({"data": data}))
    run_dir = tmp_path / "run"
    args = dit_fit_args(VIDEO, run_dir, tiny_latents, 2, FROM_SCRATCH, "--config", str(tmp_path / "raw.yaml"))
    args = [a for a in args if "_cache=" not in a and "val_batches" not in a]
    extra = ["--trainer.precision=bf16-mixed", "--model.init_args.parallel.activation_checkpointing=true"]
    cli = FSVideoCLI(args=[*args, "--trainer.limit_val_batches=0", *extra])
    assert type(cli.datamodule).__name__ == "EncodingVideoDataModule"
    steps, losses = read_loss_history(run_dir)
    assert steps.tolist() == [1, 2] and all(math.isfinite(x) for x in losses)

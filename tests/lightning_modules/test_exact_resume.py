"""`fsvideo fit … --ckpt_path last` continues the same run: N steps straight and N/2 + resume + N/2 from a
mid-epoch checkpoint give the same per-step losses, the same samples and the same final weights, for the FSAE
with its GAN on and for the DiT (issue 8). One DataLoader worker, so the persistent worker stream, its
held-back samples and the cursors that travel from the worker are all on the path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules.cli import FSVideoCLI

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 6  # two epochs of 4 batches would start at 0 and 4; the checkpoint at 3 is mid-epoch


def fit(config: str, run_dir: Path, max_steps: int, *extra: str) -> None:
    FSVideoCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "configs" / "tiny" / f"{config}.yaml"),
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.max_steps={max_steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=step_recorder.StepRecorder",
            "--checkpoint.every_n_train_steps=3",
            "--wandb.mode=disabled",
            "--data.init_args.num_workers=1",
            "--data.init_args.batches_per_epoch=4",
            "--model.init_args.init_from=null",
            *extra,
        ]
    )


def steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    return checkpoint


def check_same_run(straight: Path, resumed: Path) -> None:
    a, b = steps(straight), steps(resumed)
    assert [row["step"] for row in b] == list(range(1, STEPS + 1)) == [row["step"] for row in a]
    for row_a, row_b in zip(a, b):
        assert row_a["keys"] == row_b["keys"], f"step {row_a['step']}: other samples"
        assert row_a["metrics"].keys() == row_b["metrics"].keys()
        for name, value in row_a["metrics"].items():
            assert row_b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (row_a["step"], name)
    state_a, state_b = final_state(straight), final_state(resumed)
    for name, tensor in state_a["state_dict"].items():
        torch.testing.assert_close(state_b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for opt_a, opt_b in zip(state_a["optimizer_states"], state_b["optimizer_states"]):
        for slot, values in opt_a["state"].items():
            for key, tensor in values.items():
                torch.testing.assert_close(opt_b["state"][slot][key], tensor, rtol=1e-5, atol=1e-6)
    assert state_a["lr_schedulers"] == state_b["lr_schedulers"]


def run_both(config: str, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(config, straight, STEPS, *extra)
    fit(config, resumed, STEPS // 2, *extra)
    fit(config, resumed, STEPS, "--ckpt_path=last", *extra)
    return straight, resumed


def test_fsae_with_gan_resumes_exactly(sample_shards, tmp_path, caplog):
    data = [
        f"--data.init_args.train_shards={sample_shards.train}",
        "--data.init_args.val_shards=null",
        "--data.init_args.num_frames=5",
        "--data.init_args.buckets.size=64",
        "--model.init_args.gan.start_step=0",
        "--model.init_args.gan.r1_every=2",
    ]
    straight, resumed = run_both("fsae-stage2", tmp_path, *data)
    metrics = steps(straight)[-1]["metrics"]
    assert {"train/d_loss", "train/g_adv", "train/loss"} <= metrics.keys(), "the GAN must be on"
    check_same_run(straight, resumed)

    # Another process layout (no worker process now): weights and optimizers carry over, the data is re-split.
    fit("fsae-stage2", resumed, STEPS + 2, "--ckpt_path=last", *data, "--data.init_args.num_workers=0")
    assert "data position re-split" in caplog.text and "num_workers=1" in caplog.text
    assert [row["step"] for row in steps(resumed)][-2:] == [STEPS + 1, STEPS + 2]


def test_dit_resumes_exactly(tiny_latents, tmp_path):
    straight, resumed = run_both(
        "dit-pretrain-video",
        tmp_path,
        f"--data.init_args.train_cache={tiny_latents.train.root}",
        "--data.init_args.val_cache=null",
        "--data.init_args.image_fraction=null",
        "--model.init_args.dit.latent_channels=8",
    )
    check_same_run(straight, resumed)

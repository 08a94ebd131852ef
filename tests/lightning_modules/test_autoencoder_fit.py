"""The wiring end to end: `fsvideo fit` trains the tiny FSAE on the sample shards, writes a checkpoint,
its resolved config and a wandb run, and `--ckpt_path last` resumes it (same wandb run id)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/fsae-stage1.yaml")


def fit_args(sample_shards, run_dir: Path, max_steps: int, wandb_mode: str) -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_train_steps=2",
        f"--wandb.mode={wandb_mode}",
        f"--data.init_args.train_shards={sample_shards.train}",
        f"--data.init_args.val_shards={sample_shards.val}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=2",
        "--data.init_args.val_batches=1",
        "--data.init_args.buckets.size=64",
    ]


def test_fit_writes_checkpoint_config_and_resumes(sample_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    main(fit_args(sample_shards, run_dir, max_steps=2, wandb_mode="offline"))

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    first = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    assert not [k for k in first["state_dict"] if "lpips" in k], "frozen LPIPS must stay out of checkpoints"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "lightning_modules.autoencoder.AutoencoderModule"
    assert saved["trainer"]["max_steps"] == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb should log offline into the run dir"
    assert list((run_dir / "videos").rglob("*.mp4")), "validation reconstructions should be written"

    main([*fit_args(sample_shards, run_dir, max_steps=4, wandb_mode="offline"), "--ckpt_path=last"])
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert {path.name.rsplit("-", 1)[1] for path in wandb_runs} == {run_id}, (
        "the resume continues the wandb run"
    )
    assert resumed["global_step"] == 4
    weights_changed = [
        not torch.equal(resumed["state_dict"][k], first["state_dict"][k])
        for k in first["state_dict"]
        if k.startswith("autoencoder.")
    ]
    assert any(weights_changed)
    assert resumed["optimizer_states"][0]["state"], "AdamW moments must be in the checkpoint"

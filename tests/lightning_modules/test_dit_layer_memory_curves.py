"""Figure 7(a) at small scale: the Layer Memory on / off configs differ only in that switch (and their run
directory), both train and log per-step losses, and one figure shows both curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from callbacks.loss_history import plot_loss_curves, read_loss_history
from cli import FSVideoCLI

REPO = Path(__file__).resolve().parents[2]
PAIR = {
    "on": REPO / "configs/tiny/dit-layer-memory-on.yaml",
    "off": REPO / "configs/tiny/dit-layer-memory-off.yaml",
}


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def test_pair_differs_only_in_layer_memory():
    on, off = (flatten(yaml.safe_load(PAIR[name].read_text())) for name in ("on", "off"))
    assert {k for k in on if on[k] != off.get(k)} == {
        "model.init_args.dit.layer_memory",
        "trainer.default_root_dir",
    }
    assert on["model.init_args.dit.layer_memory"] is True and off["model.init_args.dit.layer_memory"] is False


def test_both_runs_train_and_plot_in_one_figure(tiny_latents, tmp_path):
    runs = {}
    for name, config in PAIR.items():
        runs[name] = tmp_path / f"layer-memory-{name}"
        FSVideoCLI(
            args=[
                "fit",
                "--config",
                str(config),
                f"--trainer.default_root_dir={runs[name]}",
                "--trainer.max_steps=4",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--wandb.mode=disabled",
                f"--data.init_args.train_cache={tiny_latents.train.root}",
                f"--data.init_args.val_cache={tiny_latents.val.root}",
                "--data.init_args.num_workers=0",
                "--data.init_args.batches_per_epoch=4",
                "--model.init_args.dit.latent_channels=8",
            ]
        )
    histories = {name: read_loss_history(run) for name, run in runs.items()}
    for steps, losses in histories.values():
        assert steps.tolist() == [1, 2, 3, 4] and np.isfinite(losses).all()
    assert not np.array_equal(histories["on"][1], histories["off"][1])

    out = plot_loss_curves([runs["on"], runs["off"]], tmp_path / "figure7a.png", labels=["with", "without"])
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 300
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10

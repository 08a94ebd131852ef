"""Figure 7(a) at small scale: the Layer Memory on / off configs differ only in that switch (and their run
directory), both train and log per-step losses, one figure shows both curves, and the routers learn from
their first steps on real latents (issue #13: a saturated softmax init never moved)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from callbacks.loss_history import plot_loss_curves, read_loss_history
from fsvideo.dit import router_heatmap
from lightning_modules.cli import FSVideoCLI

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


def fit(config: Path, run_dir: Path, latents, steps: int, *extra: str) -> FSVideoCLI:
    """``fsvideo fit`` of a tiny config for ``steps`` steps on the session's latent caches, no validation."""
    return FSVideoCLI(
        args=[
            "fit",
            "--config",
            str(config),
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--wandb.mode=disabled",
            f"--data.init_args.train_cache={latents.train.root}",
            f"--data.init_args.val_cache={latents.val.root}",
            "--data.init_args.num_workers=0",
            f"--data.init_args.batches_per_epoch={steps}",
            "--model.init_args.dit.latent_channels=8",
            *extra,
        ]
    )


def test_both_runs_train_and_plot_in_one_figure(tiny_latents, tmp_path):
    runs = {}
    for name, config in PAIR.items():
        runs[name] = tmp_path / f"layer-memory-{name}"
        fit(config, runs[name], tiny_latents, 4)
    histories = {name: read_loss_history(run) for name, run in runs.items()}
    for steps, losses in histories.values():
        assert steps.tolist() == [1, 2, 3, 4] and np.isfinite(losses).all()
    # paired: the same seed gives both the same weights and noise, and the gate starts at 0, so the first
    # step's loss is the same; the runs part from there by as much as the gates have moved (tiny in 4 steps)
    assert histories["on"][1][0] == histories["off"][1][0]

    out = plot_loss_curves([runs["on"], runs["off"]], tmp_path / "figure7a.png", labels=["with", "without"])
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 300
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def test_routers_learn_in_a_few_steps(tiny_latents, tmp_path):
    steps, lr = 6, 1e-3
    cli = fit(PAIR["on"], tmp_path / "run", tiny_latents, steps, "--model.init_args.optimizer.warmup_steps=0")
    module = cli.model
    trained = module.dit
    initial = copy.deepcopy(trained)  # the same network with its routers back at their init
    for router in initial.routers:
        router.init_weights()

    moved = [
        max((after - before).abs().max().item() for before, after in zip(r0.parameters(), r1.parameters()))
        for r0, r1 in zip(initial.routers, trained.routers)
    ]
    print("largest change of each router's parameters:", [f"{m:.1e}" for m in moved])
    assert min(moved) > 0.1 * lr  # AdamW moves a parameter by about lr per step

    batch = next(iter(cli.datamodule.val_dataloader()))
    z0 = module.normalize(batch["latent"])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((z0.shape[0],), 0.5)
    with torch.no_grad():
        heatmaps = [
            router_heatmap(
                module.flow_loss(net, z0, batch, sigma, noise, drop=False, return_router_weights=True)[1]
            )
            for net in (initial, trained)
        ]
    change = (heatmaps[1] - heatmaps[0]).nan_to_num().abs().max().item()
    print(f"largest change of the router heatmap after {steps} steps: {change:.1e}")
    # with the gate about 3e-3 here; with the saturated init of margin 10 (no gate) about 7e-6: AdamW moved
    # those routers' parameters as much, but through a softmax whose gradient is e^-10 smaller
    assert change > 0.1 * lr

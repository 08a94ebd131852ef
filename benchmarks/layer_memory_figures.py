"""Figures 6 and 7 of §2.3.1 at small scale: does Layer Memory help a tiny DiT?

(a) From scratch: ``configs/tiny/dit-layer-memory-on.yaml`` and ``-off.yaml`` (12 blocks), and the -on
    config with ``router_gate_init: 1`` (the paper's eq. 7 from the first step), once per seed.
(b) Retrofit: the plain DiT of (a)'s first seed is the pretrained model; it is fine-tuned for
    ``--finetune-steps`` with Layer Memory added (its routers start at their init, gate 0, so the fine-tune
    starts from exactly the pretrained model, as a Wan2.1 import does) and without, once per seed.

Every run is a plain ``fsvideo fit`` of those configs; this script only chooses seeds, steps and folders,
runs two at a time with one thread each (a 2-core CPU), and then writes into ``--out``:

    fig7a.png, fig7b.png   ``fsvideo report loss-curves``: training loss, mean and min–max over seeds, and
                           the held-out loss at fixed σ (EMA weights) beside it
    fig6.png               the router heatmaps of the seed-0 Layer Memory runs (a) and (b) at their last
                           validation (``callbacks.router_heatmap``)
    results.md             per run: final training loss (mean of the last ``--tail`` steps), last held-out
                           loss, the routers' gates; and the mean per variant

Runs that already finished (``checkpoints/last.ckpt`` at the last step) are not run again.

    python benchmarks/layer_memory_figures.py --cache data/latents/tiny --root runs/layer-memory --out docs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from callbacks.loss_history import plot_loss_curves, read_loss_history  # noqa: E402
from callbacks.metrics_table import has_metric_history, read_metric_history  # noqa: E402

ON, OFF = REPO / "configs/tiny/dit-layer-memory-on.yaml", REPO / "configs/tiny/dit-layer-memory-off.yaml"
VARIANTS = {
    # variant: (config, extra arguments, label in (a), label in (b) or None when (b) leaves it out)
    "on": (ON, (), "Layer Memory, gate from 0", "+ Layer Memory (retrofit)"),
    "off": (OFF, (), "without", "plain"),
    # the paper's eq. 7 from step 1 (gate from 1); it cannot retrofit: it changes the model at init
    "eq7": (ON, ("--model.init_args.dit.router_gate_init=1",), "Layer Memory, gate from 1 (eq. 7)", None),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="latent cache folder with train/ and val/")
    parser.add_argument("--root", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the figures and results.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scratch-steps", type=int, default=1000, help="(a): steps from scratch")
    parser.add_argument("--finetune-steps", type=int, default=400, help="(b): steps of each fine-tune")
    parser.add_argument("--val-every", type=int, default=50, help="steps between validations")
    parser.add_argument(
        "--tail", type=int, default=100, help="final training loss = mean of the last N steps"
    )
    parser.add_argument("--smoothing", type=float, default=0.97, help="EMA of the plotted training losses")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    return parser.parse_args()


def finished(run_dir: Path, steps: int) -> bool:
    try:
        return (
            int(read_loss_history(run_dir)[0][-1]) >= steps and (run_dir / "checkpoints/last.ckpt").is_file()
        )
    except (FileNotFoundError, ValueError):
        return False


def fit(args: argparse.Namespace, run_dir: Path, variant: str, seed: int, steps: int, *extra: str) -> Path:
    """One ``fsvideo fit`` of the on / off config; its log goes to ``run_dir/fit.log``."""
    if finished(run_dir, steps):
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        "--config",
        str(VARIANTS[variant][0]),
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        f"--checkpoint.every_n_train_steps={steps}",
        f"--data.init_args.train_cache={args.cache / 'train'}",
        f"--data.init_args.val_cache={args.cache / 'val'}",
        "--data.init_args.num_workers=0",
        f"--data.init_args.batches_per_epoch={args.val_every}",
        *VARIANTS[variant][1],
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.setdefault("WANDB_MODE", "offline")
    with open(run_dir / "fit.log", "w") as log:
        print(f"fit {run_dir.name} ({steps} steps) ...", flush=True)
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=run_dir)
    return run_dir


def gates(run_dir: Path) -> list[float]:
    """The routers' gates g_l (blocks 2 … L) of a run's last checkpoint, EMA weights."""
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    names = sorted(
        (k for k in state if k.startswith("dit_ema.") and k.endswith(".router.gate")),
        key=lambda k: int(k.split(".")[2]),
    )
    return [state[k].item() for k in names]


def label(figure: str, variant: str) -> str:
    return VARIANTS[variant][2 if figure == "a" else 3]


def summary(figure: str, runs: dict[str, list[Path]], tail: int) -> list[str]:
    """Markdown rows: per run and per variant, the final training loss and the last held-out loss."""
    rows, means = [], []
    for variant, run_dirs in runs.items():
        train, val = [], []
        for run_dir in run_dirs:
            train.append(read_loss_history(run_dir)[1][-tail:].mean())
            val.append(
                read_metric_history(run_dir, "val/loss")[1][-1]
                if has_metric_history(run_dir, "val/loss")
                else np.nan
            )
            g = gates(run_dir)
            gate_cell = f"{min(g):.3f} … {max(g):.3f} (mean {np.mean(g):.3f})" if g else "—"
            rows.append(
                f"| 7({figure}) | {label(figure, variant)} | {run_dir.name} | {train[-1]:.3f} | {val[-1]:.3f} | {gate_cell} |"
            )
        means.append(
            f"| 7({figure}) | {label(figure, variant)} | mean ± std of {len(run_dirs)} | "
            f"{np.mean(train):.3f} ± {np.std(train):.3f} | {np.nanmean(val):.3f} ± {np.nanstd(val):.3f} | |"
        )
    return rows + means


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    root, seeds = args.root.resolve(), args.seeds
    args.cache = args.cache.resolve()
    scratch = {v: [root / f"7a/{v}-s{s}" for s in seeds] for v in VARIANTS}
    finetune = {v: [root / f"7b/{v}-s{s}" for s in seeds] for v in VARIANTS if VARIANTS[v][3] is not None}
    with ThreadPoolExecutor(args.jobs) as pool:
        # the plain run of the first seed is also (b)'s pretrained model
        pretraining = pool.submit(fit, args, scratch["off"][0], "off", seeds[0], args.scratch_steps)
        jobs = [
            pool.submit(fit, args, run, v, s, args.scratch_steps)
            for v in scratch
            for s, run in zip(seeds, scratch[v])
            if run != scratch["off"][0]
        ]
        init_from = f"--model.init_args.init_from={pretraining.result() / 'checkpoints/last.ckpt'}"
        jobs += [
            pool.submit(fit, args, run, v, s, args.finetune_steps, init_from)
            for v in finetune
            for s, run in zip(seeds, finetune[v])
        ]
        for job in jobs:
            job.result()

    args.out.mkdir(parents=True, exist_ok=True)
    for figure, runs in (("a", scratch), ("b", finetune)):
        run_dirs = [run for variant in runs for run in runs[variant]]
        labels = [label(figure, variant) for variant in runs for _ in runs[variant]]
        out = plot_loss_curves(
            run_dirs, args.out / f"fig7{figure}.png", labels=labels, smoothing=args.smoothing
        )
        print(f"wrote {out}")
    heatmaps = [sorted((runs["on"][0] / "router_heatmaps").glob("*.png"))[-1] for runs in (scratch, finetune)]
    images = [Image.open(path).convert("RGB") for path in heatmaps]
    combined = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images) + 24), "white")
    captions = (
        f"(a) from scratch, seed {seeds[0]}",
        f"(b) plain DiT + Layer Memory, fine-tune seed {seeds[0]}",
    )
    for index, (image, caption) in enumerate(zip(images, captions)):
        left = sum(i.width for i in images[:index])
        combined.paste(image, (left, 24))
        ImageDraw.Draw(combined).text((left + 10, 4), caption, fill="black", font_size=16)
    combined.save(args.out / "fig6.png", optimize=True)
    print(f"wrote {args.out / 'fig6.png'} (from {', '.join(str(p) for p in heatmaps)})")

    table = [
        "| figure | variant | run | final train loss (mean of last steps) | held-out val/loss | gates g_2…g_L |",
        "|---|---|---|---|---|---|",
        *summary("a", scratch, args.tail),
        *summary("b", finetune, args.tail),
    ]
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

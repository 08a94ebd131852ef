"""Figure 6: the Layer Memory router heatmap, drawn at the end of every validation.

Row l (layers 2 … L) and column i (representations X_0 … X_{l−1}) hold the maximum over the tokens of a
latent sequence of the router's weight on X_i, averaged over the batch; cells with i ≥ l do not exist and
stay blank. The module computes the matrix (``DiTModule.val_router_heatmap``, from
``fsvideo.dit.router_heatmap``); this callback only draws it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_router_heatmap(heatmap: torch.Tensor, out_png: str | Path, title: str | None = None) -> Path:
    """Draw a ``(L−1)×L`` router heatmap (row r = layer r + 2, NaN = no such source) to a PNG; returns its path."""
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be a (layers−1)×layers matrix, got shape {tuple(heatmap.shape)}.")
    values = np.ma.masked_invalid(heatmap.detach().float().cpu().numpy())
    rows, cols = values.shape
    figure = Figure(figsize=(1.6 + 0.28 * cols, 1.2 + 0.28 * rows), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, origin="upper", aspect="equal")
    axes.set_xticks(range(cols), [str(i) for i in range(cols)], fontsize=7)
    axes.set_yticks(range(rows), [str(r + 2) for r in range(rows)], fontsize=7)
    axes.set_xlabel("representation index")
    axes.set_ylabel("layer index")
    axes.set_title(title or "Layer Memory router: max weight over tokens", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png


class RouterHeatmap(L.Callback):
    """After each validation, draws ``pl_module.val_router_heatmap`` to
    ``<trainer.default_root_dir>/<folder>/step-XXXXXXX.png`` and, when wandb logs the run, to
    ``val/router_heatmap`` as a ``wandb.Image``. Modules without Layer Memory leave the matrix None: nothing
    is drawn.

    Args:
        folder: sub-folder of the run directory.
    """

    def __init__(self, folder: str = "router_heatmaps") -> None:
        self.folder = folder

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        heatmap = getattr(pl_module, "val_router_heatmap", None)
        if heatmap is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.folder / f"step-{step:07d}.png"
        plot_router_heatmap(heatmap, path, title=f"Layer Memory router, step {step}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"val/router_heatmap": wandb.Image(str(path))}, step=step)

"""Per-step loss history: the csv holds exactly the losses the module returned, a resume drops the rows after
its checkpoint and continues, and loss curves of several runs are drawn in one figure (seeds of a variant as
mean and band, the held-out loss beside)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.loss_history import LossHistory, plot_loss_curves, read_loss_history
from callbacks.metrics_table import has_metric_history, read_metric_history
from callbacks.reports import report_main


class Quadratic(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(3.0))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (self.weight * batch).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.arange(1.0, 5.0)[:, None].expand(4, 2), batch_size=None)


def trainer(root, max_steps: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            LossHistory(),
            ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1),
        ],
    )


def test_history_records_each_step_and_resume_continues(tmp_path):
    module = Quadratic()
    trainer(tmp_path, 3).fit(module)
    steps, losses = read_loss_history(tmp_path)
    assert steps.tolist() == [1, 2, 3]
    assert np.allclose(losses, module.losses)

    # resume from step 2: the row of step 3 belongs to the abandoned future and is replaced
    resumed = Quadratic()
    trainer(tmp_path, 4).fit(resumed, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"))
    steps, losses = read_loss_history(tmp_path)
    assert steps.tolist() == [1, 2, 3, 4]
    assert np.allclose(losses, module.losses[:2] + resumed.losses)


def test_plot_loss_curves(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = "\n".join(f"{s},{scale / s}" for s in range(1, 21))
        (tmp_path / name / "loss_history.csv").write_text(f"step,loss\n{rows}\n")
    out = plot_loss_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "fig.png")
    with Image.open(out) as image:
        assert image.size == (840, 540)
    with pytest.raises(ValueError, match="labels"):
        plot_loss_curves([tmp_path / "a"], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(FileNotFoundError, match="LossHistory"):
        plot_loss_curves([tmp_path / "missing"], tmp_path / "x.png")


def test_seeds_of_a_variant_plot_as_mean_and_band_beside_the_held_out_loss(tmp_path):
    runs, labels = [], []
    for variant, scale in (("on", 1.0), ("off", 2.0)):
        for seed in range(3):
            run = tmp_path / f"{variant}-s{seed}"
            run.mkdir()
            rows = "\n".join(f"{s},{scale * (1 + 0.1 * seed) / s}" for s in range(1, 21))
            (run / "loss_history.csv").write_text(f"step,loss\n{rows}\n")
            validations = [{"step": s, "val/loss": scale / s + seed} for s in (10, 20)]
            validations.append({"step": 20, "val/loss": 7.0})  # a resumed run validated step 20 again
            (run / "metrics_table.jsonl").write_text("\n".join(json.dumps(v) for v in validations) + "\n")
            runs.append(run)
            labels.append(variant)
    steps, values = read_metric_history(runs[0], "val/loss")
    assert steps.tolist() == [10, 20] and values.tolist() == [0.1, 7.0]
    assert not has_metric_history(runs[0], "val/other")

    report_main(["loss-curves", *map(str, runs), "--labels", *labels, "--out", str(tmp_path / "fig.png")])
    with Image.open(tmp_path / "fig.png") as image:
        assert image.size == (1320, 540)  # two panels: training loss, held-out loss
    # the same runs without validation records: training loss only
    for run in runs:
        (run / "metrics_table.jsonl").unlink()
    with Image.open(plot_loss_curves(runs, tmp_path / "train.png", labels=labels)) as image:
        assert image.size == (840, 540)

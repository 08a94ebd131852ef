"""Intrinsic dimension of the autoencoder's latent space during training (spec §2.2.2, Table 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.id_report import KINDS, IDReport, LatentPoints, check_settings, encode_batch, id_row
from fsvideo.intrinsic_dimension import PAPER_SCALES


class IntrinsicDimensionCallback(L.Callback):
    """Gride intrinsic dimension of the latents of a fixed held-out set, videos and images apart.

    The held-out set is the first ``max_batches`` batches of the (first) validation dataloader, which
    is deterministic, so every evaluation sees the same clips. They are encoded with
    ``pl_module.inference_autoencoder()`` (EMA weights when kept) as validation passes over them.
    At the end of validation the report (one row, Table 1's shape) is written to
    ``<trainer.default_root_dir>/id_report.{json,md}``, scalars ``id/video_k2`` … ``id/image_k64`` go to
    every logger, and a wandb run also gets ``id/table`` and the line plot ``id/curve`` (ID against
    neighbour rank). It runs in fitting every ``every_n_epochs`` epochs (epochs 0, N, 2N, …, so a bad
    setting shows at the first validation), and on every ``fsvideo validate``; never in the sanity check.

    Args:
        every_n_epochs: evaluate at validations of epochs divisible by this.
        point_mode: ``"token"`` (each latent position's channel vector is a point) or ``"latent"``
            (each whole latent is a point); see :mod:`callbacks.id_report`.
        max_points: most points per kind given to Gride, drawn with ``seed``; None keeps all.
        scales: neighbour ranks (powers of two; Table 1: 2 … 64).
        max_batches: validation batches that form the held-out set.
        seed: seed of the ``max_points`` draw.
        method_name: row label; default: the run directory's name.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        point_mode: str = "token",
        max_points: int | None = 2000,
        scales: Sequence[int] = PAPER_SCALES,
        max_batches: int = 16,
        seed: int = 0,
        method_name: str | None = None,
    ) -> None:
        if every_n_epochs < 1 or max_batches < 1:
            raise ValueError(
                f"every_n_epochs={every_n_epochs} and max_batches={max_batches} must be at least 1."
            )
        self.scales = check_settings(point_mode, max_points, scales)
        self.every_n_epochs = every_n_epochs
        self.point_mode = point_mode
        self.max_points = max_points
        self.max_batches = max_batches
        self.seed = seed
        self.method_name = method_name
        self._points: LatentPoints | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        return trainer.state.fn == TrainerFn.FITTING and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._points = LatentPoints(self.point_mode) if self._due(trainer) else None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._points is None or dataloader_idx != 0 or batch_idx >= self.max_batches:
            return
        # Every rank encodes (sharded weights need all ranks in a forward); rank zero keeps the points.
        with trainer.precision_plugin.forward_context():
            latents = encode_batch(pl_module.inference_autoencoder(), batch)
        if trainer.is_global_zero:
            self._points.add(latents)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        points, self._points = self._points, None
        if points is None or not trainer.is_global_zero:
            return
        method = self.method_name or Path(trainer.default_root_dir).resolve().name
        row = id_row(method, points, self.scales, self.max_points, self.seed)
        info = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "stage": trainer.state.fn.value,
        }
        report = IDReport(self.point_mode, self.scales, self.max_points, self.seed, [row], info)
        report.write(trainer.default_root_dir)
        for logger in trainer.loggers:
            logger.log_metrics(row_scalars(report), step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.experiment.log(wandb_payload(report), step=trainer.global_step)


def row_scalars(report: IDReport, prefix: str = "id") -> dict[str, float]:
    """``{"id/video_k2": …, "id/image_k64": …}`` of a one-row report."""
    (row,) = report.rows
    return {
        f"{prefix}/{kind}_k{k}": value
        for kind in KINDS
        for k, value in zip(report.scales, getattr(row, kind) or ())
    }


def wandb_payload(report: IDReport, prefix: str = "id") -> dict[str, Any]:
    """``{"id/table": wandb.Table, "id/curve": line plot}``: one table row per (method, kind), one curve
    per (method, kind) of ID against neighbour rank."""
    import wandb

    columns = ["method", "kind", "points", *(f"k{k}" for k in report.scales)]
    data, curves, keys = [], [], []
    for row in report.rows:
        for kind in KINDS:
            ids = getattr(row, kind)
            if ids is None:
                continue
            data.append([row.method, kind, row.num_points[kind], *ids])
            curves.append(ids)
            keys.append(kind if len(report.rows) == 1 else f"{row.method} {kind}")
    curve = wandb.plot.line_series(
        xs=list(report.scales),
        ys=curves,
        keys=keys,
        title="Intrinsic dimension (Gride) vs neighbour rank",
        xname="nearest neighbours k",
    )
    return {f"{prefix}/table": wandb.Table(columns=columns, data=data), f"{prefix}/curve": curve}

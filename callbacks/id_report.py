"""Intrinsic-dimension reports in the shape of the spec's Table 1 (§2.2.2).

A held-out set of batches is encoded, videos and images apart; the latents become point clouds
(:func:`fsvideo.intrinsic_dimension.latents_to_points`) and Gride gives one intrinsic dimension per
neighbour rank (:func:`fsvideo.intrinsic_dimension.gride_id`). One :class:`IDRow` per run or method,
gathered in an :class:`IDReport` that writes ``id_report.json`` and ``id_report.md``.

What a point is (``point_mode``):
    ``"token"``: every latent position's ``C``-channel vector is a point in ``R^C``, the space the
        DiT's tokens live in. Many points per clip, so a few batches suffice.
    ``"latent"``: every whole latent, flattened, is a point in ``R^{C·t·h·w}``. One point per clip,
        so the held-out set needs more clips than the largest neighbour rank, all of one shape.

The callback (:mod:`callbacks.intrinsic_dimension`) and ``fsvideo report id``
(:func:`compare_checkpoints`) both go through :class:`LatentPoints` and :func:`id_row`, so a run's
own report and a comparison of checkpoints compute the same numbers from the same batches.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsvideo.ae import FSAE
from fsvideo.intrinsic_dimension import PAPER_SCALES, gride_id, latents_to_points
from fsvideo.pretrained import load_network

KINDS = ("video", "image")
"""Columns of Table 1: clips of more than one frame, and still images (one-frame clips)."""

POINT_MODES = {
    "token": "latent tokens (each latent position's C-channel vector is one point in R^C)",
    "latent": "whole latents (each flattened C×t×h×w latent is one point)",
}

REPORT_JSON = "id_report.json"
REPORT_MD = "id_report.md"
"""The resolved config that ``cli.SaveRunConfig`` writes into every run directory."""


def check_settings(point_mode: str, max_points: int | None, scales: Sequence[int]) -> tuple[int, ...]:
    """Validate the estimator settings where a user gives them; returns the sorted scales."""
    if point_mode not in POINT_MODES:
        raise ValueError(f"point_mode must be one of {tuple(POINT_MODES)}, got {point_mode!r}.")
    scales = tuple(sorted(set(scales)))
    if not scales or any(k < 2 or k & (k - 1) for k in scales):
        raise ValueError(f"scales must be powers of two >= 2 (e.g. {PAPER_SCALES}), got {scales}.")
    if max_points is not None and max_points <= scales[-1]:
        raise ValueError(
            f"max_points={max_points} cannot resolve {scales[-1]} neighbours; use max_points > {scales[-1]}."
        )
    return scales


# ---- encoding --------------------------------------------------------------------------------------


def split_by_kind(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"video": clips, "image": stills}`` of a DataModule batch, each ``b×3×T×H×W``; empty kinds left out.

    A sample is an image when its ``is_image`` flag is set or the batch has one frame (``T = 1``).
    """
    video = batch["video"]
    if video.ndim != 5:
        raise ValueError(f"batch['video'] must be B×3×T×H×W, got shape {tuple(video.shape)}.")
    flags = batch.get("is_image")
    if video.shape[2] == 1:
        is_image = torch.ones(video.shape[0], dtype=torch.bool, device=video.device)
    elif flags is None:
        is_image = torch.zeros(video.shape[0], dtype=torch.bool, device=video.device)
    else:
        is_image = torch.as_tensor(flags, dtype=torch.bool, device=video.device)
    if is_image.all():
        return {"image": video}
    if not is_image.any():
        return {"video": video}
    return {"video": video[~is_image], "image": video[is_image]}


@torch.no_grad()
def encode_batch(encoder: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Latents ``b×C×t×h×w`` of a batch's videos and of its images, encoded separately."""
    return {kind: encoder.encode(clips) for kind, clips in split_by_kind(batch).items()}


class LatentPoints:
    """Point clouds of the latents seen so far, one per kind, added batch after batch.

    Args:
        point_mode: ``"token"`` or ``"latent"`` (see the module docstring).
    """

    def __init__(self, point_mode: str = "token") -> None:
        check_settings(point_mode, None, PAPER_SCALES)
        self.point_mode = point_mode
        self._chunks: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}

    def add(self, latents: Mapping[str, torch.Tensor]) -> None:
        """Add ``{kind: latent b×C×t×h×w}`` (as :func:`encode_batch` returns)."""
        for kind, latent in latents.items():
            self._chunks[kind].append(latents_to_points(latent, self.point_mode))

    def points(self, kind: str, max_points: int | None = None, seed: int = 0) -> np.ndarray | None:
        """``N×D`` points of ``kind`` (None when none were added), at most ``max_points`` drawn with ``seed``."""
        chunks = self._chunks[kind]
        if not chunks:
            return None
        dims = sorted({chunk.shape[1] for chunk in chunks})
        if len(dims) > 1:
            raise ValueError(
                f"whole-latent points need latents of one size, but the {kind} latents have {dims} values "
                "each (several resolution buckets); use point_mode='token' or a held-out set of one bucket."
            )
        stacked = torch.from_numpy(np.concatenate(chunks))
        # Each row as a 1×1×1 latent: latents_to_points then draws the subset exactly as it does for
        # one latent tensor, so a direct call on the concatenated latents gives the same points.
        return latents_to_points(stacked[:, :, None, None, None], "token", max_points, seed)


# ---- report ----------------------------------------------------------------------------------------


@dataclass
class IDRow:
    """One row of Table 1: a run or method, its Gride IDs per neighbour rank for each kind."""

    method: str
    video: list[float] | None
    """ID at each of the report's scales for the video latents; None when the held-out set has no videos."""
    image: list[float] | None
    """Same for the image latents."""
    num_points: dict[str, int] = field(default_factory=dict)
    """Points that entered each kind's estimate (after the ``max_points`` draw)."""


@dataclass
class IDReport:
    """Table 1: rows = runs/methods, columns = Video and Image, each a list over neighbour ranks."""

    point_mode: str
    scales: tuple[int, ...]
    max_points: int | None
    seed: int
    rows: list[IDRow]
    info: dict[str, Any] = field(default_factory=dict)
    """Where the numbers come from (epoch, step, checkpoints, batches), kept in the json."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "scales": list(self.scales),
            "point_description": POINT_MODES[self.point_mode],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IDReport:
        return cls(
            point_mode=data["point_mode"],
            scales=tuple(data["scales"]),
            max_points=data["max_points"],
            seed=data["seed"],
            rows=[IDRow(**row) for row in data["rows"]],
            info=dict(data.get("info", {})),
        )

    @classmethod
    def read(cls, path: str | Path) -> IDReport:
        """Load an ``id_report.json`` (a file, or the run directory that holds one)."""
        path = Path(path)
        path = path / REPORT_JSON if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no intrinsic-dimension report; run validation with the callback."
            )
        return cls.from_dict(json.loads(path.read_text()))

    def markdown(self) -> str:
        ranks = "/".join(str(k) for k in self.scales)
        lines = [
            f"## Intrinsic dimension (Gride, {ranks} nearest neighbours; lower = simpler latent space)",
            "",
            f"Points: {POINT_MODES[self.point_mode]}; at most {self.max_points or 'all'} per cell, seed {self.seed}.",
            "",
            "| Method | Video ↓ | Image ↓ | Points (video / image) |",
            "|---|---|---|---|",
        ]
        for row in self.rows:
            counts = " / ".join(str(row.num_points.get(kind, 0)) for kind in KINDS)
            method = row.method.replace("|", "\\|")
            lines.append(f"| {method} | {_format_ids(row.video)} | {_format_ids(row.image)} | {counts} |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``id_report.json`` and ``id_report.md`` into ``folder``; returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md_path.write_text(self.markdown())
        return json_path, md_path


def _format_ids(ids: list[float] | None) -> str:
    return "—" if ids is None else "[" + ", ".join(f"{value:.2f}" for value in ids) + "]"


def id_row(
    method: str,
    points: LatentPoints,
    scales: Sequence[int] = PAPER_SCALES,
    max_points: int | None = 2000,
    seed: int = 0,
) -> IDRow:
    """Gride IDs of each kind's points; a kind without points gets None."""
    scales = check_settings(points.point_mode, max_points, scales)
    ids, counts, too_few = {}, {}, []
    for kind in KINDS:
        cloud = points.points(kind, max_points, seed)
        ids[kind] = None
        if cloud is None:
            continue
        if len(cloud) <= scales[-1]:
            too_few.append(f"{len(cloud)} {kind} points")
            continue
        by_rank = gride_id(cloud, scales)
        ids[kind] = [by_rank[k] for k in scales]
        counts[kind] = len(cloud)
    if too_few:
        # One kind short of points (e.g. few stills in a held-out set) leaves its column empty; none
        # measurable at all is a setting to fix.
        message = (
            f"{method}: the held-out set gave only {' and '.join(too_few)} ({points.point_mode} mode), too few "
            f"for {scales[-1]} neighbours; encode more batches (max_batches), use point_mode='token', or "
            "smaller scales."
        )
        if not counts:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return IDRow(method, ids["video"], ids["image"], counts)


# ---- comparing runs (``fsvideo report id``) ----------------------------------------------------------


def compare_checkpoints(
    runs: Mapping[str, nn.Module | str | Path],
    batches: Iterable[Mapping[str, Any]],
    point_mode: str = "token",
    max_points: int | None = 2000,
    max_batches: int = 16,
    scales: Sequence[int] = PAPER_SCALES,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> IDReport:
    """Table 1 for several autoencoders on the same held-out batches.

    Args:
        runs: ``{method name: encoder}``; an encoder is a module with ``.encode(B×3×T×H×W) → B×C×t×h×w``,
            or a run directory / checkpoint path loaded with :func:`fsvideo.pretrained.load_network` (one at a
            time, so only one network is in memory).
        batches: DataModule batches (``video`` ``B×3×T×H×W`` in [-1, 1], ``is_image``); the first
            ``max_batches`` are the held-out set, read once and shared by every run.
        point_mode, max_points, scales, seed: what a point is, and the Gride settings (as the callback's).
        device: where path-given runs are loaded; module-given runs encode on their own device.
    """
    scales = check_settings(point_mode, max_points, scales)
    if not runs:
        raise ValueError("runs is empty: give at least one 'name=run_dir' to compare.")
    held_out = [
        {"video": batch["video"].cpu(), "is_image": batch.get("is_image")}
        for batch in itertools.islice(batches, max_batches)
    ]
    if not held_out:
        raise ValueError("the held-out data yielded no batches; check the shard pattern or data config.")
    rows = []
    for name, run in runs.items():
        encoder = load_network(run, FSAE, device=device) if isinstance(run, (str, Path)) else run
        run_device = next(itertools.chain(encoder.parameters(), encoder.buffers())).device
        points = LatentPoints(point_mode)
        was_training = encoder.training
        encoder.eval()
        try:
            for batch in held_out:
                points.add(encode_batch(encoder, {**batch, "video": batch["video"].to(run_device)}))
        finally:
            encoder.train(was_training)
        rows.append(id_row(name, points, scales, max_points, seed))
    info = {
        "batches": len(held_out),
        "runs": {name: str(run) for name, run in runs.items() if isinstance(run, (str, Path))},
    }
    return IDReport(point_mode, scales, max_points, seed, rows, info)

import json

import lightning as L
import numpy as np
import pytest
import torch
from dadapy import Data
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from callbacks.id_report import (
    IDReport,
    IDRow,
    LatentPoints,
    compare_checkpoints,
    encode_batch,
    split_by_kind,
)
from callbacks.intrinsic_dimension import IntrinsicDimensionCallback, row_scalars, wandb_payload
from fsvideo.intrinsic_dimension import PAPER_SCALES, latents_to_points

TOLERANCE = 0.5
"""|ID − 3| allowed at every scale for 800 points of the 3-D manifold below (measured 2.88–3.33 over seeds)."""


class LinearManifoldEncoder(nn.Module):
    """Latent channel vectors on a ``dim``-D linear subspace of ``R^channels``: every 4×4 pixel block of
    every 4th frame (48 values, ``t = 1 + (T-1)/4``) goes through a fixed rank-``dim`` linear map. Many
    pixels mix into each coordinate, so on uniform noise the points are near-Gaussian in ``dim`` dimensions."""

    def __init__(self, dim: int = 3, channels: int = 50, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "projection", torch.randn(channels, dim, generator=g) @ torch.randn(dim, 48, generator=g)
        )

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = video[:, :, ::4]
        b, c, t, height, width = x.shape
        x = x.reshape(b, c, t, height // 4, 4, width // 4, 4).permute(0, 1, 4, 6, 2, 3, 5)
        blocks = x.reshape(b, c * 16, t, height // 4, width // 4)  # B×48×t×h×w
        return torch.einsum("ck,bkthw->bcthw", self.projection, blocks)


def make_batches(n_video=3, n_image=3, seed=0):
    """Alternating video (4 clips of 5 frames: 512 tokens) and image (8 stills: 512 tokens) batches,
    32×32 pixels of uniform noise in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(max(n_video, n_image)):
        if i < n_video:
            video = torch.rand(4, 3, 5, 32, 32, generator=g) * 2 - 1
            batches.append(
                {"video": video, "is_image": torch.zeros(4, dtype=torch.bool), "caption": [""] * 4}
            )
        if i < n_image:
            image = torch.rand(8, 3, 1, 32, 32, generator=g) * 2 - 1
            batches.append({"video": image, "is_image": torch.ones(8, dtype=torch.bool), "caption": [""] * 8})
    return batches


class FakeAutoencoderModule(L.LightningModule):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.weight = nn.Parameter(torch.zeros(()))

    def inference_autoencoder(self) -> nn.Module:
        return self.encoder

    def training_step(self, batch, batch_idx):
        return (self.weight - 1) ** 2

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def make_trainer(tmp_path, callback, logger, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path / "run-a",
        callbacks=[callback],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def loader(batches):
    return DataLoader(batches, batch_size=None)


def direct_ids(encoder, batches, kind, max_points, seed):
    """Reference: concatenate the kind's latents, draw the points, call dadapy directly."""
    latents = torch.cat(
        [encoder.encode(b["video"]) for b in batches if bool(b["is_image"].all()) == (kind == "image")]
    )
    points = latents_to_points(latents, "token", max_points=max_points, seed=seed)
    return points, list(Data(points, verbose=False).return_id_scaling_gride(range_max=64)[0])


def test_callback_in_validate_recovers_dimension_and_equals_direct_dadapy(tmp_path):
    encoder, batches = LinearManifoldEncoder(), make_batches()
    callback = IntrinsicDimensionCallback(max_points=800, max_batches=4, seed=3)
    logger = RecordingLogger()
    make_trainer(tmp_path, callback, logger).validate(FakeAutoencoderModule(encoder), loader(batches))

    data = json.loads((tmp_path / "run-a" / "id_report.json").read_text())
    assert data["scales"] == list(PAPER_SCALES) and data["point_mode"] == "token"
    (row,) = data["rows"]
    assert row["method"] == "run-a" and row["num_points"] == {"video": 800, "image": 800}
    held_out = batches[:4]  # 2 video and 2 image batches: 1024 tokens of each kind
    for kind in ("video", "image"):
        ids = row[kind]
        assert len(ids) == 6 and all(abs(d - 3.0) < TOLERANCE for d in ids), (kind, ids)
        points, expected = direct_ids(encoder, held_out, kind, max_points=800, seed=3)
        assert ids == pytest.approx(expected, rel=1e-12, abs=0)
        assert len(np.unique(points, axis=0)) == 800

    assert data["info"] == {"epoch": 0, "global_step": 0, "stage": "validate"}
    logged = dict(logger.metrics[-1][1])
    assert logged["id/video_k2"] == row["video"][0] and logged["id/image_k64"] == row["image"][5]
    assert len([k for k in logged if k.startswith("id/")]) == 12

    md = (tmp_path / "run-a" / "id_report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| Method | Video ↓ | Image ↓ | Points (video / image) |"
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == "run-a" and cells[3] == "800 / 800"
    assert [float(v) for v in cells[1].strip("[]").split(",")] == pytest.approx(row["video"], abs=0.005)


def test_callback_during_fit_runs_every_n_epochs_and_skips_sanity_check(tmp_path):
    encoder, batches = LinearManifoldEncoder(), make_batches(n_video=2, n_image=2)
    callback = IntrinsicDimensionCallback(every_n_epochs=2, max_points=500, max_batches=4, method_name="VF")
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, callback, logger, max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(FakeAutoencoderModule(encoder), loader(batches[:1]), loader(batches))

    id_steps = [step for step, metrics in logger.metrics if "id/video_k2" in metrics]
    assert id_steps == [1, 3]  # validations of epochs 0 and 2 (one train step each), not epoch 1
    report = IDReport.read(tmp_path / "run-a")
    assert report.info["epoch"] == 2 and report.rows[0].method == "VF"
    assert all(abs(d - 3.0) < TOLERANCE for d in report.rows[0].video + report.rows[0].image)


def test_compare_checkpoints_same_data_orders_runs_and_matches_callback_numbers(tmp_path):
    batches = make_batches()
    runs = {"3-D": LinearManifoldEncoder(dim=3), "5-D": LinearManifoldEncoder(dim=5, seed=1)}
    report = compare_checkpoints(
        runs, iter(batches), max_points=800, max_batches=4, seed=3
    )  # one-shot iterator
    assert [row.method for row in report.rows] == ["3-D", "5-D"]
    low, high = report.rows
    assert all(abs(d - 3.0) < TOLERANCE for d in low.video + low.image)
    # 5-D: Gride's spread and its underestimate at large k grow with the dimension (measured 4.41–5.63)
    assert all(abs(d - 5.0) < 0.75 for d in high.video + high.image), high
    _, expected = direct_ids(runs["3-D"], batches[:4], "video", max_points=800, seed=3)
    assert low.video == pytest.approx(expected, rel=1e-12, abs=0)

    json_path, md_path = report.write(tmp_path)
    assert IDReport.read(json_path) == report
    rows = [line for line in md_path.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["3-D", "5-D"]


def test_only_videos_leaves_image_column_empty_and_small_sets_fail_clearly():
    videos = [b for b in make_batches() if not b["is_image"].any()]
    report = compare_checkpoints({"run": LinearManifoldEncoder()}, videos, max_points=300, max_batches=2)
    assert report.rows[0].image is None and report.rows[0].num_points == {"video": 300}
    assert "| run | [" in report.markdown() and "| — | 300 / 0 |" in report.markdown()
    with pytest.raises(ValueError, match="only 4 video points"):
        compare_checkpoints({"run": LinearManifoldEncoder()}, videos[:1], point_mode="latent")
    with pytest.raises(ValueError, match="max_points=64 cannot resolve 64"):
        IntrinsicDimensionCallback(max_points=64)
    with pytest.raises(ValueError, match="'token', 'latent'"):
        IntrinsicDimensionCallback(point_mode="pixel")


def test_split_by_kind_and_latent_points_modes():
    video = torch.rand(3, 3, 5, 8, 8) * 2 - 1
    flags = torch.tensor([False, True, False])
    parts = split_by_kind({"video": video, "is_image": flags})
    assert torch.equal(parts["video"], video[[0, 2]]) and torch.equal(parts["image"], video[[1]])
    assert list(split_by_kind({"video": video[:, :, :1]})) == ["image"]  # T = 1 is an image without a flag
    assert list(split_by_kind({"video": video})) == ["video"]

    encoder = LinearManifoldEncoder(channels=6)
    latents = encode_batch(encoder, {"video": video, "is_image": flags})
    assert latents["video"].shape == (2, 6, 2, 2, 2) and latents["image"].shape == (1, 6, 2, 2, 2)
    whole = LatentPoints("latent")
    whole.add(latents)
    assert whole.points("video").shape == (2, 6 * 2 * 2 * 2) and whole.points("image").shape == (1, 48)
    whole.add({"video": encoder.encode(torch.zeros(1, 3, 1, 4, 4))})
    with pytest.raises(ValueError, match="whole-latent points need latents of one size"):
        whole.points("video")


def test_wandb_payload_table_and_curve():
    import wandb

    row = IDRow("m", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], None, {"video": 100})
    report = IDReport("token", PAPER_SCALES, 800, 0, [row])
    payload = wandb_payload(report)
    table = payload["id/table"]
    assert isinstance(table, wandb.Table)
    assert table.columns == ["method", "kind", "points", "k2", "k4", "k8", "k16", "k32", "k64"]
    assert table.data == [["m", "video", 100, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    assert "id/curve" in payload
    assert row_scalars(report) == {f"id/video_k{k}": float(i + 1) for i, k in enumerate(PAPER_SCALES)}

"""The throughput callback logs speed, data wait and memory from a real Trainer run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.throughput import Throughput, latent_tokens


class SlowData(torch.utils.data.Dataset):
    """Batches that take a measurable time to load, so data wait is visible."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        torch.linalg.inv(torch.randn(200, 200) + 200 * torch.eye(200)).sum()  # real work, no sleep
        return {"video": torch.zeros(3, 5, 64, 128)}


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch["video"].mean().view(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def log_dict(self, metrics, *args, **kwargs):
        self.logged.append({k: float(v) for k, v in metrics.items()})
        super().log_dict(metrics, *args, **kwargs)


def test_logs_speed_wait_and_memory(tmp_path):
    module = Tiny()
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Throughput(log_every_n_steps=2)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(SlowData(), batch_size=2))
    assert len(module.logged) == 2
    last = module.logged[-1]
    assert 0 < last["perf/data_wait_fraction"] < 1
    assert last["perf/samples_per_s"] > 0 and last["perf/step_s"] > 0
    # 2 samples × (1 + 4/4) latent frames × 1 × 2 latent cells per batch
    assert last["perf/tokens_per_s"] == pytest.approx(last["perf/samples_per_s"] * 4)
    assert last["perf/peak_memory_gib"] > 0


def test_latent_tokens_from_latents_or_pixels():
    assert latent_tokens({"latent": torch.zeros(2, 16, 3, 4, 5)}) == 120
    assert latent_tokens({"video": torch.zeros(2, 3, 17, 256, 128)}) == 2 * 5 * 4 * 2

"""Figure 6 callback: the router heatmap of a real DiT forward, drawn to a PNG beside the checkpoints at the
end of validation, and nothing for a DiT without Layer Memory."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.router_heatmap import RouterHeatmap, plot_router_heatmap
from fsvideo.dit import DiT, DiTConfig, router_heatmap


class HeatmapModule(L.LightningModule):
    """Sets ``val_router_heatmap`` from a tiny DiT's routers, as ``DiTModule`` does."""

    def __init__(self, layer_memory: bool) -> None:
        super().__init__()
        self.dit = DiT(DiTConfig.tiny(layer_memory=layer_memory))
        self.val_router_heatmap = None

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        config = self.dit.config
        g = torch.Generator().manual_seed(0)
        latent = torch.randn(2, config.in_channels, 2, 2, 2, generator=g)
        text, image = (
            torch.randn(2, 4, config.text_dim, generator=g),
            torch.randn(2, 5, config.image_dim, generator=g),
        )
        return self.dit(latent, torch.tensor([0.3, 0.7]), text, image, return_router_weights=True)

    def training_step(self, batch, batch_idx):
        return self()[0].square().mean()

    def validation_step(self, batch, batch_idx):
        maxima = self()[1]
        self.val_router_heatmap = router_heatmap(maxima) if maxima else None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.zeros(1), batch_size=None)

    def val_dataloader(self):
        return DataLoader(torch.zeros(1), batch_size=None)


def fit(module: L.LightningModule, root) -> None:
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RouterHeatmap()],
    )
    trainer.fit(module)


def test_heatmap_png_written_after_validation(tmp_path):
    module = HeatmapModule(layer_memory=True)
    fit(module, tmp_path)
    heatmap = module.val_router_heatmap
    assert heatmap.shape == (3, 4)  # layers 2…4 × sources X_0…X_3
    # at initialisation each router keeps (almost) all weight on the latest state X_{l-1}
    latest = torch.stack([heatmap[r, r + 1] for r in range(3)])
    assert torch.all(latest > 0.99)
    assert torch.isnan(heatmap[0, 2:]).all() and not torch.isnan(heatmap[2]).any()
    with Image.open(tmp_path / "router_heatmaps" / "step-0000001.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_nothing_drawn_without_layer_memory(tmp_path):
    fit(HeatmapModule(layer_memory=False), tmp_path)
    assert not (tmp_path / "router_heatmaps").exists()


def test_plot_marks_missing_sources_blank(tmp_path):
    heatmap = torch.full((3, 4), float("nan"))
    for row in range(3):
        heatmap[row, : row + 2] = 1.0  # the brightest colour where a source exists
    with Image.open(plot_router_heatmap(heatmap, tmp_path / "h.png")) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    viridis_top = np.array([253, 231, 37])
    assert (np.abs(pixels.astype(int) - viridis_top).sum(1) < 10).sum() > 100

"""The tiny stage configs as a user runs them, in order: image → video → video-hires → SFT, each starting from
the previous stage's checkpoint through its ``init_from`` (EMA weights) and only that."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsvideo.dit import DiT, DiTConfig
from fsvideo.latent_space import LatentStats
from lightning_modules.cli import FSVideoCLI
from lightning_modules.dit import DiTModule

REPO = Path(__file__).resolve().parents[2]
STAGES = ("dit-pretrain-image", "dit-pretrain-video", "dit-pretrain-video-hires", "dit-sft")


def weights(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_init_from_prefers_ema_weights(tmp_path):
    source = DiTModule(DiTConfig.tiny(), ema_decay=0.9)
    source.set_latent_stats(LatentStats([0.5] * 8, [2.0] * 8, 1))
    with torch.no_grad():
        for p in source.dit_ema.parameters():
            p.add_(1.0)
    path = tmp_path / "stage.ckpt"
    torch.save({"state_dict": source.state_dict(), "networks": source.network_manifest()}, path)
    loaded = DiTModule(DiTConfig.tiny(), init_from=str(path))
    for (name, p), q in zip(loaded.dit.named_parameters(), source.dit_ema.parameters()):
        assert torch.equal(p, q), name
    # the normalisation travels with the weights; an explicit latent_stats wins over it
    assert torch.equal(loaded.latent_mean, source.latent_mean) and torch.equal(
        loaded.latent_std, source.latent_std
    )
    LatentStats([0.0] * 8, [1.0] * 8, 1).write(tmp_path)
    explicit = DiTModule(DiTConfig.tiny(), init_from=str(path), latent_stats=str(tmp_path / "stats.json"))
    explicit.setup("fit")
    assert torch.equal(explicit.latent_mean, torch.zeros(8))
    with pytest.raises(ValueError, match="does not fit"):
        DiTModule(DiTConfig.tiny(num_layers=2), init_from=str(path))


def test_init_from_a_plain_dit_adds_layer_memory_at_init(tmp_path):
    """Figure 7(b): Layer Memory added to a pretrained plain DiT starts as that DiT; only routers may be new."""
    source = DiTModule(DiTConfig.tiny(layer_memory=False), ema_decay=0.9)
    with torch.no_grad():
        for p in source.dit_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the init, so the output is not trivially zero
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": source.state_dict(), "networks": source.network_manifest()}, path)
    retrofit = DiTModule(DiTConfig.tiny(layer_memory=True), init_from=str(path))
    assert len(retrofit.dit.routers) == 3 and all(router.gate == 0 for router in retrofit.dit.routers)
    generator = torch.Generator().manual_seed(0)
    config = DiTConfig.tiny()
    inputs = (
        torch.randn(2, config.in_channels, 3, 2, 2, generator=generator),
        torch.tensor([0.3, 0.8]),
        torch.randn(2, 4, config.text_dim, generator=generator),
        torch.randn(2, 3, config.image_dim, generator=generator),
    )
    with torch.no_grad():
        torch.testing.assert_close(retrofit.dit(*inputs), source.dit_ema(*inputs), rtol=1e-6, atol=1e-6)
    # a checkpoint that lacks more than the routers still does not fit
    del source.dit_ema.blocks[-1]
    del source.dit.blocks[-1]
    torch.save({"state_dict": source.state_dict(), "networks": source.network_manifest()}, path)
    with pytest.raises(ValueError, match="does not fit"):
        DiTModule(DiTConfig.tiny(layer_memory=True), init_from=str(path))


def test_stage_configs_chain_through_init_from(tiny_latents, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/…, data/latents/…) land here
    for name in ("tiny", "tiny-hires"):
        (tmp_path / "data" / "latents" / name).mkdir(parents=True)
        (tmp_path / "data" / "latents" / name / "train").symlink_to(tiny_latents.train.root)
        (tmp_path / "data" / "latents" / name / "val").symlink_to(tiny_latents.val.root)
    for index, stage in enumerate(STAGES):
        # Later stages barely move (lr 1e-9), so their weights show where they started.
        lr = ["--model.init_args.optimizer.lr=1e-9"] if index else []
        FSVideoCLI(
            args=[
                "fit",
                "--config",
                str(REPO / "configs" / "tiny" / f"{stage}.yaml"),
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--checkpoint.every_n_train_steps=2",
                "--wandb.mode=disabled",
                "--data.init_args.num_workers=0",
                "--data.init_args.batches_per_epoch=2",
                "--model.init_args.dit.latent_channels=8",
                *lr,
            ]
        )
    checkpoints = [tmp_path / "runs" / f"tiny-{stage}" / "checkpoints" / "last.ckpt" for stage in STAGES]
    torch.manual_seed(0)  # the seed every stage config sets: a fresh DiT is built exactly like this
    fresh = DiT(DiTConfig.tiny()).state_dict()
    first = weights(checkpoints[0], "dit_ema.")
    assert max((first[k] - fresh[k]).abs().max() for k in fresh) > 1e-5, "stage 1 must have trained"
    for previous, current in zip(checkpoints, checkpoints[1:]):
        started_from, now = weights(previous, "dit_ema."), weights(current, "dit.")
        assert max((now[k] - started_from[k]).abs().max() for k in now) < 1e-6

"""The refiner's training module (§2.4.2): deviation estimate (eq. 13), condition, augmentations, the start from
the base DiT, and a short fit whose checkpoint holds the refiner alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from run_dirs import shard_data_args, tiny_fit_args

from callbacks.loss_history import read_loss_history
from fsvideo.dit import DiT, DiTConfig, image_to_video
from fsvideo.flow import interpolate, sample_sigma
from fsvideo.latent_space import LatentStats
from fsvideo.pretrained import MANIFEST_KEY
from fsvideo.refiner import DYNAMIC_MASK, RefinerTrainingConfig
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig
from lightning_modules.cli import FSVideoCLI
from lightning_modules.refiner import RefinerModule

CHANNELS, TEXT_LEN = 8, 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A random base DiT (with latent statistics) and a random upsampler, as saved-model folders."""
    root = tmp_path_factory.mktemp("refiner_parts")
    torch.manual_seed(0)
    base = DiT(DiTConfig.tiny())
    with torch.no_grad():  # off the zero-initialised head, so the base predicts something
        for param in base.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    stats = LatentStats([0.2] * CHANNELS, [1.5] * CHANNELS, 0)
    upsampler = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=CHANNELS))
    return {
        "base": base.save_pretrained(root / "base", records={"latent_stats": stats.record()}),
        "upsampler": upsampler.save_pretrained(root / "upsampler"),
    }


def make_module(parts, **conditioning) -> RefinerModule:
    module = RefinerModule(
        base_dit=str(parts["base"]),
        upsampler=str(parts["upsampler"]),
        conditioning=RefinerTrainingConfig(**conditioning),
        dit=DiTConfig.tiny(),
        init_from=str(parts["base"]),
        ema_decay=0,
    )
    module.set_empty_text(torch.zeros(1, TEXT_LEN, 32), torch.ones(1, TEXT_LEN, dtype=torch.bool))
    return module


def make_batch(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent": 0.2 + 1.5 * torch.randn(batch, CHANNELS, 4, 4, 4, generator=g),
        "latent_low": 0.2 + 1.5 * torch.randn(batch, CHANNELS, 4, 2, 2, generator=g),
        "text_tokens": torch.randn(batch, TEXT_LEN, 32, generator=g),
        "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool),
        "image_tokens": torch.randn(batch, 5, 32, generator=g),
        "is_image": torch.zeros(batch, dtype=torch.bool),
    }


def test_deviation_estimate_is_eq_13(parts):
    """z̃0 − z0 = v − v̂ on the generated frames; frame 0 is given, so z̃0 = z0 there."""
    module = make_module(parts)
    batch = make_batch()
    torch.manual_seed(7)
    estimate = module.base_normalization.normalize(module.deviation_estimate(batch["latent_low"], batch))
    z0 = module.base_normalization.normalize(batch["latent_low"])
    torch.manual_seed(7)  # the same draws: noise, then σ
    noise = torch.randn_like(z0)
    sigma = sample_sigma(z0.shape[0], device=z0.device)
    condition = image_to_video(z0[:, :, :1], z0.shape[2], 4)
    text = batch["text_tokens"], batch["image_tokens"], batch["text_mask"]
    with torch.no_grad():
        predicted = module.frozen["base_dit"](
            condition.model_input(interpolate(z0, noise, sigma)), sigma, *text
        )
    target = noise - z0
    torch.testing.assert_close(
        (estimate - z0)[:, :, 1:], (target - predicted)[:, :, 1:], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(estimate[:, :, :1], z0[:, :, :1], rtol=1e-5, atol=1e-5)
    # and eq. 13's other form: (ẑ0 − z0)/σ + z0 with ẑ0 = z_σ − σ·v̂ (eq. 12)
    s = sigma.view(-1, 1, 1, 1, 1)
    predicted_clean = interpolate(z0, noise, sigma) - s * predicted
    torch.testing.assert_close(
        estimate[:, :, 1:], ((predicted_clean - z0) / s + z0)[:, :, 1:], rtol=1e-4, atol=1e-4
    )


def test_refiner_starts_as_the_base_dit(parts):
    module = make_module(parts)
    base = module.frozen["base_dit"]
    g = torch.Generator().manual_seed(3)
    first = torch.randn(1, CHANNELS, 1, 2, 2, generator=g)
    condition = image_to_video(first, 3, 4)
    latent_in = condition.model_input(torch.randn(1, CHANNELS, 3, 2, 2, generator=g))
    inputs = (
        latent_in,
        torch.tensor([0.5]),
        torch.randn(1, TEXT_LEN, 32, generator=g),
        torch.randn(1, 5, 32, generator=g),
    )
    with torch.no_grad():
        assert torch.equal(module.dit.eval()(*inputs), base(*inputs))


def test_validation_condition_is_the_clean_draft_with_the_dynamic_mask(parts):
    module = make_module(parts)
    batch = make_batch()
    z0 = module.normalize(batch["latent"])
    condition = module.build_condition(z0, batch, augment=False)
    with torch.no_grad():
        draft = module.normalize(module.frozen["upsampler"](batch["latent_low"]))
    assert torch.equal(condition.latent[:, :, 1:], draft[:, :, 1:])
    assert torch.equal(condition.latent[:, :, :1], z0[:, :, :1])
    mask = condition.mask
    assert (mask[:, :, 0] == 1).all()
    low, high = module.conditioning.mask.low, module.conditioning.mask.high
    assert ((mask[:, :, 1:] >= low - 1e-6) & (mask[:, :, 1:] <= high + 1e-6)).all()
    assert module.dit_records()[DYNAMIC_MASK] == {"low": low, "high": high, "error_scale": 1.0}


def test_condition_dropout_rate_and_replacement(parts):
    module = make_module(parts, condition_dropout=0.3, replace_prob=0.5, shuffle_prob=0.0)
    draft = torch.randn(4, CHANNELS, 5, 2, 2) + 3.0  # never zero, so a dropped draft shows
    confidence = torch.full((4,), 0.6)
    torch.manual_seed(0)
    dropped, replaced, trials = 0, 0, 500
    for _ in range(trials):
        new, conf, rep = module.augment(draft, confidence)
        gone = (new.flatten(1) == 0).all(1)
        assert torch.equal(gone, conf == 0) and not rep[gone].any()
        dropped += int(gone.sum())
        replaced += int(rep.any(1).sum())
    assert abs(dropped / (4 * trials) - 0.3) < 0.04
    assert abs(replaced / (4 * trials) - 0.5 * 0.7) < 0.05  # replaced, then not dropped


@pytest.mark.slow
def test_tiny_refiner_fit_keeps_frozen_networks_out_of_its_checkpoint(
    parts, tiny_latents, sample_shards, tmp_path
):
    run_dir = tmp_path / "run"
    FSVideoCLI(
        args=[
            *tiny_fit_args("refiner-pretrain.yaml", run_dir, 3),
            "--trainer.callbacks=[{class_path: callbacks.loss_history.LossHistory}, {class_path: callbacks.export.ExportNetworks}]",
            f"--model.init_args.init_from={parts['base']}",
            f"--model.init_args.base_dit={parts['base']}",
            f"--model.init_args.upsampler={parts['upsampler']}",
            "--model.init_args.dit.latent_channels=8",
            *shard_data_args(tiny_latents, sample_shards, batches_per_epoch=3),
        ]
    )
    steps, losses = read_loss_history(run_dir)
    assert steps.tolist() == [1, 2, 3] and all(math.isfinite(x) for x in losses)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(checkpoint[MANIFEST_KEY]) == ["refiner"]
    assert not any("base_dit" in k or "upsampler" in k for k in checkpoint["state_dict"])
    assert DYNAMIC_MASK in checkpoint[MANIFEST_KEY]["refiner"]["records"]
    assert (run_dir / "export" / "refiner" / "config.json").is_file()

"""FSAE-Standard / FSAE-Lite decoders (spec §2.2.3): temporal padding, first-frame injection, noise,
chunked Lite decoding, the importer, and the decoder-only finetune of AutoencoderModule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from run_dirs import write_network_run
from torch.utils.data import DataLoader

from cli import main
from fsvideo.ae import FSAE, FSAEConfig, TilingConfig, load_decoder_variant
from fsvideo.ae.temporal_conv import GroupCausalConv3d, NonCausalConv3d
from lightning_modules.autoencoder import AutoencoderModule, PerceptualConfig
from lightning_modules.base import OptimizerConfig

REPO = Path(__file__).resolve().parents[2]
TINY = FSAEConfig.tiny()


@pytest.fixture(scope="module")
def models() -> dict[str, FSAE]:
    """A random stage-3 FSAE and the Standard / Lite decoders imported from it (Lite from Standard)."""
    torch.manual_seed(0)
    causal = FSAE(TINY)
    causal.init_weights()
    standard, _ = load_decoder_variant(causal, TINY.with_decoder_variant("standard"))
    lite, _ = load_decoder_variant(standard, TINY.with_decoder_variant("lite"))
    return {"causal": causal.eval(), "standard": standard.eval(), "lite": lite.eval()}


@pytest.fixture(scope="module")
def encoded(models) -> tuple[torch.Tensor, list[torch.Tensor]]:
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return models["causal"].encode(video, return_first_frame_features=True)


def decode(model: FSAE, latent, features, seed: int = 1, tiling: TilingConfig | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(
            latent, tiling, first_frame_features=features, generator=torch.Generator().manual_seed(seed)
        )


def test_variant_presets_and_bad_values():
    lite = TINY.with_decoder_variant("lite")
    assert (lite.decoder_variant, lite.first_frame_injection, lite.noise_weight) == ("lite", True, 0.05)
    assert lite.decoder_widths == (4, 8) + TINY.widths[2:]
    assert [lite.decoder_group_size(i) for i in range(3)] == [4, 2, 1]
    with pytest.raises(ValueError, match="decoder_variant"):
        FSAEConfig.tiny(decoder_variant="noncausal")
    with pytest.raises(ValueError, match="must divide"):
        FSAEConfig.tiny(lite_widths=(8, 3))


def test_group_causal_conv_sees_its_group_and_the_past_only():
    conv = GroupCausalConv3d(1, 1, (3, 1, 1), group_size=2)
    torch.nn.init.constant_(conv.weight, 1.0)
    torch.nn.init.zeros_(conv.bias)
    x = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1)  # groups [0] [1, 2] [3, 4]
    out = conv(x).flatten().tolist()
    # frame 0: 0 (zero past) + 1 + 1 (replicated); frame 1: 1 + 2 + 3; frame 2: 2 + 3 + 3 (replicated)
    assert out == [2.0, 6.0, 8.0, 3 + 4 + 5, 4 + 5 + 5]
    noncausal = NonCausalConv3d(1, 1, (3, 1, 1))
    noncausal.load_state_dict(conv.state_dict())
    assert noncausal(x).flatten().tolist() == [3.0, 6.0, 9.0, 12.0, 9.0]


def test_decoder_convs_follow_the_variant(models):
    kinds = {
        name: {
            type(m).__name__
            for m in model.decoder.modules()
            if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 1
        }
        for name, model in models.items()
    }
    assert kinds == {
        "causal": {"CausalConv3d"},
        "standard": {"NonCausalConv3d"},
        "lite": {"GroupCausalConv3d"},
    }
    assert all(
        type(m).__name__ == "CausalConv3d"
        for m in models["lite"].encoder.modules()
        if isinstance(m, torch.nn.Conv3d)
    )


@pytest.mark.parametrize("name, sees_future", [("standard", True), ("lite", False)])
def test_only_standard_output_depends_on_later_latent_frames(models, encoded, name, sees_future):
    latent, features = encoded
    changed = latent.clone()
    changed[:, :, 2] += 1.0  # latent frame 2 ↔ pixel frames 5…8
    before, after = decode(models[name], latent, features), decode(models[name], changed, features)
    assert (before[:, :, :5] != after[:, :, :5]).any() == sees_future
    assert (before[:, :, 5:] != after[:, :, 5:]).any()


def test_first_frame_injection_starts_as_identity_and_then_uses_the_features(models, encoded):
    latent, features = encoded
    causal = models["causal"]
    injected, report = load_decoder_variant(causal, dataclasses.replace(TINY, first_frame_injection=True))
    assert all(".first_frame_attention." in name for name in report.new) and len(report.new) == 5 * 8
    with torch.no_grad():
        torch.testing.assert_close(
            injected.decode(latent, first_frame_features=features), causal.decode(latent), rtol=0, atol=0
        )
        attention = injected.decoder.stages[2].first_frame_attention
        torch.nn.init.normal_(attention.to_out.weight, std=0.5)
        shifted = [f + (1.0 if i == 0 else 0.0) for i, f in enumerate(features)]
        changed = injected.decode(latent, first_frame_features=shifted)
    assert (changed - injected.decode(latent, first_frame_features=features)).abs().max() > 1e-3


def test_noise_is_on_reproducible_by_generator_and_weighted(models, encoded):
    latent, features = encoded
    standard = models["standard"]
    a, b, c = (decode(standard, latent, features, seed) for seed in (1, 1, 2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4
    quiet = FSAE(dataclasses.replace(standard.config, noise_weight=0.0)).eval()
    quiet.load_state_dict(standard.state_dict())
    assert (a - decode(quiet, latent, features)).abs().max() > 1e-4


@pytest.mark.parametrize("chunk", [1, 2])
def test_lite_chunked_decode_equals_one_shot(models, encoded, chunk):
    latent, features = encoded
    lite = models["lite"]
    whole = decode(lite, latent, features)
    chunked = decode(lite, latent, features, tiling=TilingConfig(chunk_latent_frames=chunk))
    assert whole.shape == (1, 3, 9, 64, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_decode_rejects_what_a_variant_cannot_do(models, encoded):
    latent, features = encoded
    with pytest.raises(ValueError, match="first_frame_features"):
        models["standard"].decode(latent)
    with pytest.raises(ValueError, match="no first-frame injection"):
        models["causal"].decode(latent, first_frame_features=features)
    with pytest.raises(ValueError, match="temporal chunks"):
        decode(models["standard"], latent, features, tiling=TilingConfig(chunk_latent_frames=1))
    with pytest.raises(ValueError, match="3D tiling"):
        decode(
            models["lite"],
            latent,
            features,
            tiling=TilingConfig(tile_latent_size=(0, 1, 1), tile_latent_overlap=(0, 0, 0)),
        )
    with pytest.raises(ValueError, match="patch decoding"):
        models["lite"].decode_patch(latent, (2, 4, 4))


def test_importer_copies_what_fits_and_reports_the_rest(models):
    standard, lite = models["standard"], models["lite"]
    _, report = load_decoder_variant(standard, lite.config)
    assert report.new == [] and report.dropped == []
    assert report.reshaped and all(
        n.startswith(("decoder.stages.0.", "decoder.stages.1.", "decoder.norm_out", "decoder.conv_out"))
        for n in report.reshaped
    )
    assert "decoder.stages.1.up.conv.weight" in report.reshaped  # 32 → 8 channels instead of 32 → 16
    source, target = standard.state_dict(), lite.state_dict()
    assert all(torch.equal(source[n], target[n]) for n in report.copied)
    assert any(n.startswith("encoder.") for n in report.copied)
    with pytest.raises(ValueError, match="encoder does not fit"):
        load_decoder_variant(standard, FSAEConfig.tiny(latent_channels=8).with_decoder_variant("lite"))


def test_decoder_finetune_from_a_stage3_checkpoint_keeps_the_encoder_bit_identical(models, tmp_path, capsys):
    checkpoint = (
        write_network_run(tmp_path / "stage3", "autoencoder", models["causal"]) / "checkpoints" / "last.ckpt"
    )
    module = AutoencoderModule(
        autoencoder=TINY.with_decoder_variant("standard"),
        optimizer=OptimizerConfig(lr=1e-3),
        perceptual=PerceptualConfig(net="alex"),
        init_from=str(checkpoint),
        init_from_variant=True,
        freeze_encoder=True,
        ema_decay=0.0,
    )
    assert "re-initialised (new): 40" in capsys.readouterr().out
    encoder_before = {k: v.clone() for k, v in module.autoencoder.encoder.state_dict().items()}
    assert all(
        torch.equal(v, models["causal"].state_dict()[f"encoder.{k}"]) for k, v in encoder_before.items()
    )
    decoder_before = {k: v.clone() for k, v in module.autoencoder.decoder.state_dict().items()}
    assert {id(p) for p in module.generator_parameters()} == {
        id(p) for p in module.autoencoder.decoder.parameters()
    }

    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([{"video": video}] * 2, batch_size=None))
    assert trainer.global_step == 1
    assert not module.autoencoder.encoder.training
    encoder = module.autoencoder.encoder
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())
    decoder_after = module.autoencoder.decoder.state_dict()
    assert any(not torch.equal(decoder_after[k], v) for k, v in decoder_before.items())


def test_tiny_configs_chain_stage3_to_standard_to_lite(models, sample_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = write_network_run(tmp_path / "stage3", "autoencoder", models["causal"])
    for variant in ("standard", "lite"):
        run_dir = tmp_path / variant
        main(
            [
                "fit",
                "--config",
                str(REPO / f"configs/tiny/fsae-decoder-{variant}.yaml"),
                f"--model.init_args.init_from={previous}",
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.max_steps=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]",
                "--wandb.mode=disabled",
                f"--data.init_args.train_shards={sample_shards.train}",
                f"--data.init_args.val_shards={sample_shards.val}",
                "--data.init_args.num_workers=0",
                "--data.init_args.batches_per_epoch=1",
                "--data.init_args.val_batches=1",
                "--data.init_args.buckets.size=64",
            ]
        )
        previous = run_dir / "checkpoints" / "last.ckpt"
        state = torch.load(previous, map_location="cpu", weights_only=True)["state_dict"]
        encoder = {k: v for k, v in state.items() if k.startswith("autoencoder.encoder.")}
        assert encoder and all(
            torch.equal(v, models["causal"].state_dict()[k.removeprefix("autoencoder.")])
            for k, v in encoder.items()
        )
    assert state["autoencoder.decoder.stages.0.blocks.0.conv1.weight"].shape[0] == 4  # lite_widths [4, 8]

"""Latent upsampler training (§2.4.1, eq. 9): the loss, the α3 ramp, the size check, the decoder windows, a
`fsvideo fit` of the tiny config against a random FSAE folder, and learning on a fixed clip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_dirs import SMALL_FSAE, write_fsae_run

from fsvideo.ae import FSAE
from fsvideo.pretrained import MANIFEST_KEY, load_network
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig
from lightning_modules.autoencoder import PatchDecodeConfig
from lightning_modules.cli import FSVideoCLI
from lightning_modules.upsampler import DecodeConfig, UpsamplerLossConfig, UpsamplerModule

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/upsampler.yaml")
CHANNELS = SMALL_FSAE.latent_channels


@pytest.fixture(scope="module")
def fsae_folder(tmp_path_factory) -> Path:
    """A random small FSAE, exported as a saved-model folder (what the tiny config names)."""
    root = tmp_path_factory.mktemp("upsampler_fsae")
    run = write_fsae_run(root / "run")
    return load_network(run, FSAE).save_pretrained(root / "autoencoder")


@pytest.fixture(scope="module")
def standard_folder(tmp_path_factory) -> Path:
    """A random small FSAE-Standard (non-causal decoder, first-frame injection, decoder noise)."""
    torch.manual_seed(0)
    fsae = FSAE(SMALL_FSAE.with_decoder_variant("standard"))
    fsae.init_weights()
    return fsae.save_pretrained(tmp_path_factory.mktemp("upsampler_fsae_standard") / "autoencoder")


def make_module(fsae_folder: Path, **kwargs) -> UpsamplerModule:
    torch.manual_seed(0)
    kwargs.setdefault("loss", UpsamplerLossConfig(lpips_net="alex", lpips_ramp_steps=10))
    return UpsamplerModule(
        str(fsae_folder), LatentUpsamplerConfig.tiny(latent_channels=CHANNELS), ema_decay=0, **kwargs
    )


def fixed_video(frames: int = 5, size: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, frames, size, size, generator=generator) * 2 - 1


def test_loss_is_eq9(fsae_folder):
    module = make_module(fsae_folder)
    with torch.no_grad():  # move proj_out off zero, so the upsampler is not plain interpolation
        module.upsampler.proj_out.weight.normal_(std=0.05)
    video, step = fixed_video(), 4
    terms = module.compute_loss(video, step)

    fsae, lpips = load_network(fsae_folder, FSAE), module.frozen["lpips"]
    frames = video.transpose(1, 2).flatten(0, 1)
    low = F.interpolate(frames, scale_factor=0.5, mode="bicubic", antialias=True).clamp(-1, 1)
    low = low.unflatten(0, (1, 5)).transpose(1, 2)
    z_high, z_low = fsae.encode(video), fsae.encode(low)
    predicted = module.upsampler(z_low)
    decoded = fsae.decode(predicted)
    alpha3 = 0.1 + 0.9 * step / 10
    expected = (
        0.1 * (predicted - z_high).abs().mean()
        + 0.1 * (decoded - video).abs().mean()
        + alpha3 * lpips(decoded, video)
    )
    torch.testing.assert_close(terms["loss"], expected)
    assert float(terms["alpha3"]) == pytest.approx(alpha3)


def test_alpha3_ramps_linearly_then_holds():
    config = UpsamplerLossConfig(lpips_start=0.1, lpips_end=1.0, lpips_ramp_steps=100)
    assert [config.alpha3(s) for s in (0, 50, 100, 1000)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    assert UpsamplerLossConfig(lpips_ramp_steps=0).alpha3(0) == 1.0


def test_sides_must_be_multiples_of_128(fsae_folder):
    module = make_module(fsae_folder)
    with pytest.raises(ValueError, match=r"multiples of 128.*buckets.multiple: 128"):
        module.compute_loss(fixed_video(frames=1, size=192), step=0)


def test_window_with_history_from_the_first_frame_is_exact(fsae_folder):
    # context reaching frame 0 makes a causal window exact: it equals the full decode's frames
    module = make_module(fsae_folder, decode=DecodeConfig(latent_frames=1, context_frames=8))
    latent = torch.randn(1, CHANNELS, 3, 1, 1)
    full = module.autoencoder.decode(latent)
    for _ in range(2):
        decoded, index = module.decode_for_loss(latent, None)
        assert decoded.shape[2] in (1, 4)
        torch.testing.assert_close(decoded, full[index])


def test_mid_video_window_decodes_only_the_window(fsae_folder):
    module = make_module(fsae_folder, decode=DecodeConfig(latent_frames=1, context_frames=0))
    latent = torch.randn(1, CHANNELS, 3, 1, 1)
    torch.manual_seed(0)
    sizes = {module.decode_for_loss(latent, None)[0].shape[2] for _ in range(6)}
    assert sizes <= {1, 4} and 4 in sizes  # latent frame 0 → 1 pixel frame, later ones → 4


def test_patch_decode_of_the_whole_map_is_the_full_decode(fsae_folder):
    patch = PatchDecodeConfig(min_pixels=0, latent_patch_size=(2, 16, 16))  # tail input of a 128² clip
    module = make_module(fsae_folder, decode=DecodeConfig(patch_decode=patch))
    latent = torch.randn(1, CHANNELS, 2, 2, 2)
    decoded, index = module.decode_for_loss(latent, None)
    torch.testing.assert_close(decoded, module.autoencoder.decode(latent)[index])


def test_standard_decoder_window_trains_the_upsampler(standard_folder):
    with pytest.raises(ValueError, match="patch_decode needs the causal"):
        make_module(standard_folder, decode=DecodeConfig(patch_decode=PatchDecodeConfig()))
    module = make_module(standard_folder, decode=DecodeConfig(latent_frames=1, context_frames=1))
    with torch.no_grad():
        module.upsampler.proj_out.weight.normal_(std=0.05)
    terms = module.compute_loss(fixed_video(), step=0)  # first-frame features of V_high reach the decoder
    terms["loss"].backward()
    assert module.upsampler.proj_in.weight.grad.abs().sum() > 0


def test_init_from_a_saved_upsampler(fsae_folder, tmp_path):
    source = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=CHANNELS))
    source.init_weights()
    with torch.no_grad():
        source.proj_out.weight.normal_()
    folder = source.save_pretrained(tmp_path / "upsampler")
    module = make_module(fsae_folder, init_from=str(folder))
    assert torch.equal(module.upsampler.proj_out.weight, source.proj_out.weight)


def test_fit_tiny_config(fsae_folder, sample_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    cli = FSVideoCLI(
        args=[
            "fit",
            "--config",
            TINY,
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--wandb.mode=disabled",
            f"--model.init_args.autoencoder={fsae_folder}",
            f"--model.init_args.upsampler.latent_channels={CHANNELS}",
            f"--data.init_args.train_shards={sample_shards.train}",
            f"--data.init_args.val_shards={sample_shards.val}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=1",
            "--data.init_args.batches_per_epoch=2",
            "--data.init_args.val_batches=1",
            "--data.init_args.buckets.size=128",
        ]
    )
    metrics = cli.trainer.callback_metrics
    for route in ("upsampler", "latent_trilinear", "rgb_bicubic"):
        assert math.isfinite(float(metrics[f"val/psnr_{route}"])) and f"val/lpips_{route}" in metrics
    assert float(metrics["train/alpha3"]) > 0.1  # the ramp has begun
    assert list((run_dir / "videos").rglob("*.mp4")), "V_high beside the three routes"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert list(checkpoint[MANIFEST_KEY]) == ["upsampler"]
    assert checkpoint[MANIFEST_KEY]["upsampler"]["class_name"] == "LatentUpsampler"
    prefixes = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert prefixes <= {"upsampler", "upsampler_ema", "skipped_nonfinite"}, prefixes  # no FSAE, no LPIPS
    exported = load_network(run_dir / "export" / "upsampler", LatentUpsampler)
    from_run = load_network(run_dir, LatentUpsampler)
    for key, value in exported.state_dict().items():
        assert torch.equal(from_run.state_dict()[key], value)


@pytest.mark.slow
def test_learns_a_fixed_clip(fsae_folder):
    module = make_module(fsae_folder, loss=UpsamplerLossConfig(lpips_net="alex", lpips_ramp_steps=0))
    optimizer = torch.optim.Adam(module.upsampler.parameters(), lr=3e-3)
    video = fixed_video(frames=1)  # a still: the same objective at a fifth of the cost
    losses = []
    for step in range(30):
        loss = module.compute_loss(video, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses

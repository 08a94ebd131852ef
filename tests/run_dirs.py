"""Run directories as ``fsvideo fit`` leaves them (``checkpoints/last.ckpt`` with its network manifest), with
random weights, for the tests that encode latents or build pipelines. Importable from every test folder (pytest
puts ``tests/`` on the path for its conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from fsvideo.ae import FSAE, FSAEConfig
from fsvideo.dit import DiT, DiTConfig
from fsvideo.encoders import save_tiny_encoders
from fsvideo.latent_space import LatentStats
from fsvideo.pretrained import MANIFEST_KEY, load_network, network_manifest_entry
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig

REPO = Path(__file__).resolve().parents[1]

FRAMES, HEIGHT, WIDTH = 5, 128, 64
"""Video size of ``write_tiny_runs``' pipeline config."""

SMALL_FSAE = FSAEConfig.tiny(latent_channels=8, widths=(4, 8, 16, 16, 32, 32, 32))
"""Narrower than the tiny preset so that encoding the sample clips takes seconds; 8 latent channels as
``DiTConfig.tiny()``."""


def write_fsae_run(
    run_dir: Path, config: FSAEConfig = SMALL_FSAE, seed: int = 0, encoder_of: Path | None = None
) -> Path:
    """A run of a random FSAE (weights drawn from ``seed`` without touching the global RNG); with
    ``encoder_of``, the encoder's weights are copied from that run, as a decoder finetune (§2.2.3) keeps them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = FSAE(config)
        autoencoder.init_weights()
    if encoder_of is not None:
        autoencoder.encoder.load_state_dict(load_network(encoder_of, FSAE).encoder.state_dict())
    return write_network_run(run_dir, "autoencoder", autoencoder)


def write_network_run(
    run_dir: Path,
    name: str,
    network: nn.Module,
    ema: nn.Module | None = None,
    records: dict[str, Any] | None = None,
    prefix: str | None = None,
) -> Path:
    """``run_dir/checkpoints/last.ckpt`` holding ``network`` (and its EMA twin) under ``prefix`` (default the
    name), with the manifest a training stage writes."""
    prefix = prefix or name
    state = {f"{prefix}.{k}": v for k, v in network.state_dict().items()}
    if ema is not None:
        state |= {f"{prefix}_ema.{k}": v for k, v in ema.state_dict().items()}
    entry = network_manifest_entry(network, prefix, None if ema is None else f"{prefix}_ema", records)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, MANIFEST_KEY: {name: entry}}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


def write_tiny_runs(directory: Path, latent_stats: bool = True) -> Path:
    """Tiny FSAE and DiT runs, tiny encoders and a pipeline config for them; returns the config path."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    fsae_config = FSAEConfig.tiny()
    autoencoder = FSAE(fsae_config)
    autoencoder.init_weights()
    fsae_run = write_network_run(directory / "fsae", "autoencoder", autoencoder, ema=autoencoder)
    dit_config = DiTConfig.tiny(latent_channels=fsae_config.latent_channels)
    dit = DiT(dit_config)
    with torch.no_grad():  # move every weight off its init (the head starts at zero)
        for param in dit.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    channels = fsae_config.latent_channels
    records = {}
    if latent_stats:
        mean = 0.1 * torch.randn(channels, generator=generator)
        std = 0.5 + torch.rand(channels, generator=generator)
        records["latent_stats"] = LatentStats(mean.tolist(), std.tolist(), 0).record()
    dit_run = write_network_run(directory / "dit", "dit", dit, ema=dit, records=records)
    encoders = save_tiny_encoders(directory / "encoders")
    config = {
        "autoencoder": str(fsae_run),
        "dit": str(dit_run),
        "text_encoder": str(encoders["text"]),
        "image_encoder": str(encoders["image"]),
        "text_len": 16,
        "device": "cpu",
        "generation": {
            "num_frames": FRAMES,
            "height": HEIGHT,
            "width": WIDTH,
            "steps": 3,
            "guidance_scale": 3.0,
            "shift": 2.0,
            "sampler": "euler",
            "seed": 0,
        },
    }
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_two_stage_config(directory: Path) -> Path:
    """``write_tiny_runs``' pipeline plus a random latent upsampler and refiner (saved-model folders): the
    two-stage chain of Figure 2; returns the config path."""
    config = yaml.safe_load(write_tiny_runs(directory).read_text())
    generator = torch.Generator().manual_seed(1)
    channels = FSAEConfig.tiny().latent_channels
    upsampler = LatentUpsampler(LatentUpsamplerConfig.tiny(latent_channels=channels))
    refiner = load_network(config["dit"], DiT)  # the refiner starts as the base DiT, then moves off it
    with torch.no_grad():
        for param in refiner.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    records = {"latent_stats": LatentStats([0.0] * channels, [1.0] * channels, 0).record()}
    config["upsampler"] = str(upsampler.save_pretrained(directory / "upsampler"))
    config["refiner"] = str(refiner.save_pretrained(directory / "refiner", records=records))
    config["refine"] = {"steps": 2, "guidance_scale": 2.0, "shift": None, "sampler": "euler"}
    config["generation"] |= {"height": 128, "width": 128}
    path = directory / "pipeline-2x.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_test_image(path: Path, height: int = 96, width: int = 160, mode: str = "RGB") -> Path:
    """A smooth colour image (wider than the video, so "crop" has work to do)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 9.0)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def tiny_fit_args(config: str, run_dir: Path, max_steps: int) -> list[str]:
    """The start of an `fsvideo fit` of ``configs/tiny/<config>`` into ``run_dir`` for ``max_steps`` steps, without
    validation, progress bar or wandb."""
    return [
        "fit",
        "--config",
        str(REPO / "configs/tiny" / config),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--wandb.mode=disabled",
    ]


def tiny_latent_encoders(tiny_latents: Any) -> dict[str, Any]:
    """The ``encoders`` of a data module that reads the sample shards as ``tiny_latents`` encoded them (its
    FSAE run, the tiny text and image encoders, 16 text tokens)."""
    return {
        "autoencoder": str(tiny_latents.fsae_run),
        "text_encoder": str(tiny_latents.encoders["text"]),
        "image_encoder": str(tiny_latents.encoders["image"]),
        "text_len": 16,
    }


def shard_data_args(
    tiny_latents: Any, sample_shards: Any, batches_per_epoch: int, val_shards: str | None = None
) -> list[str]:
    """`fsvideo fit` data arguments of a refiner-stage run on the first sample training shard, decoded at 128²
    and encoded as ``tiny_latents`` was, 5 frames, in-process loading; no validation unless ``val_shards``."""
    encoders = yaml.safe_dump(tiny_latent_encoders(tiny_latents), default_flow_style=True).strip()
    return [
        f"--data.init_args.encoders={encoders}",
        f"--data.init_args.latent_stats={tiny_latents.train.root / 'stats.json'}",
        f"--data.init_args.train_shards={sample_shards.root / 'train-000000.tar'}",
        f"--data.init_args.val_shards={val_shards or 'null'}",
        "--data.init_args.num_frames=5",
        "--data.init_args.buckets.size=128",
        "--data.init_args.num_workers=0",
        f"--data.init_args.batches_per_epoch={batches_per_epoch}",
    ]


def latent_cache_args(cache: Path, batches_per_epoch: int = 4) -> list[str]:
    """`fsvideo fit` data arguments of a DiT-stage run on a latent cache: no validation cache, no stills,
    in-process loading."""
    return [
        f"--data.init_args.train_cache={cache}",
        "--data.init_args.val_cache=null",
        "--data.init_args.image_fraction=null",
        "--data.init_args.num_workers=0",
        f"--data.init_args.batches_per_epoch={batches_per_epoch}",
    ]


def write_dit_stage_checkpoint(path: Path, stats: LatentStats | None = None) -> Any:
    """A tiny DiT stage (``DiTModule``, seed 1, EMA decay 0.9, latent stats ``stats``: by default mean 0 and std 1
    over 8 channels) saved at ``path`` as `fsvideo fit` saves one, for ``--model.init_args.init_from``;
    returns the module."""
    from lightning_modules.dit import DiTModule

    torch.manual_seed(1)
    source = DiTModule(DiTConfig.tiny(), ema_decay=0.9)
    source.set_latent_stats(stats or LatentStats([0.0] * 8, [1.0] * 8, 1))
    torch.save({"state_dict": source.state_dict(), "networks": source.network_manifest()}, path)
    return source

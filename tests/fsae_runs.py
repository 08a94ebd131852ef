"""FSAE run directories as ``fsvideo fit`` leaves them (``config.yaml`` + ``checkpoints/last.ckpt``), with random
weights, for the tests that encode latents or build pipelines. Importable from every test folder (pytest puts
``tests/`` on the path for its conftest)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from fsvideo.ae import FSAE, FSAEConfig

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
        state = torch.load(encoder_of / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        prefix = "autoencoder.encoder."
        autoencoder.encoder.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    (run_dir / "checkpoints").mkdir(parents=True)
    state = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    torch.save({"state_dict": state}, run_dir / "checkpoints" / "last.ckpt")
    fields = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as a saved config has them
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"autoencoder": fields}}}))
    return run_dir

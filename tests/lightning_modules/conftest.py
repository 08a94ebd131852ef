"""Fixtures of the DiT stage tests: a small random FSAE run, tiny condition encoders, and latent caches of the
sample shards encoded with them (once per session)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from run_dirs import write_fsae_run

from datamodules.buckets import BucketConfig
from datamodules.latent_writer import encode_shards

TEXT_LEN = 16
CACHE_ARGS = {"text_len": TEXT_LEN, "buckets": BucketConfig(size=64), "num_frames": 5, "batch_size": 4}


@pytest.fixture(scope="session")
def tiny_latents(sample_shards, tiny_encoders, tmp_path_factory) -> SimpleNamespace:
    """``.train`` / ``.val``: latent caches (one training shard, the validation shard) of the sample data at
    bucket size 64 (one 64×64 bucket: latents 1×1 per frame) and 5 frames; ``.fsae_run`` and ``.encoders`` (``save_tiny_encoders`` paths) made them."""
    root = tmp_path_factory.mktemp("dit_latents")
    fsae_run = write_fsae_run(root / "fsae")
    encoders = tiny_encoders
    train_shard = str(sample_shards.root / "train-000000.tar")
    conditions = {"text_encoder": encoders["text"], "image_encoder": encoders["image"]}
    train = encode_shards(fsae_run, train_shard, root / "train", **conditions, **CACHE_ARGS)
    val = encode_shards(
        fsae_run, sample_shards.val, root / "val", validation=True, **conditions, **CACHE_ARGS
    )
    return SimpleNamespace(train=train, val=val, fsae_run=fsae_run, encoders=encoders, root=root)

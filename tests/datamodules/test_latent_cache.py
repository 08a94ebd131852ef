"""The latent cache: what ``encode_shards`` writes equals encoding the clips the video pipeline cuts, its
statistics and fingerprint, refusals, and the two DiT DataModules (cache and on-the-fly) built on it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from run_dirs import SMALL_FSAE, write_fsae_run

from datamodules.buckets import BucketConfig
from datamodules.latent_cache import LatentCache, read_cache_samples
from datamodules.latent_encoder import EncoderPaths, LatentEncoder
from datamodules.latent_writer import encode_shards
from datamodules.latents import EncodingVideoDataModule, LatentDataModule
from datamodules.pipeline import normalize_video
from datamodules.samples import SampleDecoder
from datamodules.shards import read_shard
from datamodules.skips import SkipCounter

BUCKETS = BucketConfig(size=128)
ARGS = {"text_len": 16, "buckets": BUCKETS, "num_frames": 5, "batch_size": 3}


@pytest.fixture(scope="module")
def made(sample_shards, tiny_encoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache")
    fsae = write_fsae_run(root / "fsae", seed=0)
    encoders = tiny_encoders
    conditions = {"text_encoder": encoders["text"], "image_encoder": encoders["image"]}
    shard = str(sample_shards.root / "train-000000.tar")
    train = encode_shards(fsae, shard, root / "train", **conditions, **ARGS)
    val = encode_shards(fsae, sample_shards.val, root / "val", validation=True, **conditions, **ARGS)
    paths = EncoderPaths(str(fsae), str(encoders["text"]), str(encoders["image"]), text_len=16)
    return dataclasses.make_dataclass("Made", ["root", "fsae", "encoders", "shard", "train", "val", "paths"])(
        root, fsae, encoders, shard, train, val, paths
    )


def test_cached_samples_are_the_encoded_pipeline_clips(made):
    encoder = LatentEncoder.from_paths(made.paths)
    raws = {raw["__key__"]: raw for raw in read_shard(made.shard, SkipCounter())}
    decoder = SampleDecoder(BUCKETS.bucket_set(5), 24.0, train=True)
    samples = list(read_cache_samples(made.train))
    assert (
        len(samples) == made.train.index["samples"] == len(raws) - sum(made.train.index["skipped"].values())
    )
    for sample in samples:
        index = list(raws).index(sample.meta["source_key"])
        clip = decoder(raws[sample.meta["source_key"]], np.random.default_rng([0, 1, 0, 0, index]))
        assert clip.bucket.name == sample.bucket and clip.caption == sample.caption
        video = normalize_video(clip.frames.transpose(0, 1)[None])
        expected = encoder(video, [clip.caption])
        assert torch.allclose(sample.latent, expected["latent"][0], atol=1e-5)
        assert sample.latent.shape == SMALL_FSAE.latent_shape(*clip.frames.shape[:1], *clip.frames.shape[2:])
        # the FSAE is causal: the first-frame latent is the latent of frame 0 alone
        first = encoder.autoencoder.encode(video[:, :, :1])
        assert torch.allclose(sample.latent[:, :1], first[0], atol=1e-5)
        n = int(expected["text_mask"][0].sum())
        assert sample.text_tokens.shape[0] == n
        assert torch.allclose(
            sample.text_tokens.float(), expected["text_tokens"][0, :n], atol=2e-2, rtol=2e-2
        )
        assert torch.allclose(sample.image_tokens.float(), expected["image_tokens"][0], atol=2e-2, rtol=2e-2)
    assert {s.is_image for s in samples} == {True, False}


def test_stats_are_the_per_channel_moments_of_the_cache(made):
    latents = torch.cat([s.latent.flatten(1) for s in read_cache_samples(made.train)], dim=1).double()
    stats = made.train.stats
    assert stats.elements_per_channel == latents.shape[1]
    assert np.allclose(stats.mean, latents.mean(1).numpy(), atol=1e-6)
    assert np.allclose(stats.std, latents.std(1, correction=0).numpy(), atol=1e-6)


def test_fingerprint_describes_the_cache_and_refuses_a_different_one(made, tmp_path):
    fingerprint = made.train.fingerprint
    space = fingerprint["latent_space"]
    assert space["autoencoder"]["latent_channels"] == 8 and space["autoencoder"]["spatial_compression"] == 64
    assert len(space["autoencoder"]["encoder_sha256"]) == 64 and len(space["text_encoder"]["sha256"]) == 64
    assert "decoder_depths" not in space["autoencoder"]  # the decoder does not shape the latent
    assert fingerprint["encoders"]["autoencoder"]["config"]["decoder_depths"] == list(
        SMALL_FSAE.decoder_depths
    )
    assert made.train.latent_space == made.val.latent_space
    assert fingerprint["clips"]["num_frames"] == 5 and fingerprint["clips"]["buckets"]["size"] == 128

    other = write_fsae_run(tmp_path / "other-fsae", seed=1)
    out = tmp_path / "cache"
    encode_shards(other, made.shard, out, **ARGS)  # latents only
    again = encode_shards(other, made.shard, out, **ARGS)  # same fingerprint, complete: kept
    assert again.index["samples"] == made.train.index["samples"] and not again.has_conditions
    with pytest.raises(ValueError, match="made differently"):
        encode_shards(made.fsae, made.shard, out, **ARGS)
    with pytest.raises(ValueError, match="latents-only"):
        again.empty_text()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        encode_shards(other, made.shard, tmp_path / "junk", **ARGS)
    with pytest.raises(FileNotFoundError, match="fsvideo data encode"):
        LatentCache.open(tmp_path / "nowhere")
    # a validation cache from another FSAE cannot be used with this training cache
    module = LatentDataModule(str(made.train.root), str(out))
    with pytest.raises(ValueError, match=r"different latent spaces \(\['autoencoder.encoder_sha256'"):
        module.setup("fit")


def test_datamodule_batches_by_bucket_and_kind(made):
    module = LatentDataModule(str(made.train.root), str(made.val.root), batch_size=2, num_workers=0)
    module.setup("fit")
    assert module.latent_stats == made.train.stats
    tokens, mask = module.empty_text
    assert tokens.shape == (1, 16, 32) and mask[0].sum() == 1  # the empty prompt is just </s>
    batches = list(module.train_dataloader())
    assert len(batches) == module.batches_per_epoch
    for batch in batches[:6]:
        b, c, t, h, w = batch["latent"].shape
        assert (b, c) == (2, 8) and batch["meta"]["bucket"].startswith(f"{1 + 4 * (t - 1)}x")
        assert batch["text_tokens"].shape == (2, 16, 32) and batch["image_tokens"].shape == (2, 5, 32)
        assert torch.equal(batch["text_tokens"] != 0, batch["text_mask"][..., None].expand(-1, -1, 32))
        assert bool(batch["is_image"].all()) == (t == 1)
    for fraction, want_images in ((1.0, True), (0.0, False)):
        only = LatentDataModule(str(made.train.root), batch_size=2, num_workers=0, image_fraction=fraction)
        only.batches_per_epoch = 4
        assert all(bool(b["is_image"].all()) == want_images for b in only.train_dataloader())
    first, second = (list(module.val_dataloader()) for _ in range(2))
    assert all(torch.equal(a["latent"], b["latent"]) for a, b in zip(first, second))


def test_datamodule_resumes_where_the_checkpoint_left(made):
    def fresh() -> LatentDataModule:
        return LatentDataModule(str(made.train.root), batch_size=2, num_workers=0, batches_per_epoch=3)

    whole = fresh()
    stream = list(whole.train_dataloader()) + list(whole.train_dataloader())
    first = fresh()
    list(first.train_dataloader())
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = list(resumed.train_dataloader())
    assert [b["meta"]["key"] for b in after] == [b["meta"]["key"] for b in stream[3:]]


def test_encoding_video_datamodule_gives_the_cached_numbers(made, sample_shards):
    module = EncodingVideoDataModule(
        made.paths,
        str(made.val.root),
        train_shards=sample_shards.val,
        val_shards=sample_shards.val,
        batch_size=1,
        num_workers=0,
        num_frames=5,
        buckets=BUCKETS,
        val_batches=3,
    )
    module.setup("fit")
    cached = {s.meta["source_key"]: s for s in read_cache_samples(made.val)}
    for batch in module.val_dataloader():
        out = module.on_after_batch_transfer(batch, 0)
        assert "video" not in out
        sample = cached[out["meta"]["key"][0]]
        assert torch.allclose(out["latent"][0], sample.latent, atol=1e-5)
        n = int(out["text_mask"][0].sum())
        assert torch.allclose(out["text_tokens"][0, :n], sample.text_tokens.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="both"):
        EncoderPaths(str(made.fsae), text_encoder=str(made.encoders["text"]))

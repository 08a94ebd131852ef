"""An interrupted ``fsvideo data encode`` resumes after its committed shards, rewrites a shard cut short, and
ends with the cache an uninterrupted encode writes: same samples in the same shards, statistics and skips."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from run_dirs import write_fsae_run
from synthetic_media import caption, mp4, write_tar

from datamodules.buckets import BucketConfig
from datamodules.commands import data_main
from datamodules.latent_cache import INDEX_FILE, LatentCache, LatentSample, unpack_sample
from datamodules.latent_writer import encode_shards
from datamodules.shards import read_shard
from datamodules.skips import SkipCounter

ARGS = {
    "text_len": 16,
    "buckets": BucketConfig(size=128),
    "num_frames": 5,
    "batch_size": 2,
    "samples_per_shard": 3,
}


class Interrupt(Exception):
    pass


def stop_after(shards: int):
    def on_shard(committed: int) -> None:
        if committed == shards:
            raise Interrupt

    return on_shard


@pytest.fixture(scope="module")
def setup(sample_shards, tiny_encoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    bad = write_tar(
        root / "bad.tar",
        [
            ("broken.mp4", b"not a video"),
            ("broken.json", caption()),
            ("good.mp4", mp4(24, width=128, height=128)),
            ("good.json", caption("good")),
            ("nocaption.mp4", mp4(24)),
        ],
    )
    shards = [
        str(sample_shards.root / "train-000000.tar"),
        bad,
        str(root / "missing.tar"),
        str(sample_shards.root / "train-000001.tar"),
    ]
    kwargs = {
        "autoencoder": write_fsae_run(root / "fsae", seed=0),
        "shards": shards,
        "text_encoder": tiny_encoders["text"],
        "image_encoder": tiny_encoders["image"],
        **ARGS,
    }
    committed = []
    whole = encode_shards(out=root / "whole", on_shard=committed.append, **kwargs)
    return root, kwargs, whole, committed


def shard_samples(url: str) -> list[LatentSample]:
    return [unpack_sample(raw) for raw in read_shard(url, SkipCounter())]


def assert_same_cache(a: LatentCache, b: LatentCache) -> None:
    assert a.index == b.index
    assert np.allclose(a.stats.mean, b.stats.mean, atol=1e-7) and np.allclose(
        a.stats.std, b.stats.std, atol=1e-7
    )
    assert a.stats.elements_per_channel == b.stats.elements_per_channel
    for url_a, url_b in zip(a.urls, b.urls, strict=True):
        samples_a, samples_b = shard_samples(url_a), shard_samples(url_b)
        assert [s.meta for s in samples_a] == [s.meta for s in samples_b]
        for x, y in zip(samples_a, samples_b, strict=True):
            assert torch.allclose(x.latent, y.latent, atol=1e-6)
            assert torch.equal(x.text_tokens, y.text_tokens) and torch.equal(x.image_tokens, y.image_tokens)
    assert (a.root / "empty_text.safetensors").read_bytes() == (
        b.root / "empty_text.safetensors"
    ).read_bytes()


def test_uninterrupted_encode_has_fixed_shard_bounds_and_counts_skips(setup):
    root, kwargs, whole, committed = setup
    assert whole.index["samples"] == 17 and whole.index["shards"] == [
        f"latents-{i:06d}.tar" for i in range(6)
    ]
    assert whole.index["skipped"]["decode"] == 1 and whole.index["skipped"]["json"] == 1
    assert whole.index["skipped"]["shard"] == 1
    assert committed == [1, 2, 3, 4, 5, 6]
    # shard k holds the k-th run of samples_per_shard usable clips of the input (batching by bucket may reorder
    # clips inside a shard, never across shards)
    usable = [
        (url, raw["__key__"])
        for url in kwargs["shards"]
        for raw in read_shard(url, SkipCounter(warn=False))
        if raw["__key__"] not in ("broken", "nocaption")
    ]
    assert len(usable) == 17
    for shard, url in enumerate(whole.urls):
        held = {(s.meta["source_url"], s.meta["source_key"]) for s in shard_samples(url)}
        assert held == set(usable[3 * shard : 3 * shard + 3])
    assert not list(root.glob("whole/*.progress.json"))  # the index supersedes the progress records


def test_interrupted_encode_resumes_where_it_stopped(setup, caplog):
    root, kwargs, whole, _ = setup
    out = root / "interrupted"
    with pytest.raises(Interrupt):
        encode_shards(out=out, on_shard=stop_after(4), **kwargs)
    assert not (out / INDEX_FILE).exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCache.open(out)
    # killed while writing shard 4, and shard 3 cut short on disk: both are written again
    (out / "latents-000004.tar.partial").write_bytes(b"half a tar")
    tar = out / "latents-000003.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    kept = {name: (out / name).stat().st_mtime_ns for name in ("latents-000000.tar", "latents-000002.tar")}

    committed = []
    with caplog.at_level(logging.INFO, logger="datamodules.latent_writer"):
        resumed = encode_shards(out=out, on_shard=committed.append, **kwargs)
    assert "latents-000003.tar is cut short" in caplog.text
    assert "after 3 shard(s), 9 samples" in caplog.text
    assert committed == [4, 5, 6]
    assert {
        name: (out / name).stat().st_mtime_ns for name in kept
    } == kept  # committed shards kept as they are
    assert not list(out.glob("*.partial"))
    assert_same_cache(whole, resumed)


def test_resume_needs_the_same_settings_and_restart_starts_over(setup):
    root, kwargs, whole, _ = setup
    out = root / "restart"
    with pytest.raises(Interrupt):
        encode_shards(out=out, on_shard=stop_after(2), **kwargs)
    with pytest.raises(ValueError, match="--samples-per-shard"):
        encode_shards(out=out, **{**kwargs, "samples_per_shard": 4})
    committed = []
    restarted = encode_shards(out=out, restart=True, on_shard=committed.append, **kwargs)
    assert committed == [1, 2, 3, 4, 5, 6]
    assert_same_cache(whole, restarted)
    # a complete cache of the same fingerprint is kept as it is
    committed.clear()
    assert (
        encode_shards(out=out, on_shard=committed.append, **kwargs).index == whole.index and committed == []
    )


def test_encode_command_resumes_with_restart_flag(setup, capsys):
    root, kwargs, whole, _ = setup
    out = root / "command"
    with pytest.raises(Interrupt):
        encode_shards(out=out, on_shard=stop_after(5), **kwargs)
    argv = [
        "encode",
        "--config",
        str(kwargs["autoencoder"]),
        "--shards",
        *kwargs["shards"],
        "--out",
        str(out),
    ]
    argv += ["--text-encoder", str(kwargs["text_encoder"]), "--image-encoder", str(kwargs["image_encoder"])]
    argv += ["--text-len", "16", "--size", "128", "--num-frames", "5", "--batch-size", "2"]
    argv += ["--samples-per-shard", "3"]
    data_main(argv)
    assert_same_cache(whole, LatentCache.open(out))
    before = (out / "latents-000000.tar").stat().st_mtime_ns
    data_main([*argv, "--restart"])
    assert (out / "latents-000000.tar").stat().st_mtime_ns != before
    assert_same_cache(whole, LatentCache.open(out))

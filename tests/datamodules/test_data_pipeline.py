"""The bucketed stream on the sample shards: one bucket per batch, DDP splits, equal counts, mixing, resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.buckets import BucketConfig, Resolution
from datamodules.pipeline import BucketedClipDataset, normalize_video
from datamodules.shards import expand_shards
from datamodules.video import VideoDataModule

SMALL = BucketConfig(size=128)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["meta"]["key"]]


def run_rank(shards, rank, world_size, batches, num_workers=2, batch_size=1, train=True, **kwargs):
    dataset = BucketedClipDataset(
        shards,
        SMALL.bucket_set(5),
        batch_size,
        batches,
        fps=8,
        train=train,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


def test_batches_hold_one_bucket_and_the_promised_fields(sample_shards):
    dm = VideoDataModule(
        sample_shards.train,
        batch_size=3,
        num_workers=0,
        num_frames=5,
        fps=8,
        buckets=SMALL,
        batches_per_epoch=10,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    for batch in batches:
        video = batch["video"]
        b, c, t, h, w = video.shape
        assert (b, c) == (3, 3) and video.dtype == torch.float32 and video.is_contiguous()
        assert batch["meta"]["bucket"] == f"{t}x{h}x{w}" and h % 64 == 0 and w % 64 == 0
        assert -1.0 <= video.min() < -0.5 and 0.5 < video.max() <= 1.0
        assert batch["is_image"].tolist() == [t == 1] * 3
        assert len(batch["caption"]) == 3 and all(isinstance(s, str) and s for s in batch["caption"])
    assert {b["video"].shape[2] for b in batches} == {1, 5}  # stills and clips both come through


def test_ranks_and_workers_read_disjoint_shards_and_yield_equal_counts(sample_shards):
    # 4 shards, 2 ranks × 2 workers: each worker owns one shard (8 samples), 3 batches each stay in it.
    per_rank = [run_rank(sample_shards.train, rank, 2, batches=6) for rank in range(2)]
    assert [len(b) for b in per_rank] == [6, 6]
    rank_keys = [set(keys(b)) for b in per_rank]
    assert len(rank_keys[0]) == len(rank_keys[1]) == 6 and not rank_keys[0] & rank_keys[1]
    shard_of = {(b["meta"]["rank"], b["meta"]["worker"]): set(b["meta"]["url"]) for r in per_rank for b in r}
    urls = [u for s in shard_of.values() for u in s]
    assert len(shard_of) == 4 and len(urls) == len(set(urls)) == 4


def test_uneven_shards_still_give_every_rank_the_same_count(sample_shards):
    # 4 shards over 3 ranks: rank 0 reads two shards, the others one, which they cycle through.
    per_rank = [run_rank(sample_shards.train, rank, 3, batches=10, num_workers=1) for rank in range(3)]
    assert [len(b) for b in per_rank] == [10, 10, 10]
    first_pass = [
        {k for b in r if b["meta"]["cursor"]["pass_index"] == 0 for k in b["meta"]["key"]} for r in per_rank
    ]
    assert not (
        first_pass[0] & first_pass[1] or first_pass[0] & first_pass[2] or first_pass[1] & first_pass[2]
    )


def test_fewer_shards_than_workers_splits_by_sample(sample_shards):
    # One validation shard of 6 samples for 2 ranks × 2 workers: every worker keeps its own samples.
    per_rank = [run_rank(sample_shards.val, rank, 2, batches=2, train=False) for rank in range(2)]
    by_worker: dict[tuple[int, int], set[str]] = {}
    for batches in per_rank:
        for b in batches:
            by_worker.setdefault((b["meta"]["rank"], b["meta"]["worker"]), set()).update(b["meta"]["key"])
    all_keys = [k for s in by_worker.values() for k in s]
    assert len(by_worker) == 4 and len(all_keys) == len(set(all_keys))


@pytest.mark.parametrize(("fraction", "allowed"), [(0.0, {False}), (1.0, {True}), (0.5, {False, True})])
def test_image_fraction_sets_the_batch_kinds(sample_shards, fraction, allowed):
    batches = run_rank(
        sample_shards.train, 0, 1, batches=12, num_workers=0, batch_size=2, image_fraction=fraction
    )
    assert {bool(b["is_image"][0]) for b in batches} == allowed
    if fraction == 0.5:
        assert 3 <= sum(bool(b["is_image"][0]) for b in batches) <= 9


def test_mixed_resolution_batches_trade_frames_for_pixels(sample_shards):
    # Main entry 5 frames at ~128²; the 64² entry gets the same token budget: 2 latent frames × 4 → 29 frames.
    buckets = BucketConfig(size=128, aspect_ratios=(1.0,), mixed=(Resolution(64, weight=2.0),))
    dm = VideoDataModule(
        sample_shards.train,
        batch_size=1,
        num_workers=0,
        num_frames=5,
        fps=8,
        buckets=buckets,
        image_fraction=0.0,
    )
    shapes = {tuple(b["video"].shape[2:]) for b, _ in zip(dm.train_dataloader(), range(12))}
    assert shapes == {(5, 128, 128), (29, 64, 64)}


def test_same_seed_same_batches_and_epochs_continue(sample_shards):
    def make(seed):
        return VideoDataModule(
            sample_shards.train,
            batch_size=2,
            num_workers=0,
            num_frames=5,
            fps=8,
            buckets=SMALL,
            batches_per_epoch=4,
            seed=seed,
        ).train_dataloader()

    loader_a, loader_b = make(0), make(0)
    epoch1, epoch2 = list(loader_a), list(loader_a)
    assert keys(epoch1) == keys(list(loader_b))
    assert torch.equal(epoch1[0]["video"], list(make(0))[0]["video"])
    assert keys(epoch1) != keys(list(make(1)))
    # The second epoch continues the stream rather than replaying the first.
    assert not set(keys(epoch1)) & set(keys(epoch2))
    assert epoch2[0]["meta"]["cursor"]["batches"] == 5


def test_state_dict_resumes_after_the_consumed_samples(sample_shards):
    def make():
        return VideoDataModule(
            sample_shards.train,
            batch_size=2,
            num_workers=2,
            num_frames=5,
            fps=8,
            buckets=SMALL,
            batches_per_epoch=4,
        )

    first = make()
    consumed = list(first.train_dataloader())
    state = first.state_dict()
    assert state["world_size"] == 1 and set(state["ranks"][0]["cursors"]) == {0, 1}
    resumed = make()
    resumed.load_state_dict(state)
    after = list(resumed.train_dataloader())
    assert not set(keys(consumed)) & set(keys(after))
    for b in after:
        worker = b["meta"]["worker"]
        assert b["meta"]["cursor"]["batches"] > state["ranks"][0]["cursors"][worker]["batches"]


@pytest.mark.parametrize("image_fraction", [None, 0.5])
def test_a_resumed_stream_continues_exactly(sample_shards, image_fraction):
    """Samples held in partly filled buckets (and a waiting batch of the other kind) at save time are decoded
    again on resume: the resumed stream gives the same batches, bit for bit, as the uninterrupted one."""

    def make():
        return VideoDataModule(
            sample_shards.train,
            batch_size=2,
            num_workers=0,
            num_frames=5,
            fps=8,
            buckets=SMALL,
            image_fraction=image_fraction,
            batches_per_epoch=6,
        )

    whole = make()
    loader = whole.train_dataloader()
    stream = list(loader) + list(loader)
    first = make()
    batches = iter(first.train_dataloader())
    for _ in range(3):
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint stores it
    (cursor,) = state["ranks"]["0"]["cursors"].values()
    assert cursor["pending"] or cursor["ready"], "the test needs samples held at save time"
    resumed = make()
    resumed.load_state_dict({"world_size": 1, "ranks": {0: {**state["ranks"]["0"], "cursors": {0: cursor}}}})
    loader = resumed.train_dataloader()
    after = list(loader) + list(loader)
    assert len(after) == 3 + 6  # the rest of the epoch, then a whole one
    assert keys(after) == keys(stream[3:])
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(after, stream[3:]))


def test_resume_with_another_layout_re_splits_at_the_next_pass(sample_shards, caplog):
    dm = VideoDataModule(sample_shards.train, num_workers=0, num_frames=5, buckets=SMALL, batches_per_epoch=1)
    saved = {0: {"num_workers": 0, "cursors": {0: {"pass_index": 3}}}, 1: {"num_workers": 0, "cursors": {}}}
    dm.load_state_dict({"world_size": 2, "ranks": saved})
    (batch,) = list(dm.train_dataloader())
    assert batch["meta"]["cursor"]["pass_index"] == 4
    assert "re-split" in caplog.text and "world_size=2" in caplog.text


def test_skipped_counts_sum_the_workers(sample_shards, tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar" * 10)
    shards = expand_shards(sample_shards.train) + [str(broken), str(tmp_path / "missing.tar")]
    dm = VideoDataModule(
        shards, batch_size=1, num_workers=2, num_frames=5, fps=8, buckets=SMALL, batches_per_epoch=20
    )
    assert dm.skipped_counts()["data/skipped_total"] == 0
    list(dm.train_dataloader())
    counts = dm.skipped_counts()
    # 6 shards over 2 workers: each reads 3 per pass; 10 batches per worker reach both bad shards at least once.
    assert counts["data/skipped_shard"] >= 2 and counts["data/skipped_total"] == counts["data/skipped_shard"]
    assert set(counts) == {
        f"data/skipped_{r}" for r in ("decode", "json", "no_media", "short", "small", "shard", "total")
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 16}, r"num_frames=16 is not 1 \+ 4k"),
        ({"fps": 0}, "fps=0 must be positive"),
        ({"num_workers": -1}, "num_workers"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"image_fraction": 2.0}, "image_fraction=2.0"),
    ],
)
def test_bad_datamodule_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoDataModule("shards.tar", **kwargs)


def test_bad_dataset_arguments_are_clear_errors():
    buckets = SMALL.bucket_set(5)
    with pytest.raises(ValueError, match="image_fraction"):
        BucketedClipDataset("x.tar", buckets, 1, 1, fps=8, train=True, image_fraction=1.5)
    with pytest.raises(ValueError, match="no shards"):
        BucketedClipDataset([], buckets, 1, 1, fps=8, train=True)


def test_normalize_video_maps_uint8_onto_minus_one_to_one():
    video = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 1, 2, 3)
    out = normalize_video(video)
    assert out.dtype == torch.float32 and out.shape == video.shape
    assert out.flatten().tolist() == [
        -1.0,
        pytest.approx(-1 + 2 / 255),
        pytest.approx(-1 / 255),
        pytest.approx(1 / 255),
        pytest.approx(1 - 2 / 255),
        1.0,
    ]

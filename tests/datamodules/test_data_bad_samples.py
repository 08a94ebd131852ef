"""Bad data never stops training: every kind of bad sample or shard is skipped, counted and warned about."""

from __future__ import annotations

import json
import logging

import pytest
from synthetic_media import caption, image, mp4, write_tar

from datamodules.buckets import BucketConfig
from datamodules.pipeline import BucketedClipDataset
from datamodules.skips import SKIP_REASONS

BUCKETS = BucketConfig(size=128, aspect_ratios=(1.0,)).bucket_set(5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """An unreadable shard, a shard of every kind of bad sample followed by two good ones, a truncated shard."""
    root = tmp_path_factory.mktemp("bad_data")
    good = mp4(num_frames=24, fps=24, width=128, height=128)
    bad_members = [
        ("truncated.mp4", good[: len(good) // 2]),
        ("truncated.json", caption()),
        ("garbage.mp4", b"\x00not a video" * 50),
        ("garbage.json", caption()),
        ("nojson.mp4", good),
        ("badjson.mp4", good),
        ("badjson.json", b"{caption: oops"),
        ("nocaption.mp4", good),
        ("nocaption.json", json.dumps({"fps": 24}).encode()),
        ("short.mp4", mp4(num_frames=6, fps=24)),  # 0.25 s; 5 frames at 8 fps need 0.5 s
        ("short.json", caption()),
        ("small.mp4", mp4(num_frames=24, fps=24, width=96, height=96)),  # bucket is 128×128
        ("small.json", caption()),
        ("nomedia.json", caption()),
        ("nomedia.txt", b"just text"),
        ("brokenjpg.jpg", image(fmt="JPEG")[:200]),
        ("brokenjpg.json", caption()),
        ("goodvideo.mp4", good),
        ("goodvideo.json", caption("good video")),
        ("goodimage.png", image()),
        ("goodimage.json", caption("good image")),
    ]
    not_a_tar = root / "not_a_tar.tar"
    not_a_tar.write_bytes(b"this is not a tar file" * 100)
    mixed = write_tar(root / "mixed.tar", bad_members)
    whole = (root / "mixed.tar").read_bytes()
    truncated = root / "truncated.tar"
    truncated.write_bytes(whole[: len(whole) // 3])
    return [str(not_a_tar), str(root / "missing.tar"), mixed, str(truncated)]


EXPECTED = {"decode": 3, "json": 3, "no_media": 1, "short": 1, "small": 1, "shard": 3}


def test_every_bad_case_is_skipped_counted_and_warned(shards, caplog):
    dataset = BucketedClipDataset(shards, BUCKETS, batch_size=1, batches=2, fps=8, train=False)
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        batches = list(dataset)
    assert [b["caption"] for b in batches] == [["good video"], ["good image"]]
    assert batches[0]["video"].shape == (1, 3, 5, 128, 128) and batches[1]["video"].shape == (
        1,
        3,
        1,
        128,
        128,
    )
    # The truncated shard is read after the good samples, so the last batch's counts cover all of mixed.tar.
    counts = batches[-1]["meta"]["skipped"]
    assert counts == {reason: EXPECTED.get(reason, 0) if reason != "shard" else 2 for reason in SKIP_REASONS}
    warned = caplog.text
    for key in (
        "truncated",
        "garbage",
        "nojson",
        "badjson",
        "nocaption",
        "short",
        "small",
        "nomedia",
        "brokenjpg",
    ):
        assert f"skipped {key} " in warned
    assert "missing.tar" in warned and "not_a_tar.tar" in warned


def test_counts_keep_growing_as_the_stream_cycles(shards):
    # Three passes: every pass skips the same samples again; the truncated shard counts as a bad shard too.
    dataset = BucketedClipDataset(shards, BUCKETS, batch_size=1, batches=6, fps=8, train=False)
    batches = list(dataset)
    assert len(batches) == 6
    counts = batches[-1]["meta"]["skipped"]
    # The last batch comes from mixed.tar of pass 3: passes 1–2 complete, pass 3 up to the good image.
    # (truncated.tar's readable head holds a few bad samples of its own, so decode/json grow faster.)
    assert counts["shard"] == 3 + 3 + 2
    assert (counts["short"], counts["small"], counts["no_media"]) == (3, 3, 3)
    assert counts["decode"] > 3 * EXPECTED["decode"] and counts["json"] > 3 * EXPECTED["json"]


def test_only_bad_data_is_a_clear_error_not_a_hang(shards):
    dataset = BucketedClipDataset([shards[0], shards[1]], BUCKETS, batch_size=1, batches=1, fps=8, train=True)
    with pytest.raises(RuntimeError, match="no usable sample in a whole pass"):
        next(iter(dataset))


def test_missing_kind_is_a_clear_error(shards, tmp_path):
    videos_only = write_tar(tmp_path / "v.tar", [("a.mp4", mp4(24)), ("a.json", caption())])
    dataset = BucketedClipDataset(videos_only, BUCKETS, 1, 4, fps=8, train=True, image_fraction=1.0)
    with pytest.raises(RuntimeError, match="no usable image sample"):
        next(iter(dataset))


def test_pipe_urls_pass_through_to_webdataset(shards, tmp_path):
    good = write_tar(tmp_path / "good.tar", [("a.mp4", mp4(24)), ("a.json", caption("piped"))])
    dataset = BucketedClipDataset(
        [f"pipe:cat {good}", f"pipe:cat {tmp_path / 'absent.tar'}"], BUCKETS, 1, 2, fps=8, train=False
    )
    batches = list(dataset)
    assert [b["caption"] for b in batches] == [["piped"], ["piped"]]
    assert batches[-1]["meta"]["skipped"]["shard"] == 1  # the failing command counts as a bad shard

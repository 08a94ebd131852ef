"""The bundled sample dataset, ``inspect_shards`` and the ``fsvideo data`` commands."""

from __future__ import annotations

import io
import json
import tarfile

import av
import numpy as np
import pytest
from synthetic_media import caption, mp4, write_tar

from datamodules.buckets import BucketConfig
from datamodules.commands import data_main
from datamodules.inspection import inspect_shards
from datamodules.sample_data import CAMERA_MOTIONS, write_sample_dataset
from datamodules.shards import expand_shards


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_sample_dataset_holds_clips_and_stills_with_captions(sample_shards):
    shards = expand_shards(sample_shards.train)
    assert len(shards) == 4 and sample_shards.train_samples == 32 and sample_shards.val_samples == 6
    files = members(shards[0])
    videos = [n for n in files if n.endswith(".mp4")]
    stills = [n for n in files if n.endswith((".jpg", ".png"))]
    assert (len(videos), len(stills)) == (5, 3)
    for name in videos:
        info = json.loads(files[name.replace(".mp4", ".json")])
        assert any(f"camera {m}" in info["caption"] for m in CAMERA_MOTIONS)
        with av.open(io.BytesIO(files[name])) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == 24 and stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.codec_context.width, stream.codec_context.height) == (
                info["width"],
                info["height"],
            )
            assert max(info["width"], info["height"]) <= 384
            frames = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(stream)]
        assert 48 <= len(frames) == info["num_frames"] <= 120
        # Real content (not flat) and real motion (the view changes over the clip).
        assert frames[0].std() > 20
        if "stays still" not in info["caption"] or "moves" in info["caption"]:
            assert np.abs(frames[0] - frames[-1]).mean() > 5


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    sizes = {
        "train_shards": 1,
        "videos_per_shard": 1,
        "images_per_shard": 1,
        "val_videos": 1,
        "val_images": 1,
    }
    a = write_sample_dataset(tmp_path / "a", seed=3, **sizes)
    b = write_sample_dataset(tmp_path / "b", seed=3, **sizes)
    c = write_sample_dataset(tmp_path / "c", seed=4, **sizes)
    assert a.train.endswith("train-000000.tar")
    for name in ("train-000000.tar", "val-000000.tar"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
        assert (a.root / name).read_bytes() != (c.root / name).read_bytes()


def test_inspect_counts_the_sample_dataset(sample_shards):
    report = inspect_shards(
        [sample_shards.train, sample_shards.val], buckets=BucketConfig(size=128), num_frames=9
    )
    assert report.samples == 38 and (report.videos, report.images) == (24, 14)
    assert report.usable == 38 and not report.skipped
    assert sum(report.buckets.values()) == 38
    assert all(name.split("x")[0] in ("1", "9") for name in report.buckets)
    assert 24 * 2.0 <= report.video_seconds <= 24 * 5.0
    text = report.format()
    assert "5 shard(s), 38 samples: 24 videos, 14 images, 38 usable, 0 bad" in text
    assert str(report) == text


def test_inspect_reports_bad_samples_with_reasons(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("ok.mp4", mp4(24)),
            ("ok.json", caption()),
            ("bad.mp4", b"junk"),
            ("bad.json", caption()),
            ("x.mp4", mp4(24)),
        ],
    )
    report = inspect_shards(
        [shard, str(tmp_path / "gone.tar")], buckets=BucketConfig(size=128), num_frames=5, fps=8
    )
    assert (report.samples, report.usable) == (3, 1)
    assert dict(report.skipped) == {"decode": 1, "json": 1, "shard": 1}
    text = report.format()
    assert "1 usable, 2 bad" in text and "gone.tar (shard): shard: cannot open" in text
    assert "bad: decode: cannot open video" in text


def test_data_commands_write_and_inspect(tmp_path, capsys):
    data_main(["sample", "--out", str(tmp_path), "--seed", "1", "--train-shards", "1"])
    assert "wrote 8 training samples" in capsys.readouterr().out
    data_main(
        ["inspect", str(tmp_path / "train-000000.tar"), "--size", "128", "--num-frames", "5", "--fps", "8"]
    )
    out = capsys.readouterr().out
    assert "1 shard(s), 8 samples: 5 videos, 3 images, 8 usable, 0 bad" in out and "buckets" in out


def test_inspect_command_fails_after_its_report_when_nothing_is_usable(tmp_path, capsys):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ValueError, match="1 shard\\(s\\) could not be read"):
        data_main(["inspect", str(garbage)])
    assert "unreadable or truncated shard" in capsys.readouterr().out
    only_bad = write_tar(tmp_path / "bad.tar", [("bad.mp4", b"junk"), ("bad.json", caption())])
    with pytest.raises(ValueError, match="no sample is usable"):
        data_main(["inspect", only_bad])
    assert "0 usable, 1 bad" in capsys.readouterr().out

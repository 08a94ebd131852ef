"""Clip cutting: frame count, fps, start (with seeking), resize/crop to the bucket, stills."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_media import caption, image, mp4, read_index

from datamodules.buckets import Bucket, BucketConfig
from datamodules.decode import CropPlan, VideoReader
from datamodules.samples import SampleDecoder
from datamodules.skips import SkipSample

FULL = Bucket(1, 128, 128)


@pytest.fixture(scope="module")
def video() -> bytes:
    return mp4(num_frames=48, fps=24, width=128, height=128, gop=12)


def indices(frames: np.ndarray) -> list[int]:
    """``T×3×H×W`` frames → the index each one shows."""
    return [read_index(f.permute(1, 2, 0).numpy()) for f in frames]


def test_metadata_and_available_frames(video):
    with VideoReader(video) as reader:
        assert (reader.width, reader.height, reader.rate) == (128, 128, 24.0)
        assert reader.duration == pytest.approx(2.0)
        assert reader.available_frames(24) == 48
        assert reader.available_frames(12) == 24
        assert reader.available_frames(None) == 48
        assert reader.max_start(17, 12) == pytest.approx(2.0 - 1 / 48 - 16 / 12)


@pytest.mark.parametrize(
    ("start", "num_frames", "fps", "expected"),
    [
        (0.0, 5, 12, [0, 2, 4, 6, 8]),
        (0.0, 5, None, [0, 1, 2, 3, 4]),
        (1.0, 5, 24, [24, 25, 26, 27, 28]),  # after a seek to the keyframe at 0.5 s
        (1.5, 4, 8, [36, 39, 42, 45]),
        (0.0, 24, 12, list(range(0, 48, 2))),  # the whole clip, up to the last frame
    ],
)
def test_read_cuts_frames_at_target_fps(video, start, num_frames, fps, expected):
    with VideoReader(video) as reader:
        frames = reader.read(start, num_frames, fps, CropPlan.cover(128, 128, FULL, None))
    assert frames.shape == (num_frames, 3, 128, 128) and frames.dtype == torch.uint8
    assert indices(frames) == expected


def test_higher_target_fps_repeats_source_frames(video):
    with VideoReader(video) as reader:
        got = indices(reader.read(0.0, 9, 48, CropPlan.cover(128, 128, FULL, None)))
    assert got == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_reading_past_the_end_is_a_short_skip(video):
    with VideoReader(video) as reader, pytest.raises(SkipSample) as info:
        reader.read(1.5, 17, 24, CropPlan.cover(128, 128, FULL, None))
    assert info.value.reason == "short"


def test_crop_plan_covers_the_bucket():
    bucket = Bucket(17, 192, 320)
    centre = CropPlan.cover(384, 216, bucket, None)
    # Short side 216 → 192 is a scale of 8/9: the surviving region is 360×216 source pixels.
    assert (centre.x, centre.y, centre.width, centre.height) == (12, 0, 360, 216)
    rng = np.random.default_rng(0)
    offsets = {CropPlan.cover(384, 216, bucket, rng).x for _ in range(100)}
    assert offsets <= set(range(0, 25)) and len(offsets) > 5
    ramp = np.broadcast_to((np.arange(384) // 2).astype(np.uint8)[None, None, :, None], (2, 216, 384, 3))
    out = centre.apply(list(ramp.copy()))
    assert out.shape == (2, 3, 192, 320) and out.dtype == torch.uint8
    # The ramp (x // 2) is resampled over x = 12 … 371, not wrapped or flipped.
    row = out[0, 0, 0].numpy().astype(int)
    assert abs(row[0] - 6) <= 1 and abs(row[-1] - 185) <= 1 and np.all(np.diff(row) >= 0)


def test_sample_decoder_train_draws_start_inside_the_clip(video):
    decoder = SampleDecoder(BucketConfig(size=64, aspect_ratios=(1.0,)).bucket_set(9), fps=12, train=True)
    starts = set()
    for seed in range(12):
        clip = decoder({"__key__": "k", "mp4": video, "json": caption()}, np.random.default_rng(seed))
        assert clip.frames.shape == (9, 3, 64, 64) and not clip.is_image
        first = round(clip.start * 24)
        # Frames are 1/12 s apart (2 source frames); the downscaled blocks still read back exactly.
        assert indices(clip.frames) == [first + 2 * i for i in range(9)]
        assert 0 <= clip.start <= 2.0 - 1 / 48 - 8 / 12
        starts.add(first)
    assert len(starts) > 4


def test_sample_decoder_val_starts_at_zero_with_centre_crop(video):
    decoder = SampleDecoder(BucketConfig(size=64, aspect_ratios=(1.0,)).bucket_set(5), fps=24, train=False)
    clip = decoder({"__key__": "k", "mp4": video, "json": caption()}, np.random.default_rng(3))
    assert clip.start == 0.0 and indices(clip.frames) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("ext", "fmt"), [("png", "PNG"), ("jpg", "JPEG")])
def test_still_is_a_one_frame_clip(ext, fmt):
    decoder = SampleDecoder(BucketConfig(size=128).bucket_set(17), fps=24, train=True)
    clip = decoder(
        {"__key__": "k", ext: image(320, 256, fmt), "json": caption("grey")}, np.random.default_rng(0)
    )
    assert clip.is_image and clip.caption == "grey"
    assert clip.frames.shape == (1, 3, 128, 128)
    assert abs(clip.frames.float().mean().item() - 200) <= 2

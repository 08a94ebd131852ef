"""Aspect-ratio buckets: sides on the 64-pixel grid, area near the target, nearest ratio, mixed resolutions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datamodules.buckets import Bucket, BucketConfig, BucketSet, Resolution, frames_for_token_budget
from datamodules.skips import SkipSample


@pytest.mark.parametrize("size", [128, 256, 512, 1024])
def test_bucket_shapes_on_grid_and_near_target_area(size):
    config = BucketConfig(size=size)
    shapes = config.shapes(size)
    assert len(shapes) == len(set(shapes)) >= 3
    for h, w in shapes:
        assert h % 64 == 0 and w % 64 == 0
        assert abs(h * w / size**2 - 1) <= config.area_tolerance
    ratios = [w / h for h, w in shapes]
    assert ratios == sorted(ratios)


def test_bucket_shapes_at_256_are_the_expected_ones():
    # Ties on the coarse grid go to the exact ratio: 4:3 → 256×192 rather than 320×192 or 320×256.
    assert BucketConfig(size=256).shapes(256) == [
        (384, 192),
        (320, 192),
        (256, 192),
        (256, 256),
        (192, 256),
        (192, 320),
        (192, 384),
    ]


def test_each_requested_ratio_gets_the_closest_shape_on_the_grid():
    config = BucketConfig(size=512, aspect_ratios=(16 / 9,))
    ((h, w),) = config.shapes(512)
    best = min(
        (abs(math.log(hh * ww / 512**2)) + abs(math.log(ww / hh / (16 / 9))), hh, ww)
        for hh in range(64, 1024, 64)
        for ww in range(64, 1024, 64)
        if abs(hh * ww / 512**2 - 1) <= 0.25
    )
    assert (h, w) == best[1:]


def test_sample_goes_to_nearest_ratio_bucket():
    buckets = BucketConfig(size=256).bucket_set(17)
    for width, height in [(1920, 1080), (1080, 1920), (640, 480), (500, 500), (3000, 1000), (400, 1600)]:
        chosen = buckets.for_video(width, height, 100, np.random.default_rng(0))
        distances = [abs(math.log(b.aspect) - math.log(width / height)) for b in buckets.video[0]]
        assert abs(math.log(chosen.aspect) - math.log(width / height)) == pytest.approx(min(distances))
        assert chosen.num_frames == 17


def test_image_buckets_are_single_frames_and_refuse_upscaling():
    buckets = BucketConfig(size=256).bucket_set(17)
    assert buckets.for_image(1920, 1080) == Bucket(1, 192, 320)
    with pytest.raises(SkipSample) as info:
        buckets.for_image(200, 200)
    assert info.value.reason == "small"


def test_video_too_short_or_too_small_is_a_skip():
    buckets = BucketConfig(size=256).bucket_set(17)
    rng = np.random.default_rng(0)
    with pytest.raises(SkipSample) as short:
        buckets.for_video(640, 360, 16, rng)
    with pytest.raises(SkipSample) as small:
        buckets.for_video(300, 169, 100, rng)
    assert (short.value.reason, small.value.reason) == ("short", "small")


def test_token_budget_trades_frames_for_pixels():
    # 256² × 121 frames = 31 latent frames × 16 tokens; at 512² a latent frame costs 64 tokens → 7 → 25 frames.
    assert frames_for_token_budget(512, 256, 121) == 25
    assert frames_for_token_budget(128, 256, 17) == 77
    buckets = BucketConfig(
        size=256, mixed=(Resolution(512), Resolution(128, num_frames=33, weight=2))
    ).bucket_set(121)
    assert [entry[0].num_frames for entry in buckets.video] == [121, 25, 33]
    assert buckets.weights == [1.0, 1.0, 2]


def test_mixed_resolution_draws_entries_by_weight_among_those_that_fit():
    buckets = BucketSet(
        video=[[Bucket(5, 128, 128)], [Bucket(9, 64, 64)]],
        weights=[1.0, 3.0],
        image=[Bucket(1, 128, 128)],
    )
    rng = np.random.default_rng(0)
    drawn = [buckets.for_video(256, 256, 20, rng).num_frames for _ in range(400)]
    assert 0.65 < drawn.count(9) / 400 < 0.85
    # Too short for the 9-frame entry, or too small for the 128² one: only the other entry is left.
    assert {buckets.for_video(256, 256, 6, rng).num_frames for _ in range(20)} == {5}
    assert {buckets.for_video(100, 100, 20, rng).num_frames for _ in range(20)} == {9}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 32}, "at least multiple"),
        ({"aspect_ratios": (1.0, -2.0)}, "positive"),
        ({"mixed": ({"size": 512, "num_frames": 16},)}, r"1 \+ 4k"),
        ({"area_tolerance": 1.5}, "area_tolerance"),
    ],
)
def test_bad_bucket_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketConfig(**kwargs)


def test_num_frames_must_be_one_plus_multiple_of_four():
    with pytest.raises(ValueError, match=r"1 \+ 4k.*use 17 or 21"):
        BucketConfig().bucket_set(18)

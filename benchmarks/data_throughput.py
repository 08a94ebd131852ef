"""Clips per second through ``VideoDataModule`` against a bare PyAV decode of the same clips, same run.

    python benchmarks/data_throughput.py                     # writes the sample shards to a temp dir
    python benchmarks/data_throughput.py --shards 'data/sample/train-{000000..000003}.tar' --workers 0 1 2

Two bare loops, each opening every mp4 from memory, seeking to a random start and decoding the frames a
clip needs: "rgb" converts them to full-size RGB (decode only); "rgb@bucket" has swscale convert them
straight to the size that covers the bucket, then crops (the least work that yields the same tensors).
The DataModule adds tar reading, json, bucketing, the crop/resize, batching, worker IPC and the float
conversion. Bare loops decode as the DataModule does: frame threads in one process, one thread per worker.
Ratios are per worker process, (DataModule clips/s / workers) / (bare clips/s), paired round by round so a
shared machine's load hits both alike; the goal is ≥ 0.8.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable

import av
import numpy as np
import torch

from datamodules.buckets import BucketConfig, BucketSet, cover_scale
from datamodules.sample_data import write_sample_dataset
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SkipCounter
from datamodules.video import VideoDataModule


def bare_decode(
    data: bytes,
    num_frames: int,
    fps: float,
    rng: np.random.Generator,
    buckets: BucketSet | None,
    threads: bool,
) -> np.ndarray:
    """Random start, seek, decode, nearest frame per target time; full-size RGB, or bucket-size with ``buckets``.
    Threads as the DataModule decodes (frame threads in one process, one thread per worker process)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        else:
            stream.thread_count = 1
        rate = float(stream.average_rate)
        duration = float(stream.duration * stream.time_base)
        start = rng.uniform(0, max(0.0, duration - 0.5 / rate - (num_frames - 1) / fps))
        if start > 0.5 / rate:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        size: dict[str, int] = {}
        if buckets is not None:
            width, height = stream.codec_context.width, stream.codec_context.height
            bucket = buckets.nearest(buckets.video[0], width, height)
            scale = cover_scale(bucket, width, height)
            size = {
                "width": round(width * scale),
                "height": round(height * scale),
                "interpolation": "BILINEAR",
            }
        targets = start + np.arange(num_frames) / fps
        out: list[np.ndarray] = []
        for frame in container.decode(stream):
            while len(out) < num_frames and targets[len(out)] < frame.time + 0.5 / rate:
                rgb = frame.to_ndarray(format="rgb24", **size)
                out.append(rgb[: bucket.height, : bucket.width] if size else rgb)
            if len(out) == num_frames:
                break
    return np.stack(out)


def clips_per_second(step: Callable[[], object], clips: int) -> float:
    begin = time.perf_counter()
    for _ in range(clips):
        step()
    return clips / (time.perf_counter() - begin)


def measure(
    shards: str, videos: list[bytes], workers: int, args: argparse.Namespace
) -> list[tuple[float, ...]]:
    """Rounds of (DataModule, bare rgb, bare rgb@bucket) clips/s, timed back to back so that each round's
    three numbers see the same load on a shared machine."""
    buckets = BucketConfig(size=args.size).bucket_set(args.num_frames)
    in_flight = 2 * max(1, workers)  # the DataLoader's prefetch: batches made while the bare loops ran
    dm = VideoDataModule(
        shards,
        batch_size=1,
        num_workers=workers,
        num_frames=args.num_frames,
        fps=args.fps,
        buckets=BucketConfig(size=args.size),
        image_fraction=0.0,
        batches_per_epoch=args.repeats * (args.clips + in_flight) + in_flight,
    )
    batches = iter(dm.train_dataloader())
    rng = np.random.default_rng(0)
    index = iter(range(1 << 30))

    def bare(sized: bool) -> np.ndarray:
        data = videos[next(index) % len(videos)]
        return bare_decode(
            data, args.num_frames, args.fps, rng, buckets if sized else None, threads=workers == 0
        )

    rounds = []
    for _ in range(args.repeats):
        for _ in range(in_flight):  # start-up, then whatever was prefetched: not throughput
            next(batches)
        ours = clips_per_second(lambda: next(batches), args.clips)
        rounds.append(
            (
                ours,
                clips_per_second(lambda: bare(False), args.clips),
                clips_per_second(lambda: bare(True), args.clips),
            )
        )
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", default=None, help="shards to read (default: write the sample dataset)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=40, help="clips per timing")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per setting; medians are printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_sample_dataset(tmp, seed=0).train
        counter = SkipCounter()
        videos = [s["mp4"] for url in expand_shards(shards) for s in read_shard(url, counter) if "mp4" in s]
        print(f"{len(videos)} mp4 clips; {args.num_frames} frames at {args.fps:g} fps; buckets ~{args.size}²")
        header = f"{'loader':<22}{'clips/s':>9}{'per worker':>12}{'bare rgb':>10}{'ratio':>7}"
        print(header + f"{'bare rgb@bucket':>17}{'ratio':>7}")
        for workers in args.workers:
            rounds = np.asarray(measure(shards, videos, workers, args))
            ours, bare, bare_sized = np.median(rounds, axis=0)
            per_worker = rounds[:, 0] / max(1, workers)
            ratio, ratio_sized = np.median(per_worker / rounds[:, 1]), np.median(per_worker / rounds[:, 2])
            label = f"DataModule, {workers} worker{'s' if workers != 1 else ''}"
            print(
                f"{label:<22}{ours:9.1f}{ours / max(1, workers):12.1f}{bare:10.1f}{ratio:7.2f}"
                f"{bare_sized:17.1f}{ratio_sized:7.2f}"
            )
        print(f"medians of {args.repeats} back-to-back rounds of {args.clips} clips each")


if __name__ == "__main__":
    main()

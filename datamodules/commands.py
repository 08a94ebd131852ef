"""``fsvideo data …``: write the bundled sample shards, or inspect shards before training on them."""

from __future__ import annotations

import argparse

from datamodules.buckets import BucketConfig
from datamodules.inspection import inspect_shards
from datamodules.sample_data import write_sample_dataset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsvideo data", description="Sample data and shard checks.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="write the bundled sample dataset (mp4 clips and stills)")
    sample.add_argument("--out", required=True, help="directory for train-*.tar and val-000000.tar")
    sample.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    sample.add_argument("--train-shards", type=int, default=4, help="number of training shards")
    inspect = commands.add_parser("inspect", help="count samples, buckets and bad samples of shards")
    inspect.add_argument(
        "shards", nargs="+", help="shard paths or brace patterns ('data/train-{000000..000009}.tar')"
    )
    inspect.add_argument(
        "--size", type=int, default=256, help="bucket size (target area size²), as in the stage config"
    )
    inspect.add_argument(
        "--num-frames", type=int, default=17, help="frames per clip (1 + 4k), as in the stage config"
    )
    inspect.add_argument(
        "--fps", type=float, default=24.0, help="frame rate clips are cut at; 0 keeps the source rate"
    )
    inspect.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    return parser


def data_main(argv: list[str]) -> None:
    """Entry point of ``fsvideo data``; ``argv`` excludes ``data`` itself."""
    args = _parser().parse_args(argv)
    if args.command == "sample":
        dataset = write_sample_dataset(args.out, seed=args.seed, train_shards=args.train_shards)
        print(f"wrote {dataset.train_samples} training samples to {dataset.train}")
        print(f"wrote {dataset.val_samples} validation samples to {dataset.val}")
    else:
        report = inspect_shards(
            args.shards,
            buckets=BucketConfig(size=args.size),
            num_frames=args.num_frames,
            fps=args.fps or None,
            max_samples=args.max_samples,
        )
        print(report.format())

"""``fsvideo rewards …``: the candidate pool to label (§2.3.2 trick 1), and tiny models / pairs for CPU demos."""

from __future__ import annotations

import argparse
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsvideo rewards", description="Reward-model data and tiny models.")
    commands = parser.add_subparsers(dest="command", required=True)
    pool = commands.add_parser(
        "pool", help="candidate videos and random pairs to label, with side-by-side mp4s"
    )
    pool.add_argument("--inputs", required=True, help='JSONL of {"id", "image", "prompt", "ground_truth"?}')
    pool.add_argument(
        "--out", required=True, help="pool folder: pairs.jsonl, videos/, side_by_side/, images/"
    )
    pool.add_argument(
        "--pipeline", default=None, help="pipeline config of the SFT model (fsvideo generate's)"
    )
    pool.add_argument(
        "--other",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another model's videos, DIR/<id>.mp4",
    )
    pool.add_argument(
        "--samples-per-input", type=int, default=1, help="SFT videos per input (seeds seed, seed+1…)"
    )
    pool.add_argument("--pairs-per-input", type=int, default=2, help="random candidate pairs per input")
    pool.add_argument("--fps", type=float, default=24.0, help="frame rate of the mp4s written")
    pool.add_argument("--seed", type=int, default=0)
    tiny = commands.add_parser(
        "tiny-models", help="write tiny RANDOM Qwen2-VL and CLIP folders (CPU demos, tests)"
    )
    tiny.add_argument("--out", required=True, help="folder for qwen2_vl/ and clip/")
    tiny.add_argument("--seed", type=int, default=0)
    pairs = commands.add_parser(
        "tiny-pairs", help="write synthetic labelled pairs (brighter preferred) for demos"
    )
    pairs.add_argument("--out", required=True, help="folder for train/pairs.jsonl and val/pairs.jsonl")
    pairs.add_argument("--train-pairs", type=int, default=16)
    pairs.add_argument("--val-pairs", type=int, default=16)
    return parser


def rewards_main(argv: list[str]) -> None:
    """Entry point of ``fsvideo rewards``; ``argv`` excludes ``rewards`` itself."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "pool":
        from fsvideo.rewards.pool import parse_others, write_pool

        if args.pipeline is None and not args.other:
            parser.error("give --pipeline (our SFT model's videos) and/or --other NAME=DIR")
        if args.samples_per_input < 0 or args.pairs_per_input < 1 or args.fps <= 0:
            parser.error("--samples-per-input must be ≥ 0, --pairs-per-input ≥ 1 and --fps positive")
        path = write_pool(
            Path(args.inputs),
            Path(args.out),
            None if args.pipeline is None else Path(args.pipeline),
            parse_others(args.other),
            args.samples_per_input,
            args.pairs_per_input,
            args.seed,
            args.fps,
        )
        count = sum(1 for line in path.read_text().splitlines() if line.strip())
        print(f"wrote {count} pairs to label in {path} (side-by-side mp4s in {path.parent / 'side_by_side'})")
    elif args.command == "tiny-models":
        from fsvideo.rewards.tiny import save_tiny_reward_models

        for name, path in save_tiny_reward_models(args.out, seed=args.seed).items():
            print(f"wrote tiny random {name} to {path}")
    else:
        from fsvideo.rewards.synthetic import write_brightness_pairs

        out = Path(args.out)
        for split, count, seed in (("train", args.train_pairs, 0), ("val", args.val_pairs, 1)):
            print(f"wrote {count} pairs to {write_brightness_pairs(out / split, count, seed)}")

"""``fsvideo data …``: write the bundled sample shards, or inspect shards before training on them."""

from __future__ import annotations

import argparse
import logging

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
    encode = commands.add_parser(
        "encode", help="latent cache for the DiT stages: FSAE latents + text/image tokens of video shards"
    )
    encode.add_argument(
        "--config", required=True, help="FSAE saved-model folder, run directory or checkpoint of a run"
    )
    encode.add_argument("--shards", nargs="+", required=True, help="video shards (paths or brace patterns)")
    encode.add_argument(
        "--out",
        required=True,
        help="cache directory; an interrupted encode of the same fingerprint is resumed, another cache refused",
    )
    encode.add_argument("--text-encoder", default=None, help="local UMT5 encoder folder")
    encode.add_argument("--image-encoder", default=None, help="local CLIP vision folder")
    encode.add_argument("--text-len", type=int, default=512, help="prompt length in tokens")
    encode.add_argument("--size", type=int, default=256, help="bucket size (target area size²)")
    encode.add_argument("--num-frames", type=int, default=121, help="frames per clip (1 + 4k)")
    encode.add_argument(
        "--fps", type=float, default=24.0, help="frame rate clips are cut at; 0 keeps the source"
    )
    encode.add_argument("--validation", action="store_true", help="cut clips as the validation stream does")
    encode.add_argument("--seed", type=int, default=0)
    encode.add_argument("--batch-size", type=int, default=4, help="clips per encoder call")
    encode.add_argument("--samples-per-shard", type=int, default=512)
    encode.add_argument("--token-dtype", default="bfloat16", help="storage dtype of text/image tokens")
    encode.add_argument("--encoder-dtype", default="float32", help="dtype of the text/image encoders")
    encode.add_argument("--device", default="cpu")
    encode.add_argument(
        "--restart", action="store_true", help="encode everything again instead of resuming / keeping --out"
    )
    tiny = commands.add_parser(
        "tiny-encoders", help="write tiny RANDOM text/image/DINOv2 encoders (CPU demos and tests only)"
    )
    tiny.add_argument("--out", required=True, help="folder for text/, image/ and dino/")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def data_main(argv: list[str]) -> None:
    """Entry point of ``fsvideo data``; ``argv`` excludes ``data`` itself."""
    args = _parser().parse_args(argv)
    if args.command == "sample":
        dataset = write_sample_dataset(args.out, seed=args.seed, train_shards=args.train_shards)
        print(f"wrote {dataset.train_samples} training samples to {dataset.train}")
        print(f"wrote {dataset.val_samples} validation samples to {dataset.val}")
    elif args.command == "encode":
        from datamodules.latent_writer import encode_shards

        logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress and what a resume kept
        cache = encode_shards(
            autoencoder=args.config,
            shards=args.shards,
            out=args.out,
            text_encoder=args.text_encoder,
            image_encoder=args.image_encoder,
            text_len=args.text_len,
            buckets=BucketConfig(size=args.size),
            num_frames=args.num_frames,
            fps=args.fps or None,
            validation=args.validation,
            seed=args.seed,
            batch_size=args.batch_size,
            samples_per_shard=args.samples_per_shard,
            token_dtype=args.token_dtype,
            encoder_dtype=args.encoder_dtype,
            device=args.device,
            restart=args.restart,
        )
        print(f"latent cache: {cache.index}")
    elif args.command == "tiny-encoders":
        from fsvideo.encoders import save_tiny_encoders

        for name, path in save_tiny_encoders(args.out, seed=args.seed).items():
            print(f"{name}: {path}")
    else:
        report = inspect_shards(
            args.shards,
            buckets=BucketConfig(size=args.size),
            num_frames=args.num_frames,
            fps=args.fps or None,
            max_samples=args.max_samples,
        )
        print(report.format())
        # Exit non-zero so that a script (or CI) checking shards before training stops here.
        unreadable = report.skipped.get("shard", 0)
        if unreadable:
            raise ValueError(
                f"{unreadable} shard(s) could not be read to the end (see the problems above); "
                "copy them again or leave them out."
            )
        if not report.usable:
            raise ValueError(
                "no sample is usable (see the reasons above); check the shards, or --size, --num-frames "
                "and --fps against them."
            )

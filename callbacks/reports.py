"""``fsvideo report …``: tables and figures that compare finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from callbacks.id_report import PAPER_SCALES, compare_checkpoints


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsvideo report", description="Compare finished runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    id_parser = commands.add_parser(
        "id", help="Table 1: Gride intrinsic dimension of several autoencoders' latents on the same data"
    )
    id_parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a method name and its FSAE run directory or checkpoint; repeat for each row",
    )
    id_parser.add_argument("--shards", required=True, help="held-out shards (path or brace pattern)")
    id_parser.add_argument("--size", type=int, default=256, help="bucket size (target area size²)")
    id_parser.add_argument("--num-frames", type=int, default=17, help="frames per video clip (1 + 4k)")
    id_parser.add_argument("--batch-size", type=int, default=4)
    id_parser.add_argument("--max-batches", type=int, default=16, help="held-out batches encoded per run")
    id_parser.add_argument(
        "--point-mode",
        choices=("token", "latent"),
        default="token",
        help="what one point of the ID estimate is",
    )
    id_parser.add_argument(
        "--max-points", type=int, default=2000, help="points drawn per kind (video, image)"
    )
    id_parser.add_argument(
        "--scales", type=int, nargs="+", default=list(PAPER_SCALES), help="neighbour ranks (powers of two)"
    )
    id_parser.add_argument("--seed", type=int, default=0)
    id_parser.add_argument("--device", default="cpu")
    id_parser.add_argument("--out", type=Path, default=None, help="folder for id_report.json / id_report.md")
    curves = commands.add_parser(
        "loss-curves",
        help="training-loss curves of several runs in one figure, seeds of a variant as mean ± spread (Fig. 7)",
    )
    curves.add_argument("runs", nargs="+", help="run directories (each has loss_history.csv)")
    curves.add_argument("--out", type=Path, required=True, help="PNG to write")
    curves.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="one label per run (default: folder names); runs with the same label are drawn as one variant: "
        "mean and min–max band",
    )
    curves.add_argument("--smoothing", type=float, default=0.9, help="EMA smoothing of the plotted curves")
    curves.add_argument(
        "--val-key",
        default="val/loss",
        help="validation metric of the second panel, from each run's metrics_table.jsonl (drawn when all have it)",
    )
    sheet = commands.add_parser(
        "contact-sheet", help="one PNG of an image and videos, a row of evenly spaced frames each"
    )
    sheet.add_argument("--image", help="input image, shown as the first row")
    sheet.add_argument(
        "--video", action="append", required=True, metavar="LABEL=PATH", help="a labelled mp4; repeat per row"
    )
    sheet.add_argument("--frames", type=int, default=6, help="frames shown per video")
    sheet.add_argument("--height", type=int, default=128, help="height of every frame in the sheet")
    sheet.add_argument("--out", type=Path, required=True, help="PNG to write")
    return parser


def _contact_sheet(args: argparse.Namespace) -> Path:
    import numpy as np
    from PIL import Image

    from fsvideo.video_io import contact_sheet, read_mp4

    rows = []
    if args.image is not None:
        with Image.open(args.image) as image:
            rows.append(("input image", np.asarray(image.convert("RGB"))[None]))
    for item in args.video:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--video expects LABEL=PATH, got {item!r}")
        rows.append((label, read_mp4(path)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, args.frames, args.height).save(args.out)
    return args.out


def report_main(argv: list[str]) -> None:
    """Entry point of ``fsvideo report``; ``argv`` excludes ``report`` itself."""
    args = _parser().parse_args(argv)
    if args.command == "contact-sheet":
        print(f"wrote {_contact_sheet(args)}")
        return
    if args.command == "loss-curves":
        from callbacks.loss_history import plot_loss_curves

        out = plot_loss_curves(
            args.runs, args.out, labels=args.labels, smoothing=args.smoothing, val_key=args.val_key
        )
        print(f"wrote {out}")
        return
    from datamodules.buckets import BucketConfig
    from datamodules.video import VideoDataModule

    runs = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--run expects NAME=PATH, got {item!r}")
        runs[name] = path
    data = VideoDataModule(
        train_shards=args.shards,
        val_shards=args.shards,
        batch_size=args.batch_size,
        num_workers=0,
        num_frames=args.num_frames,
        buckets=BucketConfig(size=args.size),
        val_batches=args.max_batches,
        seed=args.seed,
    )
    data.setup("validate")
    report = compare_checkpoints(
        runs,
        data.val_dataloader(),
        point_mode=args.point_mode,
        max_points=args.max_points,
        max_batches=args.max_batches,
        scales=tuple(args.scales),
        seed=args.seed,
        device=args.device,
    )
    print(report.markdown())
    if args.out is not None:
        for path in report.write(args.out):
            print(f"wrote {path}")

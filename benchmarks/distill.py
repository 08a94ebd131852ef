"""Refiner-distillation benchmark (§2.4.3): the refine stage's NFE and time, teacher vs each distilled student, and
how far each student's video is from the teacher's (PSNR, LPIPS) on fixed seeds; measured in this same run.

Every row generates the same clips (image, prompt, seeds) with the pipeline of ``--config``; only the refiner and
its sampler settings change:

  teacher    the config's refiner (undistilled) with guidance: ``--teacher-steps`` steps at
             ``--teacher-guidance`` on the students' grid (their recorded shift; Euler by default, the grid the
             progressive stage's teacher integrates) — 2 DiT calls a step.
  students   ``--student NAME=PATH`` (saved-model folder or run of ``configs/*/refiner-distill-*.yaml``): the
             settings the student records (``fsvideo.distill.refine_settings``: its steps, shift, Euler, guidance 1).

Time is the pipeline's own refine-stage time (best of ``--repeats`` per seed, summed over seeds); the base stage
runs identically in every row (same seed) and is left out. PSNR is over [-1, 1] frames (peak-to-peak 2); LPIPS is
``fsvideo.losses.PerceptualLoss`` with a local AlexNet trunk (``--lpips-backbone``; random without it, which only
checks the plumbing). On a shared CPU, ``--threads 1`` avoids the slowdowns other processes' busy threads cause.

    python benchmarks/distill.py --help
    python benchmarks/distill.py --config configs/pipeline/tiny-demo-2x.yaml --image runs/demo/first-frame.png \\
        --student cfg=runs/tiny-refiner-distill-cfg/export/refiner \\
        --student progressive=runs/tiny-refiner-distill-progressive/export/refiner \\
        --student sida=runs/tiny-refiner-distill-sida/export/refiner
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from fsvideo.distill import refine_settings
from fsvideo.dit import DiT
from fsvideo.flow import SAMPLERS
from fsvideo.losses import PerceptualLoss
from fsvideo.pipeline import FSVideoPipeline, PipelineConfig
from fsvideo.pretrained import read_records
from fsvideo.stages import SamplingSettings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="pipeline config with the two-stage chain (its refiner: the teacher)"
    )
    parser.add_argument("--image", required=True, help="the input image of every clip")
    parser.add_argument("--prompt", default="the camera pans slowly to the left")
    parser.add_argument(
        "--student",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a distilled refiner (repeatable)",
    )
    parser.add_argument("--teacher-steps", type=int, default=64, help="the teacher's sampler steps")
    parser.add_argument("--teacher-guidance", type=float, default=5.0, help="the teacher's guidance scale")
    parser.add_argument("--teacher-sampler", choices=SAMPLERS, default="euler")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one clip per seed")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed generations per seed (the best is kept)"
    )
    parser.add_argument("--lpips-backbone", default=None, help="torchvision alexnet() state dict for LPIPS")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser.parse_args()


def parse_students(values: list[str]) -> dict[str, str]:
    students = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--student takes NAME=PATH, got {value!r}")
        students[name] = path
    return students


def run_row(config: PipelineConfig, args: argparse.Namespace) -> tuple[dict, list[torch.Tensor]]:
    """Generate one clip per seed; the row's refine NFE, time and settings, and the videos ``3×T×H×W``."""
    pipe = FSVideoPipeline.from_config(config)
    seconds, videos, stage = 0.0, [], {}
    for seed in args.seeds:
        best = math.inf
        for _ in range(args.repeats):
            result = pipe.generate(args.image, args.prompt, seed=seed)
            stage = next(s for s in result.stages if s["name"] == "refine")
            best = min(best, stage["seconds"])
        seconds += best
        videos.append(result.video)
    row = {"refiner": config.refiner, "settings": stage["settings"], "nfe": stage["nfe"], "refine_s": seconds}
    return row, videos


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    students = parse_students(args.student)
    config = PipelineConfig.from_yaml(args.config)
    if config.refiner is None:
        raise SystemExit(f"{args.config} has no refiner: the benchmark needs the two-stage chain.")
    first = read_records(next(iter(students.values())), expected=DiT)
    shift = refine_settings(first, None, "student").shift
    teacher = SamplingSettings(args.teacher_steps, args.teacher_guidance, shift, args.teacher_sampler)
    perceptual = PerceptualLoss(net="alex", backbone_path=args.lpips_backbone)

    rows = {"teacher": run_row(dataclasses.replace(config, refine=teacher), args)}
    for name, path in students.items():
        rows[name] = run_row(dataclasses.replace(config, refiner=path, refine=None), args)

    reference = rows["teacher"][1]
    teacher_seconds = rows["teacher"][0]["refine_s"]
    print(
        f"refine stage over {len(args.seeds)} seed(s), {torch.get_num_threads()} thread(s); distances to the teacher's clips"
    )
    print(
        f"{'row':<12}{'steps':>6}{'cfg':>6}{'NFE':>6}{'time s':>9}{'vs teacher':>12}{'PSNR dB':>9}{'LPIPS':>8}"
    )
    table = []
    for name, (row, videos) in rows.items():
        with torch.no_grad():
            mse = torch.stack([(v - r).pow(2).mean() for v, r in zip(videos, reference)]).mean()
            lpips = torch.stack([perceptual(v[None], r[None]) for v, r in zip(videos, reference)]).mean()
        psnr = 10 * math.log10(4.0 / mse.item()) if mse > 0 else math.inf
        row |= {
            "name": name,
            "psnr_db": psnr,
            "lpips": lpips.item(),
            "time_ratio": row["refine_s"] / teacher_seconds,
        }
        settings = row["settings"]
        print(
            f"{name:<12}{settings['steps']:>6}{settings['guidance_scale']:>6g}{row['nfe']:>6}{row['refine_s']:>9.2f}"
            f"{row['time_ratio']:>11.1%} {psnr:>8.2f}{row['lpips']:>8.4f}"
        )
        table.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()

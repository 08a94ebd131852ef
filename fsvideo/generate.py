"""``fsvideo generate``: one image-to-video generation from the command line (DESIGN §3).

    fsvideo generate --image in.png --prompt "a cat walks across the garden" --out out.mp4 \\
        --config configs/pipeline/tiny-generate.yaml --seed 0

Writes ``out.mp4`` (H.264) and ``out.json`` beside it (the prompt, every setting used, the model paths and
the timings), shows a progress bar over the denoising steps and prints the seconds spent loading the
networks, encoding (FSAE encoder, text and image encoders), in the DiT and decoding. Settings come from
the config's ``generation:`` section; flags override them.

On N processes (N GPUs, or N CPU processes over gloo), launched by torchrun::

    torchrun --nproc-per-node 2 --no-python fsvideo generate --image in.png --prompt "…" --out out.mp4

the DiTs are sharded with FSDP over the N processes and run context-parallel over all of them (dp 1 × cp N,
``FSVideoPipeline.parallelize``; N must divide the DiTs' heads), each process on its own GPU
(``LOCAL_RANK``); the first process writes the video and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from fsvideo.distill import refine_settings
from fsvideo.dit import DiT
from fsvideo.flow import SAMPLERS
from fsvideo.parallel import device_mesh
from fsvideo.pipeline import PRECISIONS, RESIZE_MODES, FSVideoPipeline, PipelineConfig, load_image
from fsvideo.pretrained import read_records
from fsvideo.video_io import write_mp4

DEFAULT_CONFIG = "configs/pipeline/generate.yaml"

# flag -> GenerationSettings field, for the flags that override the config's generation section
_SETTING_FLAGS = {
    "negative_prompt": "negative_prompt",
    "frames": "num_frames",
    "height": "height",
    "width": "width",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "shift": "shift",
    "seed": "seed",
    "sampler": "sampler",
    "resize_mode": "resize_mode",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsvideo generate",
        description="Generate a video from an image and a prompt (FSVideo image-to-video pipeline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image", required=True, help="input image (PNG, JPEG, …): the video's first frame")
    parser.add_argument("--prompt", required=True, help="what happens in the video")
    parser.add_argument(
        "--out", required=True, help="output .mp4 path; the settings go to the same name .json"
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="pipeline config (configs/pipeline/tiny-generate.yaml runs on a CPU)",
    )
    unset = "default: the config's generation section"
    parser.add_argument("--negative-prompt", help=f"unconditional prompt of the guidance ({unset})")
    parser.add_argument("--frames", type=int, help=f"frames, 1 + 4k ({unset})")
    parser.add_argument("--height", type=int, help=f"height, a multiple of 64 ({unset})")
    parser.add_argument("--width", type=int, help=f"width, a multiple of 64 ({unset})")
    parser.add_argument("--steps", type=int, help=f"sampler steps ({unset})")
    parser.add_argument("--guidance-scale", type=float, help=f"classifier-free guidance scale ({unset})")
    parser.add_argument("--shift", type=float, help=f"timestep shift of the schedule ({unset})")
    parser.add_argument("--seed", type=int, help=f"seed of the initial noise ({unset})")
    parser.add_argument("--sampler", choices=SAMPLERS, help=f"flow ODE solver ({unset})")
    parser.add_argument(
        "--resize-mode", choices=RESIZE_MODES, help=f"how the image is fitted to height×width ({unset})"
    )
    refine = "default: the config's refine section"
    parser.add_argument("--refine-steps", type=int, help=f"refiner sampler steps, two-stage chain ({refine})")
    parser.add_argument("--refine-guidance-scale", type=float, help=f"refiner guidance scale ({refine})")
    parser.add_argument("--refine-shift", type=float, help=f"refiner timestep shift ({refine})")
    parser.add_argument("--refine-sampler", choices=SAMPLERS, help=f"refiner flow ODE solver ({refine})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, auto (default: the config's)")
    parser.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only the network in use on the device (default: the config's)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, help="bf16 or fp32 (default: the config's)")
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate of the mp4")
    return parser


def generate_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fsvideo generate`` (``argv`` excludes ``generate`` itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        parser.error(f"--out must name an .mp4 file, got {out}")
    if args.fps <= 0:
        parser.error(f"--fps must be positive, got {args.fps}")
    _generate(args, out)  # what it raises for bad input, ``fsvideo`` reports in one line


def join_processes(device: str) -> tuple[str, DeviceMesh | None]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (NCCL on CUDA, gloo on the CPU), give this
    process its own GPU, and return its device (``cuda:LOCAL_RANK`` or ``cpu``) and the mesh the DiTs run on
    (dp 1 × cp N, for ``FSVideoPipeline.parallelize``); alone: ``device`` and None. ``device`` is "auto",
    "cpu" or "cuda"; the caller destroys the process group when it is done (``dist.destroy_process_group``).
    Also used by ``benchmarks/table4.py``'s two-GPU row."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    device_type = torch.device(device).type
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device, device_mesh(device_type, world_size, world_size)


def _generate(args: argparse.Namespace, out: Path) -> None:
    config = PipelineConfig.from_yaml(args.config)
    runtime = {name: getattr(args, name) for name in ("device", "offload", "precision")}
    config = dataclasses.replace(config, **{k: v for k, v in runtime.items() if v is not None})
    device, mesh = join_processes(config.device)
    config = dataclasses.replace(config, device=device)
    try:
        _generate_on(config, mesh, args, out)
    finally:
        if mesh is not None:
            dist.destroy_process_group()


def _generate_on(
    config: PipelineConfig, mesh: DeviceMesh | None, args: argparse.Namespace, out: Path
) -> None:
    """Generate with ``config`` (on the processes of ``mesh`` when given) and write ``out`` from the first."""
    refine = {
        name: getattr(args, f"refine_{name}") for name in ("steps", "guidance_scale", "shift", "sampler")
    }
    given = {k: v for k, v in refine.items() if v is not None}
    if given:  # flags override single fields of the settings the pipeline would use
        records = read_records(config.refiner, expected=DiT) if config.refiner is not None else {}
        config.refine = dataclasses.replace(
            config.refine or refine_settings(records, None, str(config.refiner)), **given
        )
    overrides = {field: getattr(args, flag) for flag, field in _SETTING_FLAGS.items()}
    settings = dataclasses.replace(config.generation, **{k: v for k, v in overrides.items() if v is not None})
    image = load_image(args.image)  # before loading the networks: a bad image fails in a second, not minutes

    start = time.perf_counter()
    pipe = FSVideoPipeline.from_config(config)
    pipe.check_settings(settings)
    if mesh is not None:
        pipe.parallelize(mesh)
    load_time = time.perf_counter() - start
    writes = mesh is None or dist.get_rank() == 0
    processes = (
        ""
        if mesh is None
        else f", {mesh.size()} processes: DiTs FSDP-sharded, context parallel {mesh.size()}"
    )
    if writes:
        print(
            f"loaded the networks in {load_time:.2f} s (device {pipe.device}, {pipe.precision}, offload "
            f"{pipe.offload}{processes})"
        )

    total = settings.steps + (pipe.chain.settings.steps if pipe.chain is not None else 0)
    with tqdm(total=total, desc="denoising", unit="step", disable=not writes) as bar:
        result = pipe.generate(image, args.prompt, settings, callback=lambda *_: bar.update(1))
    if not writes:
        return
    frames = result.frames_uint8()
    write_mp4(out, frames, fps=args.fps)

    descriptions = {
        "encode": "FSAE encoder, text and image encoders",
        "upsample": "latent upsampler ×2",
        "decode": "FSAE decoder",
    }
    for stage in result.stages:
        if "nfe" in stage:
            used = stage["settings"]
            what = f"{used['steps']} {used['sampler']} steps, {stage['nfe']} DiT calls"
        else:
            what = descriptions.get(stage["name"], "")
        print(f"{stage['name']:<7}{stage['seconds']:8.2f} s  ({what})")
    record = {
        "image": str(args.image),
        "prompt": args.prompt,
        "output": str(out),
        "config": str(args.config),
        "models": {
            "autoencoder": config.autoencoder,
            "dit": config.dit,
            "text_encoder": config.text_encoder,
            "image_encoder": config.image_encoder,
            "text_len": config.text_len,
            "upsampler": config.upsampler,
            "refiner": config.refiner,
        },
        "device": str(pipe.device),
        "processes": 1 if mesh is None else mesh.size(),
        "precision": pipe.precision,
        "offload": pipe.offload,
        "tiling": dataclasses.asdict(config.tiling) if config.tiling is not None else None,
        "settings": dataclasses.asdict(result.settings),
        "refine": dataclasses.asdict(pipe.chain.settings) if pipe.chain is not None else None,
        "generated_size": result.generated_size,
        "shift_used": result.shift,
        "fps": args.fps,
        "frames": int(frames.shape[0]),
        "timings_s": {"load": load_time, **result.timings},
        "stages": result.stages,
        "nfe": sum(stage.get("nfe", 0) for stage in result.stages),
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    height, width = frames.shape[1:3]
    if result.generated_size is not None:
        print(f"generated at {result.generated_size[0]}×{result.generated_size[1]} and centre-cropped")
    print(f"wrote {out} ({frames.shape[0]} frames, {height}×{width}, {args.fps:g} fps) and {json_path}")

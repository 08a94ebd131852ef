"""Table 4 of the report (§3.2, inference speed): the paper's pipeline, random weights, bf16, one video of
121 frames at 720×1280 (generated at 768×1280: the two-stage chain needs sides that are multiples of 128),
60 base-DiT NFE (30 UniPC steps with guidance 5) + 8 refiner NFE (Euler, no guidance: the distilled
refiner), as ``configs/pipeline/generate-distilled.yaml``.

Rows (each a full ``FSVideoPipeline.generate``; the pipeline's own stage timings):

  1 GPU, no memory limit     every network on the GPU (``offload: false``); 2×16.4B DiT in bf16 is 61 GiB, so
                             on an 80 GB H100 this row may run out of memory (the paper estimated it): it
                             prints "out of memory" then
  1 GPU, offloading          ``offload: true``: each stage moves its networks to the GPU and back (the paper's
                             76.6 s row)
  2 GPUs, FSDP + CP          what ``fsvideo generate`` does under torchrun (``fsvideo.generate.join_processes``,
                             ``FSVideoPipeline.parallelize``): the base DiT and the refiner sharded with FSDP
                             over both processes and run context-parallel over them (dp 1 × cp 2, Ulysses), the
                             encoders, upsampler and FSAE whole on each, no offloading. Each process builds both
                             DiTs whole on its GPU (61 GiB in bf16) before they are sharded. Needs
                             ``torchrun --nproc-per-node 2 … --rows two-gpu`` (with ``--tiny``: two CPU
                             processes over gloo); without torchrun it is skipped with the reason printed

Per row: seconds per stage (encode, base DiT, upsample, refine, decode) and the total; per DiT stage the
analytic TFLOP per NFE (``fsvideo.estimate.dit_forward_flops``: one DiT call on one latent, the count that
``torch.utils.flop_counter`` gives) and the achieved TFLOP/s as a fraction of the GPU's dense bf16 peak
(``fsvideo.estimate.PEAK_BF16_TFLOPS``; on two GPUs, of both GPUs' peak together).

The text and image encoders are tiny random UMT5 / CLIP (no weights can be downloaded; their cost beside the
DiTs is small at the paper's sizes: UMT5-XXL encodes one 512-token prompt once), so the DiTs' text and image
widths follow them (32); the DiTs are otherwise the paper's (dim 5120, 40 layers, Layer Memory). The FSAE
decoder decodes ``--decode-chunk`` latent frames at a time (``tiling.chunk_latent_frames``).

    python benchmarks/table4.py                      # one H100-class GPU, about 4–6 minutes
    python benchmarks/table4.py --base-steps 2 --refine-steps 1 --rows offload   # a quick look
    torchrun --nproc-per-node 2 benchmarks/table4.py --rows two-gpu             # two H100-class GPUs
    python benchmarks/table4.py --tiny               # tiny networks on the CPU (what the test runs)
    torchrun --nproc-per-node 2 benchmarks/table4.py --tiny --rows two-gpu      # two CPU processes, gloo
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from fsvideo.ae import FSAE, FSAEConfig, TilingConfig
from fsvideo.dit import DiT, DiTConfig
from fsvideo.encoders import ImageEncoder, TextEncoder, save_tiny_encoders
from fsvideo.estimate import device_peak_tflops, dit_forward_flops
from fsvideo.generate import join_processes
from fsvideo.pipeline import FSVideoPipeline, GenerationSettings, RefinerChain
from fsvideo.refiner import DynamicMaskConfig
from fsvideo.stages import SamplingSettings
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig

PROMPT = "a cat walks across the garden in the morning light"
ROWS = ("full", "offload", "two-gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny presets on the CPU, 9 frames at 128×256")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (default 121; tiny 9)")
    parser.add_argument("--height", type=int, default=None, help="video height (default 720; tiny 128)")
    parser.add_argument("--width", type=int, default=None, help="video width (default 1280; tiny 256)")
    parser.add_argument(
        "--base-steps", type=int, default=30, help="base DiT UniPC steps (×2 NFE with guidance)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=5.0, help="base DiT guidance (1: one NFE a step)"
    )
    parser.add_argument("--refine-steps", type=int, default=8, help="refiner Euler steps, no guidance")
    parser.add_argument("--text-len", type=int, default=512, help="text tokens per prompt")
    parser.add_argument("--decode-chunk", type=int, default=2, help="latent frames the FSAE decodes at once")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed 1-step generations before each row")
    args = parser.parse_args(argv)
    args.frames = args.frames or (9 if args.tiny else 121)
    args.height = args.height or (128 if args.tiny else 720)
    args.width = args.width or (256 if args.tiny else 1280)
    return args


def build(factory, device: torch.device, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Built on the meta device, materialised on ``device`` in ``dtype`` (a 16B DiT is never float32 anywhere:
    two of those would not fit in the GPU, nor beside each other in host memory) with random weights moved off
    their init (the DiT head starts at zero, which would make every velocity zero)."""
    with torch.device("meta"):
        network = factory().to(dtype)
    network.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        network.init_weights()
        for param in network.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator, device=device).to(param))
    return network.eval().requires_grad_(False)


@dataclasses.dataclass
class Networks:
    """Architectures of the benchmarked pipeline: the paper's, or the tiny presets (``--tiny``)."""

    autoencoder: FSAEConfig
    dit: DiTConfig
    """Base DiT and refiner (the refiner starts as the base DiT, §2.4.2)."""
    upsampler: LatentUpsamplerConfig

    @classmethod
    def of(cls, tiny: bool) -> Networks:
        ae = FSAEConfig.tiny() if tiny else FSAEConfig.paper()
        channels = ae.latent_channels
        dit = (DiTConfig.tiny if tiny else DiTConfig.paper)(
            latent_channels=channels, text_dim=32, image_dim=32
        )
        upsampler = (LatentUpsamplerConfig.tiny if tiny else LatentUpsamplerConfig.paper)(
            latent_channels=channels
        )
        return cls(ae, dit, upsampler)


def build_pipeline(
    args: argparse.Namespace, networks: Networks, device: torch.device, offload: bool, encoders: dict
) -> FSVideoPipeline:
    """Random-weight networks, initialised on ``device`` (fast) one at a time; with ``offload`` each is moved to
    the CPU at once, where the pipeline keeps it between its stages."""
    home = torch.device("cpu") if offload else device
    tiny = args.tiny
    ae_config, dit_config, up_config = networks.autoencoder, networks.dit, networks.upsampler
    channels = ae_config.latent_channels
    dtype = torch.float32 if tiny else torch.bfloat16
    dit = build(lambda: DiT(dit_config), device, seed=0, dtype=dtype).to(home)
    refiner = build(lambda: DiT(dit_config), device, seed=1, dtype=dtype).to(home)
    chain = RefinerChain(
        build(lambda: LatentUpsampler(up_config), device, seed=2).to(home),
        refiner,
        torch.zeros(channels),
        torch.ones(channels),
        DynamicMaskConfig(),
        SamplingSettings(args.refine_steps, 1.0, shift=5.0, sampler="euler"),
    )
    return FSVideoPipeline(
        build(lambda: FSAE(ae_config), device, seed=3).to(home),
        dit,
        TextEncoder.from_pretrained(encoders["text"], text_len=args.text_len),
        ImageEncoder.from_pretrained(encoders["image"]),
        torch.zeros(channels),
        torch.ones(channels),
        device=device,
        offload=offload,
        precision="fp32" if tiny else "bf16",
        tiling=TilingConfig(chunk_latent_frames=args.decode_chunk),
        defaults=GenerationSettings(
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            steps=args.base_steps,
            guidance_scale=args.guidance_scale,
            shift=3.0,
            sampler="unipc",
        ),
        chain=chain,
    )


def image_of(height: int, width: int) -> torch.Tensor:
    """A smooth ``3×H×W`` test image in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([x, y, x * y])


def run_row(name: str, pipe: FSVideoPipeline, args: argparse.Namespace) -> dict:
    image = image_of(args.height, args.width)
    for _ in range(args.warmup):
        pipe.generate(image, PROMPT, steps=1)
    result = pipe.generate(image, PROMPT)
    return {"name": name, "stages": result.stages, "size": result.generated_size or (args.height, args.width)}


def dit_flops_per_nfe(
    networks: Networks, args: argparse.Namespace, size: tuple[int, int], image_len: int
) -> dict[str, int]:
    """Analytic FLOPs of one DiT call on one latent, by stage: base DiT (half size) and refiner (full size)."""
    _, t, h, w = networks.autoencoder.latent_shape(args.frames, *size)
    return {
        "dit": dit_forward_flops(networks.dit, (t, h // 2, w // 2), args.text_len, image_len),
        "refine": dit_forward_flops(networks.dit, (t, h, w), args.text_len, image_len),
    }


def print_row(row: dict, flops: dict[str, float], peak: float | None, gpus: int = 1) -> None:
    """One row: seconds per stage and total; per DiT stage NFE, TFLOP/NFE and the achieved share of the bf16
    ``peak`` of one GPU times ``gpus`` (the row's GPUs together)."""
    seconds = {stage["name"]: stage["seconds"] for stage in row["stages"]}
    cells = " ".join(
        f"{seconds.get(k, float('nan')):9.2f}" for k in ("encode", "dit", "upsample", "refine", "decode")
    )
    dit_seconds = seconds.get("dit", 0.0) + seconds.get("refine", 0.0)
    print(
        f"{row['name']:22s} {cells} {sum(seconds.values()):9.2f}   DiT latency (base + refine) {dit_seconds:.2f} s"
    )
    for stage in row["stages"]:
        if stage["name"] in flops and stage.get("nfe"):
            per_nfe = flops[stage["name"]] / 1e12
            achieved = per_nfe * stage["nfe"] / stage["seconds"]
            share = ""
            if peak:
                of = f"{gpus} × {peak:.0f}" if gpus > 1 else f"{peak:.0f}"
                share = f", {achieved / (gpus * peak):.1%} of the {of} TFLOP/s bf16 peak"
            print(
                f"{'':22s}   {stage['name']}: {stage['nfe']} NFE × {per_nfe:.4g} TFLOP/NFE, "
                f"{achieved:.4g} TFLOP/s achieved{share}"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.rows != ["two-gpu"]:
        raise SystemExit(
            f"under torchrun ({world_size} processes) only the two-GPU row runs: pass --rows two-gpu"
        )
    if world_size not in (1, 2):
        raise SystemExit(f"the two-GPU row runs on 2 processes, got WORLD_SIZE={world_size}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("Table 4 runs the 16B DiTs on a GPU; on a CPU use --tiny")
    with tempfile.TemporaryDirectory() as directory:
        # before joining the process group: under it transformers saves on rank 0 only, into rank 0's folder
        encoders = save_tiny_encoders(directory)
        device, mesh = join_processes("cuda" if cuda else "cpu")  # alone: the device as given, no mesh
        try:
            run_rows(args, torch.device(device), mesh, encoders)
        finally:
            if mesh is not None:
                dist.destroy_process_group()


def run_rows(args: argparse.Namespace, device: torch.device, mesh: DeviceMesh | None, encoders: dict) -> None:
    """Every row of ``args.rows`` on ``device`` with the tiny encoders at ``encoders`` (``save_tiny_encoders``);
    with ``mesh`` (torchrun, 2 processes) the two-GPU row, printed by the first process."""
    prints = mesh is None or dist.get_rank() == 0
    say = print if prints else (lambda *_: None)
    torch.manual_seed(0)  # every process draws the same random weights
    peak = device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(
        f"Table 4: {args.frames}×{args.height}×{args.width}, base {args.base_steps} UniPC steps "
        f"(guidance {args.guidance_scale}) + refiner {args.refine_steps} Euler steps, "
        f"{'tiny fp32' if args.tiny else 'paper bf16'}, random weights, on {name}"
        + (f" × {mesh.size()} processes" if mesh is not None else "")
    )
    say(
        f"{'row':22s} {'encode s':>9s} {'base s':>9s} {'upsamp s':>9s} {'refine s':>9s} {'decode s':>9s} {'total s':>9s}"
    )
    networks = Networks.of(args.tiny)
    for row in args.rows:
        if row == "two-gpu":
            label = f"2 {'GPUs' if device.type == 'cuda' else 'CPU procs'}, FSDP + CP"
            if mesh is None:
                say(
                    f"{'2 GPUs, FSDP + CP':22s} skipped: needs 2 processes: torchrun --nproc-per-node 2 "
                    "benchmarks/table4.py --rows two-gpu"
                )
                continue
        else:
            label = "1 GPU, offloading" if row == "offload" else "1 GPU, no memory limit"
        start = time.perf_counter()
        try:
            pipe = build_pipeline(args, networks, device, row == "offload", encoders)
            if row == "two-gpu":
                pipe.parallelize(mesh)  # DiTs FSDP-sharded over both processes, context parallel 2
            vision = pipe.image_encoder.model.config
            image_len = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
            result = run_row(label, pipe, args)
        except torch.OutOfMemoryError:
            say(f"{label:22s} out of memory (after {time.perf_counter() - start:.0f} s)")
            continue
        finally:
            pipe = None  # the next row builds its own networks: free these first
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if prints:
            gpus = 1 if mesh is None else mesh.size()
            print_row(result, dit_flops_per_nfe(networks, args, result["size"], image_len), peak, gpus)


if __name__ == "__main__":
    main()

"""Context parallel (Ulysses, ``fsvideo.parallel``): tokens/s and peak memory per process of a DiT forward +
backward at each context-parallel degree, every degree measured in this same run.

Degree cp runs cp processes (gloo on the CPU, NCCL on GPUs, one GPU each) that split one sample's tokens:
the DiT is sharded with FSDP over them and run context-parallel (what ``model.init_args.parallel`` with
``fsdp: true, context_parallel: cp`` trains with); cp 1 is one process with the plain DiT. Reported per degree:
the best step time of ``--repeats``, tokens/s of the group (tokens of the sample / step time) and per process,
each process's peak memory — on CUDA ``max_memory_allocated``, on the CPU the growth of the peak resident set
over what the process held before building the DiT (glibc's heap keeps freed blocks and gloo its buffers, so a
coarse figure) — and the bytes autograd saves for backward on each process (activations, parameters excluded
also while FSDP has them gathered; device independent): what context parallel divides by cp. Ratios are
against cp 1. On the CPU each process gets ``--threads`` threads, so cp 2 also uses twice the cores: its
tokens/s is the scaling a second device gives, its memory the per-device saving.

    python benchmarks/scale.py --help
    python benchmarks/scale.py --degrees 1 2 --dim 256 --layers 4 --heads 4 --frames 17 --height 1024 --width 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from measure import peak_rss_bytes  # benchmarks/ is this script's import root
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

from fsvideo.dit import DiT, DiTConfig
from fsvideo.parallel import ParallelConfig, device_mesh, parallelize

SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION = 64, 4
"""FSAE-Standard's latent grid (patch 1×1×1): ``(1 + F/4) × H/64 × W/64`` tokens."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2], help="context-parallel degrees")
    parser.add_argument("--dim", type=int, default=256, help="DiT width")
    parser.add_argument("--layers", type=int, default=4, help="number of blocks")
    parser.add_argument(
        "--heads", type=int, default=4, help="attention heads (every degree must divide them)"
    )
    parser.add_argument("--frames", type=int, default=17, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--height", type=int, default=1024, help="clip height (multiple of 64)")
    parser.add_argument("--width", type=int, default=1024, help="clip width (multiple of 64)")
    parser.add_argument("--layer-memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (the best is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPU")
    return parser.parse_args()


def _saved_activation_bytes(model: torch.nn.Module, loss_fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``loss_fn()``, parameters excluded:
    they are looked up when each tensor is saved, as FSDP registers the gathered ones only while it runs a
    block."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # FSDP's sharded parameters (DTensors) are never saved; the gathered ones it registers while a block runs are
        parameters = {
            p.untyped_storage().data_ptr() for p in model.parameters() if not isinstance(p, DTensor)
        }
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        local = local.elem if isinstance(local, AsyncCollectiveTensor) else local  # a collective's result
        storage = local.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


def _measure(rank: int, degree: int, args: argparse.Namespace, store: str, out: str) -> None:
    """One process of a cp group: build, shard, time forward + backward, write this rank's figures."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if degree > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=degree
        )
    rss_before = peak_rss_bytes()
    config = DiTConfig.tiny(
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        ffn_dim=int(2.7 * args.dim) // 2 * 2,
        layer_memory=args.layer_memory,
        router_gate_init=0.5,
    )
    torch.manual_seed(0)
    dit = DiT(config).to(device, dtype)
    if degree > 1:
        parallelize(
            [dit],
            [],
            ParallelConfig(fsdp=True, context_parallel=degree),
            device_mesh(device.type, degree, degree),
        )
    frames = 1 + (args.frames - 1) // TEMPORAL_COMPRESSION
    height, width = args.height // SPATIAL_COMPRESSION, args.width // SPATIAL_COMPRESSION
    generator = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(1, config.in_channels, frames, height, width, generator=generator).to(device, dtype),
        torch.tensor([0.5], device=device),
        torch.randn(1, 16, config.text_dim, generator=generator).to(device, dtype),
        torch.randn(1, 16, config.image_dim, generator=generator).to(device, dtype),
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.repeats):
        if degree > 1:
            dist.barrier()
        start = time.perf_counter()
        dit(*inputs).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        dit.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes() - rss_before
    saved = _saved_activation_bytes(dit, lambda: dit(*inputs).float().square().mean())
    tokens = frames * height * width
    figures = {
        "rank": rank,
        "seconds": min(times),
        "tokens": tokens,
        "peak_bytes": peak,
        "saved_bytes": saved,
    }
    Path(out, f"{degree}-{rank}.json").write_text(json.dumps(figures))
    if degree > 1:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and max(args.degrees) > torch.cuda.device_count():
        raise SystemExit(
            f"degree {max(args.degrees)} needs as many GPUs; {torch.cuda.device_count()} visible"
        )
    for degree in args.degrees:
        if args.heads % degree:
            raise SystemExit(f"context parallel {degree} must divide --heads {args.heads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for degree in args.degrees:
            mp.spawn(_measure, args=(degree, args, str(Path(out, f"store-{degree}")), out), nprocs=degree)
            ranks = [json.loads(Path(out, f"{degree}-{rank}.json").read_text()) for rank in range(degree)]
            seconds = max(r["seconds"] for r in ranks)  # a step ends when its slowest rank does
            rows[degree] = {
                "seconds": seconds,
                "tokens_per_s": ranks[0]["tokens"] / seconds,
                "peak_mib": max(r["peak_bytes"] for r in ranks) / 2**20,
                "saved_mib": max(r["saved_bytes"] for r in ranks) / 2**20,
                "tokens": ranks[0]["tokens"],
            }
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"DiT dim {args.dim}, {args.layers} layers, {args.heads} heads, Layer Memory {args.layer_memory}; "
        f"{rows[args.degrees[0]]['tokens']} tokens ({args.frames}×{args.height}×{args.width}); {args.device} "
        f"({where}, {args.threads} thread(s) per process); forward + backward, best of {args.repeats}"
    )
    print(
        f"{'cp':>3} {'step s':>8} {'tokens/s':>10} {'per process':>12} {'peak MiB/proc':>14} "
        f"{'saved MiB/proc':>15} {'× tokens/s':>11} {'× peak':>7} {'× saved':>8}"
    )
    base = rows[args.degrees[0]]
    for degree, row in rows.items():
        print(
            f"{degree:>3} {row['seconds']:>8.3f} {row['tokens_per_s']:>10.0f} {row['tokens_per_s'] / degree:>12.0f} "
            f"{row['peak_mib']:>14.1f} {row['saved_mib']:>15.1f} {row['tokens_per_s'] / base['tokens_per_s']:>11.2f} "
            f"{row['peak_mib'] / base['peak_mib']:>7.2f} {row['saved_mib'] / base['saved_mib']:>8.2f}"
        )


if __name__ == "__main__":
    main()

"""Base-DiT benchmarks; every ratio compares two measurements taken in this same run.

(a) FSAE latent grid (128 ch, 64×64×4, patch 1×1×1) vs Wan grid (16 ch, 8×8×4, patch 1×2×2) for the
    same clip and the same DiT width: forward and forward+backward latency, and the analytic FLOP ratio.
(b) our DiT (Layer Memory on and off) vs diffusers' WanTransformer3DModel at identical width, depth
    and token count.
(c) Layer Memory on vs off: latency and the bytes autograd saves for backward (device independent).

On the CPU, glibc is told to keep freed memory for reuse (``keep_freed_cpu_memory``; ``--release-memory``
keeps its default) and the models run in a rotating order; each time is the best of ``--repeats``.

    python benchmarks/dit.py --help
    python benchmarks/dit.py --dim 256 --layers 4 --heads 4 --frames 17 --height 256 --width 256
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import time
from collections.abc import Callable

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils import logging as diffusers_logging

from fsvideo.dit import DiT, DiTConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256, help="DiT width")
    parser.add_argument("--layers", type=int, default=4, help="number of blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--ffn-dim", type=int, default=None, help="FFN width (default 2.7·dim, as Wan)")
    parser.add_argument("--frames", type=int, default=17, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--height", type=int, default=256, help="clip height (multiple of 64)")
    parser.add_argument("--width", type=int, default=256, help="clip width (multiple of 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=512, help="text tokens (diffusers' Wan needs 512)")
    parser.add_argument("--image-len", type=int, default=257, help="image tokens (CLIP ViT-H/14: 257)")
    parser.add_argument("--text-dim", type=int, default=64, help="text-encoder width (4096 for UMT5-XXL)")
    parser.add_argument("--image-dim", type=int, default=64, help="image-encoder width (1280 for CLIP-H)")
    parser.add_argument(
        "--compare-grid", choices=("fsae", "wan"), default="wan", help="token grid of benchmarks (b) and (c)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPU")
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="CPU: keep glibc's default of handing freed memory back to the OS (see keep_freed_cpu_memory)",
    )
    return parser.parse_args()


def grid_config(args: argparse.Namespace, grid: str, layer_memory: bool) -> tuple[DiTConfig, tuple[int, ...]]:
    """DiT config and latent shape ``(C_in, t, h, w)`` of the clip on one latent grid."""
    if (args.frames - 1) % 4 or args.height % 64 or args.width % 64:
        raise ValueError("--frames must be 1 + 4k and --height/--width multiples of 64")
    t = 1 + (args.frames - 1) // 4
    sizes = dict(
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        ffn_dim=args.ffn_dim or round(2.7 * args.dim),
        text_dim=args.text_dim,
        image_dim=args.image_dim,
        layer_memory=layer_memory,
    )
    if grid == "fsae":
        config = DiTConfig(latent_channels=128, patch_size=(1, 1, 1), **sizes)
        spatial = (args.height // 64, args.width // 64)
    else:
        config = DiTConfig(latent_channels=16, patch_size=(1, 2, 2), **sizes)
        spatial = (args.height // 8, args.width // 8)
    return config, (config.in_channels, t, *spatial)


def num_tokens(config: DiTConfig, shape: tuple[int, ...]) -> int:
    _, t, h, w = shape
    pt, ph, pw = config.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def analytic_flops(config: DiTConfig, tokens: int, text_len: int, image_len: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the DiT."""
    n, d, f = tokens, config.dim, config.ffn_dim
    context = text_len + (image_len if config.image_dim else 0)
    per_block = (
        8 * n * d * d  # self-attention q, k, v, o
        + 4 * n * n * d  # self-attention scores and weighted sum
        + 4 * n * d * d  # cross-attention q, o
        + 4 * context * d * d  # cross-attention k, v (text and image)
        + 4 * n * context * d  # cross-attention scores and weighted sum
        + 4 * n * d * f  # FFN
    )
    routers = (
        sum(4 * n * d * layer for layer in range(2, config.num_layers + 1)) if config.layer_memory else 0
    )
    embeddings = (
        2 * n * config.in_channels * config.patch_volume * d
        + 2 * n * d * config.out_channels * config.patch_volume
    )
    embeddings += 2 * text_len * (config.text_dim * d + d * d)
    if config.image_dim:
        embeddings += 2 * image_len * (2 * config.image_dim**2 + config.image_dim * d)
    return config.num_layers * per_block + routers + embeddings


def make_inputs(args, config, shape, device, dtype):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(args.batch, *shape, generator=generator).to(device, dtype),
        torch.rand(args.batch, generator=generator).to(device),
        torch.randn(args.batch, args.text_len, config.text_dim, generator=generator).to(device, dtype),
        torch.randn(args.batch, args.image_len, config.image_dim, generator=generator).to(device, dtype),
    )


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse, as PyTorch's CUDA caching allocator does.

    By default glibc returns the top of its heap to the OS once a step has freed its activations, and
    the next step page-faults all of it back in: on a virtual machine that costs more than the
    arithmetic of an elementwise kernel (about 0.4 ms per fresh 1.3 MB output against 0.04 ms reused),
    so CPU timings would mostly measure the page faults of each model's activation footprint, which
    (c) reports separately. Returns False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # 32 MiB is the largest mmap threshold glibc accepts; bigger blocks are rare here
    return libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark(
    models: dict[str, tuple[torch.nn.Module, tuple]], args: argparse.Namespace, device: str
) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` seconds of a forward (no grad) and a forward+backward per model.

    The models take turns inside every round, so a slow spell of a shared machine hits all of them;
    the minimum is the least disturbed run. The turn order rotates from round to round, so no model
    always runs first or after the same neighbour."""
    times = {name: {"fwd": [], "fwd+bwd": []} for name in models}
    names = list(models)
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model, inputs = models[name]
            for kind in ("fwd", "fwd+bwd"):
                _sync(device)
                start = time.perf_counter()
                if kind == "fwd":
                    with torch.no_grad():
                        model(*inputs)
                else:
                    model(*inputs).float().square().mean().backward()
                _sync(device)
                if round_index >= args.warmup:
                    times[name][kind].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    return {name: {kind: min(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def saved_activation_bytes(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during ``loss_fn()``."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    del loss
    return sum(storages.values())


def build_ours(config, device, dtype):
    return DiT(config).to(device, dtype)


def build_diffusers(config, device, dtype):
    model = WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        eps=config.eps,
        image_dim=config.image_dim,
        added_kv_proj_dim=config.dim,
    )
    return model.to(device, dtype)


class DiffusersCall(torch.nn.Module):
    """Gives diffusers' model our call signature (σ in [0, 1] → Wan timestep σ·1000)."""

    def __init__(self, model: WanTransformer3DModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_in, sigma, text, image):
        return self.model(latent_in, sigma * 1000, text, image, return_dict=False)[0]


def main() -> None:
    args = parse_args()
    device = args.device
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    torch.manual_seed(0)
    # diffusers warns that .to(dtype) also casts the modules it keeps in float32; ours are cast alike
    diffusers_logging.set_verbosity_error()
    print(
        f"device {device}, dtype {dtype}, dim {args.dim}, {args.layers} layers, {args.heads} heads, batch {args.batch}"
    )
    if device == "cpu" and not args.release_memory:
        kept = keep_freed_cpu_memory()
        print("freed memory kept for reuse (glibc mallopt)" if kept else "not glibc: allocator left as it is")
    print(
        f"clip {args.frames}×{args.height}×{args.width}, text {args.text_len} tokens, image {args.image_len} tokens\n"
    )

    # (a) FSAE grid vs Wan grid ------------------------------------------------------------------
    grids, flops = {}, {}
    for grid in ("fsae", "wan"):
        config, shape = grid_config(args, grid, layer_memory=True)
        grids[grid] = (build_ours(config, device, dtype), make_inputs(args, config, shape, device, dtype))
        flops[grid] = analytic_flops(config, num_tokens(config, shape), args.text_len, args.image_len)
    results = benchmark(grids, args, device)
    for grid in grids:
        config, shape = grid_config(args, grid, layer_memory=True)
        print(
            f"(a) {grid:4s} grid: latent {shape}, {num_tokens(config, shape):6d} tokens, "
            f"{flops[grid] / 1e9:9.2f} GFLOP fwd, fwd {results[grid]['fwd'] * 1e3:8.2f} ms, "
            f"fwd+bwd {results[grid]['fwd+bwd'] * 1e3:8.2f} ms"
        )
    del grids
    print(
        f"    Wan / FSAE: FLOPs {flops['wan'] / flops['fsae']:.1f}×, fwd {results['wan']['fwd'] / results['fsae']['fwd']:.1f}×, "
        f"fwd+bwd {results['wan']['fwd+bwd'] / results['fsae']['fwd+bwd']:.1f}×\n"
    )

    # (b) ours vs diffusers, (c) Layer Memory on vs off -------------------------------------------------
    config_lm, shape = grid_config(args, args.compare_grid, layer_memory=True)
    config_plain, _ = grid_config(args, args.compare_grid, layer_memory=False)
    inputs = make_inputs(args, config_lm, shape, device, dtype)
    print(f"(b, c) on the {args.compare_grid} grid: {num_tokens(config_lm, shape)} tokens")
    models = {
        "ours + Layer Memory": build_ours(config_lm, device, dtype),
        "ours, plain": build_ours(config_plain, device, dtype),
        "diffusers Wan": DiffusersCall(build_diffusers(config_plain, device, dtype)),
    }
    timings = benchmark({name: (model, inputs) for name, model in models.items()}, args, device)
    saved = {}
    for name, model in models.items():
        saved[name] = saved_activation_bytes(
            model, lambda model=model: model(*inputs).float().square().mean()
        )
        params = sum(p.numel() for p in model.parameters())
        print(
            f"    {name:20s}: {params / 1e6:8.2f} M params, fwd {timings[name]['fwd'] * 1e3:8.2f} ms, "
            f"fwd+bwd {timings[name]['fwd+bwd'] * 1e3:8.2f} ms, saved for backward {saved[name] / 2**20:8.1f} MiB"
        )
    ref = timings["diffusers Wan"]
    for name in ("ours + Layer Memory", "ours, plain"):
        print(
            f"(b) {name} / diffusers Wan: fwd {timings[name]['fwd'] / ref['fwd']:.3f}×, "
            f"fwd+bwd {timings[name]['fwd+bwd'] / ref['fwd+bwd']:.3f}× (< 1 = ours faster)"
        )
    on, off = timings["ours + Layer Memory"], timings["ours, plain"]
    print(
        f"(c) Layer Memory on / off: fwd {on['fwd'] / off['fwd']:.3f}×, fwd+bwd {on['fwd+bwd'] / off['fwd+bwd']:.3f}×, "
        f"saved activations {saved['ours + Layer Memory'] / saved['ours, plain']:.3f}×, FLOPs "
        f"{analytic_flops(config_lm, num_tokens(config_lm, shape), args.text_len, args.image_len) / analytic_flops(config_plain, num_tokens(config_plain, shape), args.text_len, args.image_len):.4f}×"
    )


if __name__ == "__main__":
    main()

"""FSAE vs Wan2.1 VAE: encode / decode latency and peak memory for one clip, measured in this run.

Every model has random weights at its real configuration: FSAE ``tiny`` and ``paper`` presets
(64×64×4, 128 channels for paper) and diffusers' ``AutoencoderKLWan()`` defaults (8×8×4, 16 channels).
Each (model, direction) runs in its own spawned process, so peak memory is that measurement's own:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the rise of the process's peak RSS above its
resident size before the call, with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so
that freed tensors leave the resident set, after a one-frame 64×64 call has loaded the kernels.
Model weights are excluded in both. Ratios are against Wan in the same run.
Token counts are those a DiT sees: Wan latent with a 1×2×2 patch, FSAE latent with 1×1×1.

    python benchmarks/ae.py --help
    python benchmarks/ae.py --frames 17 --size 256 --models fsae-tiny fsae-paper wan
    python benchmarks/ae.py --models fsae-paper wan --fsae-chunk 1   # FSAE with temporal splitting
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
from measure import PeakMemory, pin_mmap_threshold, run_spawned, timed  # benchmarks/ is the import root

MODELS = ("fsae-tiny", "fsae-paper", "wan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=17, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--size", type=int, default=256, help="height and width (multiple of 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="what to measure")
    parser.add_argument(
        "--fsae-chunk",
        type=int,
        default=0,
        help="FSAE temporal splitting: latent frames per causal chunk (0: one shot; Wan always chunks)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed calls (the best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPU")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.size % 64:
        parser.error("--frames must be 1 + 4k and --size a multiple of 64")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def build(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, int, int, int]:
    """Model, spatial and temporal compression, latent channels."""
    if name == "wan":
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan()
        spatial, temporal, channels = 8, 4, model.config.z_dim
    else:
        from fsvideo.ae import FSAE, FSAEConfig

        config = FSAEConfig.tiny() if name == "fsae-tiny" else FSAEConfig.paper()
        with torch.device("meta"):
            model = FSAE(config)
        model.to_empty(device="cpu")
        model.init_weights()
        spatial, temporal, channels = (
            config.spatial_compression,
            config.temporal_compression,
            config.latent_channels,
        )
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval(), spatial, temporal, channels


def measure(name: str, direction: str, args: argparse.Namespace, results: mp.Queue) -> None:
    """Runs in a fresh process: time ``direction`` of ``name`` and report its peak memory."""
    dtype = getattr(torch, args.dtype)
    model, spatial, temporal, channels = build(name, args.device, dtype)
    latent_shape = (channels, 1 + (args.frames - 1) // temporal, args.size // spatial, args.size // spatial)
    tiling = None
    if name != "wan" and args.fsae_chunk:
        from fsvideo.ae import TilingConfig

        tiling = TilingConfig(chunk_latent_frames=args.fsae_chunk)

    def encode(video: torch.Tensor) -> torch.Tensor:
        return model.encode(video).latent_dist.mode() if name == "wan" else model.encode(video, tiling=tiling)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return model.decode(latent).sample if name == "wan" else model.decode(latent, tiling=tiling)

    if direction == "encode":
        call, shape = encode, (args.batch, 3, args.frames, args.size, args.size)
    else:
        call, shape = decode, (args.batch, *latent_shape)
    x = torch.rand(shape, device=args.device, dtype=dtype) * 2 - 1
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        decode(encode(torch.zeros(1, 3, 1, 64, 64, device=args.device, dtype=dtype)))  # load the kernels
        for _ in range(args.warmup):
            call(x)
        with PeakMemory(cuda) as peak:
            best = float("inf")
            for _ in range(args.repeats):
                out, seconds = timed(lambda: call(x), cuda)
                best = min(best, seconds)
    params = sum(p.numel() for p in model.parameters())
    results.put((name, direction, best, peak.bytes, params, latent_shape, tuple(out.shape)))


def tokens(name: str, latent_shape: tuple[int, ...]) -> int:
    _, t, h, w = latent_shape
    return t * (h // 2) * (w // 2) if name == "wan" else t * h * w


def main() -> None:
    args = parse_args()
    pin_mmap_threshold(args.device)
    rows: dict[str, dict] = {}
    for name in args.models:
        for direction in ("encode", "decode"):
            _, _, seconds, peak, params, latent_shape, out_shape = run_spawned(
                f"{name} {direction}", measure, name, direction, args
            )
            row = rows.setdefault(name, {"params": params, "latent": latent_shape})
            row[direction] = (seconds, peak)
            print(
                f"  {name:10s} {direction}: {seconds:8.2f} s, peak +{peak / 2**20:8.0f} MiB, out {out_shape}"
            )

    print(
        f"\nclip {args.batch}×3×{args.frames}×{args.size}×{args.size}, {args.device}, {args.dtype}, "
        f"best of {args.repeats} after {args.warmup} warm-up, FSAE temporal chunk "
        f"{args.fsae_chunk or 'off'}; ratios are Wan / model (>1: model better)"
    )
    header = (
        f"{'model':10s} {'params':>8s} {'latent C×t×h×w':>16s} {'tokens':>7s} {'enc s':>8s} {'dec s':>8s} "
        f"{'enc MiB':>8s} {'dec MiB':>8s} {'enc ×':>6s} {'dec ×':>6s} {'encMem ×':>8s} {'decMem ×':>8s} {'tok ×':>6s}"
    )
    print(header)
    print("-" * len(header))
    wan = rows.get("wan")
    for name, row in rows.items():
        (enc_s, enc_mem), (dec_s, dec_mem) = row["encode"], row["decode"]
        n_tokens = tokens(name, row["latent"])
        if wan:
            (w_enc_s, w_enc_mem), (w_dec_s, w_dec_mem) = wan["encode"], wan["decode"]
            ratios = (
                f"{w_enc_s / enc_s:6.2f} {w_dec_s / dec_s:6.2f} {w_enc_mem / max(enc_mem, 1):8.2f} "
                f"{w_dec_mem / max(dec_mem, 1):8.2f} {tokens('wan', wan['latent']) / n_tokens:6.1f}"
            )
        else:
            ratios = "   (no wan in this run)"
        latent = "×".join(str(d) for d in row["latent"])
        print(
            f"{name:10s} {row['params'] / 1e6:7.1f}M {latent:>16s} {n_tokens:7d} {enc_s:8.2f} {dec_s:8.2f} "
            f"{enc_mem / 2**20:8.0f} {dec_mem / 2**20:8.0f} {ratios}"
        )


if __name__ == "__main__":
    main()

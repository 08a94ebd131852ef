"""FSAE-Standard vs FSAE-Lite decoder (spec §2.2.3): latency and peak memory decoding the same latent.

Both decoders have random weights at the paper's widths (``FSAEConfig.paper().with_decoder_variant``:
Lite halves the two outer decoder stages and uses group-causal convs) and decode one latent of the
clip size with first-frame features of the matching shapes and seeded noise. Each variant runs in its
own spawned process and its peak memory is measured by ``benchmarks/measure.py`` (GPU: peak allocated;
CPU: rise of the peak RSS above the resident size before the call, mmap threshold pinned), weights
excluded. ``lite-chunk`` is Lite with temporal splitting (exact for Lite, impossible for Standard).
The paper reports Lite at 1.75–2× less memory than Standard.

    python benchmarks/decoder.py --help
    python benchmarks/decoder.py --frames 17 --size 256
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
from measure import PeakMemory, pin_mmap_threshold, run_spawned, timed  # benchmarks/ is the import root

VARIANTS = ("standard", "lite", "lite-chunk")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=17, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--size", type=int, default=256, help="height and width (multiple of 64)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--chunk", type=int, default=1, help="latent frames per chunk of lite-chunk")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls (the best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPU")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.size % 64:
        parser.error("--frames must be 1 + 4k and --size a multiple of 64")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def measure(variant: str, args: argparse.Namespace, results: mp.Queue) -> None:
    """Runs in a fresh process: decode one latent with ``variant`` and report time and peak memory."""
    from fsvideo.ae import FSAE, FSAEConfig, TilingConfig

    dtype, device = getattr(torch, args.dtype), args.device
    base = FSAEConfig.paper() if args.preset == "paper" else FSAEConfig.tiny()
    config = base.with_decoder_variant(variant.removesuffix("-chunk"))
    with torch.device("meta"):
        model = FSAE(config)
    model.to_empty(device=device)
    model.init_weights()
    model = model.to(dtype=dtype).eval()
    tiling = TilingConfig(chunk_latent_frames=args.chunk) if variant.endswith("-chunk") else None
    inputs = torch.Generator().manual_seed(0)

    def features(size: int) -> list[torch.Tensor]:
        return [
            torch.randn(1, config.widths[i], 1, size >> i, size >> i, generator=inputs).to(device, dtype)
            for i in config.first_frame_stages
        ]

    def decode(latent: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(1)
        return model.decode(latent, tiling, first_frame_features=feats, generator=generator)

    latent_shape = config.latent_shape(args.frames, args.size, args.size)
    latent = torch.randn(1, *latent_shape, generator=inputs).to(device, dtype)
    clip_features = features(args.size)
    cuda = device.startswith("cuda")
    with torch.no_grad():
        s = config.spatial_compression
        decode(torch.zeros(1, config.latent_channels, 1, 1, 1, device=device, dtype=dtype), features(s))
        with PeakMemory(cuda) as peak:
            best = float("inf")
            for _ in range(args.repeats):
                out, seconds = timed(lambda: decode(latent, clip_features), cuda)
                best = min(best, seconds)
    params = sum(p.numel() for p in model.decoder.parameters())
    results.put((best, peak.bytes, params, tuple(out.shape)))


def main() -> None:
    args = parse_args()
    pin_mmap_threshold(args.device)
    rows = {}
    for variant in args.variants:
        rows[variant] = run_spawned(variant, measure, variant, args)
        seconds, peak, _, shape = rows[variant]
        print(f"  {variant:10s}: {seconds:8.2f} s, peak +{peak / 2**20:8.0f} MiB, out {shape}")

    print(
        f"\n{args.preset} widths, clip 1×3×{args.frames}×{args.size}×{args.size}, {args.device}, {args.dtype}, "
        f"best of {args.repeats}; lite-chunk = {args.chunk} latent frame(s) per chunk; "
        "ratios are Standard / variant (>1: variant better)"
    )
    header = f"{'decoder':10s} {'params':>8s} {'dec s':>8s} {'peak MiB':>9s} {'time ×':>7s} {'memory ×':>9s}"
    print(header)
    print("-" * len(header))
    standard = rows.get("standard")
    for variant, (seconds, peak, params, _) in rows.items():
        ratios = (
            f"{standard[0] / seconds:7.2f} {standard[1] / max(peak, 1):9.2f}"
            if standard
            else "   (no standard)"
        )
        print(f"{variant:10s} {params / 1e6:7.1f}M {seconds:8.2f} {peak / 2**20:9.0f} {ratios}")


if __name__ == "__main__":
    main()

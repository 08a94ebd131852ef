"""Latent upsampler (§2.4.1) against its two baselines on held-out clips, quality and time, measured in this run.

Each held-out clip (V_high, from shards through the training data path) is reduced to V_low (antialiased bicubic
↓2, as in training) and encoded to Z_low by the FSAE. Three routes make a high-resolution video from Z_low:

    upsampler         D(U(Z_low))                  the trained latent upsampler
    latent_trilinear  D(trilinear×2(Z_low))        latent interpolation (what a fresh upsampler computes)
    rgb_bicubic       bicubic×2(D(Z_low))          RGB interpolation of the low-resolution decode

Quality: PSNR (over all frames of all clips) and mean LPIPS against V_high. Time: the route from Z_low to pixels,
best of ``--repeats`` per clip, summed over clips; the upsampler's own forward is also shown. Ratios are against
latent_trilinear (PSNR difference in dB, LPIPS and time ratios).

    python benchmarks/upsampler.py --upsampler runs/tiny-upsampler --autoencoder runs/tiny-fsae-stage1/export/autoencoder \\
        --shards data/sample/val-000000.tar --size 256 --frames 5 --clips 4
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from datamodules.buckets import BucketConfig
from datamodules.video import VideoDataModule
from fsvideo.ae import FSAE
from fsvideo.losses import PerceptualLoss
from fsvideo.pretrained import load_network
from fsvideo.upsampler import LatentUpsampler, downsample_video, interpolate_latent, upsample_video


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upsampler", required=True, help="saved-model folder, run directory or checkpoint")
    parser.add_argument("--autoencoder", required=True, help="the FSAE the upsampler was trained against")
    parser.add_argument("--shards", required=True, help="held-out shards (path or brace pattern)")
    parser.add_argument("--size", type=int, default=256, help="V_high bucket size (multiple of 128)")
    parser.add_argument("--frames", type=int, default=5, help="frames per clip (1 + 4k)")
    parser.add_argument("--clips", type=int, default=4, help="held-out clips to evaluate")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per route and clip (best kept)")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="alex")
    parser.add_argument(
        "--lpips-backbone", default=None, help="local torchvision state dict (else random trunk)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.size % 128 or (args.frames - 1) % 4:
        parser.error("--size must be a multiple of 128 and --frames 1 + 4k")
    return args


def timed(
    call: Callable[..., torch.Tensor], inputs: tuple, repeats: int, device: str
) -> tuple[torch.Tensor, float]:
    """The output of ``call(*inputs)`` and its best time over ``repeats`` calls."""
    best, out = math.inf, None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


@torch.no_grad()
def main() -> None:
    args = parse_args()
    fsae = load_network(args.autoencoder, FSAE, device=args.device)
    upsampler = load_network(args.upsampler, LatentUpsampler, device=args.device)
    lpips = PerceptualLoss(net=args.lpips_net, backbone_path=args.lpips_backbone).to(args.device)
    data = VideoDataModule(
        train_shards=args.shards,
        val_shards=args.shards,
        batch_size=1,
        num_workers=0,
        num_frames=args.frames,
        buckets=BucketConfig(size=args.size, multiple=128),
        val_batches=args.clips,
    )
    injection = fsae.config.first_frame_injection

    def encode(video: torch.Tensor):
        if injection:
            return fsae.encode(video, return_first_frame_features=True)
        return fsae.encode(video), None

    def decode(latent: torch.Tensor, features) -> torch.Tensor:
        generator = torch.Generator(args.device).manual_seed(0)
        return fsae.decode(latent, first_frame_features=features, generator=generator).clamp(-1, 1)

    # each route maps (Z_low, V_low's first-frame features, V_high's) to a high-resolution video
    calls = {
        "upsampler": lambda z, low, high: decode(upsampler(z), high),
        "latent_trilinear": lambda z, low, high: decode(interpolate_latent(z), high),
        "rgb_bicubic": lambda z, low, high: upsample_video(decode(z, low)),
    }
    routes = tuple(calls)
    squared = dict.fromkeys(routes, 0.0)
    lpips_sum = dict.fromkeys(routes, 0.0)
    seconds = dict.fromkeys((*routes, "upsampler_only"), 0.0)
    pixels, clips = 0, 0
    for batch in data.val_dataloader():
        video = batch["video"].to(args.device)
        z_low, low_features = encode(downsample_video(video))
        high_features = encode(video[:, :, :1])[1] if injection else None
        inputs = (z_low, low_features, high_features)
        for route, call in calls.items():
            out, best = timed(call, inputs, args.repeats, args.device)
            seconds[route] += best
            squared[route] += float(
                ((out - video) / 2).square().sum()
            )  # in [0, 1] units, as PSNR's data range
            lpips_sum[route] += float(lpips(out, video))
        seconds["upsampler_only"] += timed(upsampler, (z_low,), args.repeats, args.device)[1]
        pixels += video.numel()
        clips += 1

    print(
        f"{clips} held-out clips 1×3×{args.frames}×~{args.size}² from {args.shards}, {args.device}, "
        f"best of {args.repeats} per clip; upsampler {args.upsampler} "
        f"({sum(p.numel() for p in upsampler.parameters()) / 1e6:.2f}M params), FSAE {args.autoencoder}, "
        f"LPIPS {args.lpips_net}{'' if args.lpips_backbone else ' (RANDOM trunk: relative only)'}"
    )
    header = f"{'route':18s} {'PSNR dB':>8s} {'Δ dB':>7s} {'LPIPS':>8s} {'LPIPS ×':>8s} {'time s':>8s} {'time ×':>7s}"
    print(header)
    print("-" * len(header))
    psnr = {r: 10 * math.log10(pixels / max(squared[r], 1e-12)) for r in routes}
    base = "latent_trilinear"
    for route in routes:
        mean_lpips = lpips_sum[route] / clips
        print(
            f"{route:18s} {psnr[route]:8.2f} {psnr[route] - psnr[base]:+7.2f} {mean_lpips:8.4f} "
            f"{mean_lpips / max(lpips_sum[base] / clips, 1e-12):8.2f} {seconds[route]:8.3f} "
            f"{seconds[route] / seconds[base]:7.2f}"
        )
    print(f"{'upsampler forward':18s} {'':8s} {'':7s} {'':8s} {'':8s} {seconds['upsampler_only']:8.3f}")


if __name__ == "__main__":
    main()

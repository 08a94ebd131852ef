"""Peak memory of one ReFL step (spec §2.3.2) with and without the 61-frame / 10-frame truncation, same clip.

One step is what ``lightning_modules.refl.ReFLModule`` does per batch: no-grad guided sampling to the gradient
step, one DiT evaluation with gradient, ẑ0 (eq. 12) decoded by the FSAE decoder in checkpointed temporal chunks,
the video reward (first frame + prompt) and the frame reward, the flow-matching loss of a real latent, backward.

    truncated   the paper's: the first 16 latent frames (61 frames) to the decoder and the video reward, the
                10 lowest frames to the frame reward with gradient
    full        every latent frame decoded and scored, every frame through the frame reward with gradient

The networks are the tiny presets with random weights (DiT, FSAE, and the tiny Qwen2-VL / CLIP reward backbones
of ``fsvideo rewards tiny-models``); only their widths are small, the clip is full length. Each variant runs in
its own spawned process; peak memory is measured by ``benchmarks/measure.py`` (GPU: peak allocated above the
allocation before the step; CPU: rise of the peak RSS above the resident size before the step, mmap threshold
pinned so freed tensors leave the RSS), weights and inputs excluded. The ratio is full / truncated.

    python benchmarks/refl.py --help
    python benchmarks/refl.py --frames 121 --size 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

import torch
from measure import PeakMemory, pin_mmap_threshold, run_spawned, timed  # benchmarks/ is the import root

VARIANTS = ("truncated", "full")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=121, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--size", type=int, default=128, help="height and width (multiple of 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--decoded-latent-frames", type=int, default=16, help="truncated: latent frames decoded"
    )
    parser.add_argument(
        "--frames-with-grad", type=int, default=10, help="truncated: frames through the frame reward"
    )
    parser.add_argument(
        "--chunk", type=int, default=4, help="latent frames per decoder chunk (both variants)"
    )
    parser.add_argument(
        "--sample-fps", type=float, default=2.0, help="video reward's frame sampling (VideoReward's 2)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.size % 64:
        parser.error("--frames must be 1 + 4k and --size a multiple of 64")
    return args


def tiny_networks(args: argparse.Namespace, models: dict[str, Path], sample_fps: float) -> tuple:
    """In the measuring process, seeded with 0: the tiny FSAE's config, the FSAE (frozen), the tiny DiT and the video
    reward on ``models["qwen2_vl"]`` (frozen, 56² frames sampled at ``sample_fps`` of a 24 fps clip of
    ``args.frames``), on ``args.device``. Shared with ``benchmarks/grpo.py``."""
    from fsvideo.ae import FSAE, FSAEConfig
    from fsvideo.dit import DiT, DiTConfig
    from fsvideo.rewards import VideoReward, VideoRewardConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    fsae_config = FSAEConfig.tiny()
    autoencoder = FSAE(fsae_config)
    autoencoder.init_weights()
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    dit = DiT(DiTConfig.tiny(latent_channels=fsae_config.latent_channels)).to(device)
    video_reward = VideoReward.from_backbone(
        VideoRewardConfig(
            backbone=str(models["qwen2_vl"]),
            input_fps=24.0,
            sample_fps=sample_fps,
            max_frames=args.frames,
            frame_height=56,
            frame_width=56,
        ),
        device,
    ).requires_grad_(False)
    return fsae_config, autoencoder, dit, video_reward


def random_clip(
    fsae_config, dit: torch.nn.Module, batch: int, frames: int, size: int, device: torch.device
) -> tuple:
    """A random clip latent ``z0`` of ``frames`` × ``size``², random text (tokens, mask) and image tokens, and the
    image-to-video condition on its first latent frame."""
    from fsvideo.dit import image_to_video

    z0 = torch.randn(batch, *fsae_config.latent_shape(frames, size, size), device=device)
    text = (torch.randn(batch, 16, 32, device=device), torch.ones(batch, 16, dtype=torch.bool, device=device))
    image = torch.randn(batch, 4, 32, device=device)
    condition = image_to_video(z0[:, :, :1], z0.shape[2], dit.config.mask_channels)
    return z0, text, image, condition


def measure(variant: str, args: argparse.Namespace, models: dict[str, Path], results: mp.Queue) -> None:
    """Runs in a fresh process: one ReFL step of ``variant``; reports time, peak memory and decoded frames."""
    from fsvideo.flow import interpolate, pseudo_huber_loss, velocity_target
    from fsvideo.refl import (
        ReFLConfig,
        decode_for_reward,
        predict_with_last_step_gradient,
        refl_objective,
        score_video,
    )
    from fsvideo.rewards import FrameReward, FrameRewardConfig

    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    fsae_config, autoencoder, dit, video_reward = tiny_networks(args, models, args.sample_fps)
    truncated = variant == "truncated"
    frame_reward = FrameReward.from_backbone(
        FrameRewardConfig(
            backbone=str(models["clip"]), frames_with_grad=args.frames_with_grad if truncated else args.frames
        ),
        device,
    ).requires_grad_(False)
    config = ReFLConfig(
        steps=8,
        gradient_steps=(6, 6),
        guidance_scale=3.0,
        decoded_latent_frames=args.decoded_latent_frames if truncated else 0,
        decoder_chunk_latent_frames=args.chunk,
    )
    b = args.batch
    prompts = ["a cat walks across the garden in morning light"] * b

    def step(frames: int, size: int) -> int:
        """One ReFL step on a random clip latent of ``frames`` × ``size``²; returns the frames decoded."""
        z0, text, image, condition = random_clip(fsae_config, dit, b, frames, size, device)
        negative = (torch.zeros(b, 16, 32, device=device), text[1])
        z0_hat = predict_with_last_step_gradient(
            dit, condition, text, negative, image, torch.randn_like(z0), config, 6
        )
        video = decode_for_reward(autoencoder, z0_hat, config)
        r_video, r_frame = score_video(video, prompts, video_reward, frame_reward)
        sigma = torch.full((b,), 0.5, device=device)
        noise = torch.randn_like(z0)
        pred = dit(condition.model_input(interpolate(z0, noise, sigma)), sigma, text[0], image, text[1])
        flow = pseudo_huber_loss(*condition.loss_pair(pred, velocity_target(z0, noise)))
        refl_objective(r_video, r_frame, flow, config).backward()
        dit.zero_grad(set_to_none=True)
        return video.shape[2]

    step(5, fsae_config.spatial_compression)  # warm-up: lazily loaded kernels and allocator pools stay out
    with PeakMemory(cuda) as peak:
        frames, seconds = timed(lambda: step(args.frames, args.size), cuda)
    results.put((seconds, peak.bytes, frames))


def main() -> None:
    args = parse_args()
    pin_mmap_threshold(args.device)
    from fsvideo.rewards import save_tiny_reward_models

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        models = save_tiny_reward_models(folder)
        for variant in args.variants:
            rows[variant] = run_spawned(variant, measure, variant, args, models)
            seconds, peak, frames = rows[variant]
            print(
                f"  {variant:10s}: {seconds:8.2f} s, peak +{peak / 2**20:8.0f} MiB, {frames} frames decoded"
            )

    print(
        f"\ntiny networks, clip {args.batch}×3×{args.frames}×{args.size}×{args.size}, {args.device}, float32; "
        f"truncated = {args.decoded_latent_frames} latent frames decoded, {args.frames_with_grad} frames through "
        f"the frame reward; decoder chunks of {args.chunk} latent frames (both); ratio = full / truncated"
    )
    header = f"{'variant':10s} {'frames':>7s} {'step s':>8s} {'peak MiB':>9s} {'memory ×':>9s}"
    print(header)
    print("-" * len(header))
    reference = rows.get("truncated")
    for variant, (seconds, peak, frames) in rows.items():
        ratio = f"{peak / max(reference[1], 1):9.2f}" if reference else "        -"
        print(f"{variant:10s} {frames:7d} {seconds:8.2f} {peak / 2**20:9.0f} {ratio}")


if __name__ == "__main__":
    main()

"""Peak memory and time of one GRPO step against one ReFL step of the same refiner network and clip (spec §2.4.3:
GRPO "does not need gradient back-propagation through the FSAE decoder, requiring much less GPU memory compared
with ReFL").

    grpo   what ``lightning_modules.grpo.RefinerGRPOModule`` does per step for this device's share of a group:
           rollout of ``--samples`` clips on the 8-step grid without gradient (SDE inside a window of
           ``--window`` steps), the first 16 latent frames decoded and scored by the video reward without
           gradient, group advantages, then the clipped objective of each window step backpropagated in turn
           (one DiT evaluation alive at a time)
    refl   ReFL on the same network (``fsvideo.refl``): the same clips sampled without gradient to a late step,
           one DiT evaluation with gradient, ẑ0's first 16 latent frames decoded with gradient (checkpointed
           chunks) and scored by the same video reward with gradient, backward

Both use the tiny presets with random weights (DiT, FSAE, the tiny Qwen2-VL video reward of ``fsvideo rewards
tiny-models``); only their widths are small, the clip is full length. Each mode runs in its own spawned process;
peak memory is measured by ``benchmarks/measure.py`` (GPU: peak allocated above the allocation before the step;
CPU: rise of the peak RSS above the resident size before the step), weights and inputs excluded. Ratio =
mode / grpo.

    python benchmarks/grpo.py --help
    python benchmarks/grpo.py --frames 61 --size 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

import torch
from measure import PeakMemory, pin_mmap_threshold, run_spawned, timed  # benchmarks/ is the import root
from refl import random_clip, tiny_networks  # the same networks and clip as benchmarks/refl.py

MODES = ("grpo", "refl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=121, help="pixel frames of the clip (1 + 4k)")
    parser.add_argument("--size", type=int, default=128, help="height and width (multiple of 64)")
    parser.add_argument("--samples", type=int, default=2, help="clips per step on this device (both modes)")
    parser.add_argument("--steps", type=int, default=8, help="the distilled refiner's steps")
    parser.add_argument("--window", type=int, default=4, help="GRPO: SDE steps trained per rollout")
    parser.add_argument("--decoded-latent-frames", type=int, default=16, help="latent frames decoded (both)")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per decoder chunk (both)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.size % 64:
        parser.error("--frames must be 1 + 4k and --size a multiple of 64")
    if args.window > args.steps - 1:
        parser.error("--window must be at most --steps − 1 (the last step is deterministic)")
    return args


def measure(mode: str, args: argparse.Namespace, models: dict[str, Path], results: mp.Queue) -> None:
    """Runs in a fresh process: one step of ``mode``; reports time and peak memory."""
    from fsvideo.flow import sigma_schedule
    from fsvideo.grpo import group_advantages, rollout, window_losses
    from fsvideo.refl import ReFLConfig, decode_for_reward, predict_with_last_step_gradient

    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    fsae_config, autoencoder, dit, video_reward = tiny_networks(args, models, sample_fps=2.0)
    config = ReFLConfig(
        steps=args.steps,
        gradient_steps=(args.steps - 2, args.steps - 2),
        guidance_scale=1.0,  # the distilled refiner samples without guidance
        decoded_latent_frames=args.decoded_latent_frames,
        decoder_chunk_latent_frames=args.chunk,
        flow_weight=0.0,
    )
    b = args.samples
    prompts = ["a cat walks across the garden in morning light"] * b

    def step(frames: int, size: int) -> None:
        z0, text, image, condition = random_clip(fsae_config, dit, b, frames, size, device)
        noise = torch.randn_like(z0)
        if mode == "refl":
            z0_hat = predict_with_last_step_gradient(
                dit, condition, text, text, image, noise, config, args.steps - 2
            )
            video = decode_for_reward(autoencoder, z0_hat, config)
            (-video_reward.score(video, video[:, :, 0].detach(), prompts).mean()).backward()
        else:

            def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                out = dit(condition.model_input(z), sigma, text[0], image, text[1])
                return condition.fix_velocity(out.float(), noise)

            free = ~condition.given.to(device).view(1, 1, -1, 1, 1)
            sigmas = sigma_schedule(args.steps, config.shift)
            path = rollout(velocity, noise, sigmas, range(0, args.window), 0.7, free=free)
            with torch.no_grad():
                video = decode_for_reward(autoencoder, condition.fix_sample(path.sample), config)
                rewards = video_reward.score(video, video[:, :, 0], prompts)
            advantages = group_advantages(rewards.view(1, b)).advantages.flatten()
            for loss in window_losses(velocity, path, advantages, 0.7, 1e-4, free):
                (loss.loss / args.window).backward()
        dit.zero_grad(set_to_none=True)

    step(5, fsae_config.spatial_compression)  # warm-up: lazily loaded kernels and allocator pools stay out
    with PeakMemory(cuda) as peak:
        _, seconds = timed(lambda: step(args.frames, args.size), cuda)
    results.put((seconds, peak.bytes))


def main() -> None:
    args = parse_args()
    pin_mmap_threshold(args.device)
    from fsvideo.rewards import save_tiny_reward_models

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        models = save_tiny_reward_models(folder)
        for mode in args.modes:
            rows[mode] = run_spawned(mode, measure, mode, args, models)
            print(f"  {mode:5s}: {rows[mode][0]:8.2f} s, peak +{rows[mode][1] / 2**20:8.0f} MiB")

    print(
        f"\ntiny networks, {args.samples} clips 3×{args.frames}×{args.size}×{args.size}, {args.device}, float32; "
        f"{args.steps}-step grid, GRPO window {args.window}; {args.decoded_latent_frames} latent frames decoded in "
        f"chunks of {args.chunk} (both); ratio = mode / grpo"
    )
    header = f"{'mode':6s} {'step s':>8s} {'peak MiB':>9s} {'memory ×':>9s} {'time ×':>7s}"
    print(header)
    print("-" * len(header))
    reference = rows.get("grpo")
    for mode, (seconds, peak) in rows.items():
        memory = f"{peak / max(reference[1], 1):9.2f}" if reference else "        -"
        speed = f"{seconds / reference[0]:7.2f}" if reference else "      -"
        print(f"{mode:6s} {seconds:8.2f} {peak / 2**20:9.0f} {memory} {speed}")


if __name__ == "__main__":
    main()

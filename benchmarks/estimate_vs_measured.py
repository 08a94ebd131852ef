"""``fsvideo estimate``'s DiT formulas against measured memory, on a small DiT on the CPU.

For a DiT of ``--dim`` × ``--layers`` (Layer Memory on) and ``--batch`` clips of ``--grid`` latent tokens, in
bf16 autocast as ``trainer.precision: bf16-mixed`` trains it, it prints per row the estimate
(``fsvideo.estimate``), the measurement and their ratio:

  gradients, AdamW state               float32: 4·P, 8·P bytes
  activations, training                one forward + backward, without and with activation checkpointing
                                       (``training_activation_bytes`` + autocast's bf16 weight copies, 2·P)
  activations, inference               one no-grad forward (``dit_inference_bytes``)

Measured on real tensors. Parameters, gradients and AdamW state: the bytes of the tensors themselves after one
optimizer step. Activations: ``torch.distributed._tools.mem_tracker.MemTracker`` attributes every tensor
storage allocated during the forward + backward (or the no-grad forward) to parameters, gradients,
activations or temporaries; the row is activations + temporaries at the moment of the largest total, i.e. the
part of the step's peak that is not parameters or gradients. That is what the CUDA caching allocator would
be asked for on a GPU (its rounding and fragmentation aside); the CPU attention kernel keeps the same
O(tokens) state as flash attention. With checkpointing the gradients fill up during the backward while the
activations empty, so the activations at the moment of the peak are less than their own peak, which the
estimate (an upper bound, added to whole gradients) counts.

    python benchmarks/estimate_vs_measured.py
    python benchmarks/estimate_vs_measured.py --dim 512 --layers 6 --grid 5 8 8 --batch 2
"""

from __future__ import annotations

import argparse

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from fsvideo.dit import DiT, DiTConfig
from fsvideo.estimate import dit_inference_bytes, training_activation_bytes
from fsvideo.parallel import apply_activation_checkpointing

TEXT_LEN, IMAGE_LEN = 16, 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256, help="DiT width")
    parser.add_argument("--layers", type=int, default=4, help="DiT blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--grid", type=int, nargs=3, default=(5, 8, 8), help="latent t h w")
    parser.add_argument("--batch", type=int, default=2, help="clips per step")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch")
    return parser.parse_args(argv)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(config: DiTConfig, args: argparse.Namespace, mode: str) -> dict[str, int]:
    """Bytes of one training step (``mode`` "train" / "checkpointed") or of one no-grad call ("inference"):
    ``activations`` (see the module docstring) and, after a training step, ``gradients`` and ``optimizer``."""
    torch.manual_seed(0)
    model = DiT(config)
    if mode == "inference":  # the pipeline casts its DiTs to bf16 (precision: bf16): autocast casts nothing
        model.to(torch.bfloat16)
    if mode == "checkpointed":
        apply_activation_checkpointing(model)
    inputs = (
        torch.randn(args.batch, config.in_channels, *args.grid),
        torch.rand(args.batch),
        torch.randn(args.batch, TEXT_LEN, config.text_dim),
        torch.randn(args.batch, IMAGE_LEN, config.image_dim),
    )
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.set_grad_enabled(mode != "inference"), torch.autocast("cpu", torch.bfloat16):
            out = model(*inputs)
        if mode != "inference":
            out.float().square().mean().backward()
    at_peak = {
        str(k).rsplit(".", 1)[-1]: v
        for s in tracker.get_tracker_snapshot("peak").values()
        for k, v in s.items()
    }
    measured = {"activations": at_peak["ACT"] + at_peak["TEMP"]}
    if mode != "inference":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        optimizer.step()
        measured["gradients"] = tensor_bytes(p.grad for p in model.parameters())
        measured["optimizer"] = tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    return measured


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DiTConfig.tiny(dim=args.dim, num_layers=args.layers, num_heads=args.heads, ffn_dim=2 * args.dim)
    tokens = args.grid[0] * args.grid[1] * args.grid[2]
    parameters = sum(p.numel() for p in DiT(config).parameters())
    sizes = (config, tokens, args.batch, TEXT_LEN, IMAGE_LEN)
    train, checkpointed, inference = (
        measure(config, args, m) for m in ("train", "checkpointed", "inference")
    )
    copies = 2 * parameters  # autocast's bf16 weight copies, kept for the step (``estimate_training``)
    rows = [
        ("gradients", 4 * parameters, train["gradients"]),
        ("AdamW state", 8 * parameters, train["optimizer"]),
        (
            "activations, training",
            training_activation_bytes(*sizes, checkpointing=False) + copies,
            train["activations"],
        ),
        (
            "activations, checkpointing",
            training_activation_bytes(*sizes, checkpointing=True) + copies,
            checkpointed["activations"],
        ),
        ("activations, inference", dit_inference_bytes(config, tokens, args.batch), inference["activations"]),
    ]
    print(
        f"DiT dim {config.dim}, {config.num_layers} layers, ffn {config.ffn_dim}, Layer Memory on, "
        f"{parameters / 1e6:.2f}M parameters; batch {args.batch} × {tokens} tokens, text {TEXT_LEN}, "
        f"image {IMAGE_LEN}; bf16 autocast on the CPU; measured with MemTracker"
    )
    print(f"{'':28s} {'estimate MiB':>13s} {'measured MiB':>13s} {'estimate/measured':>18s}")
    for name, estimate, measured in rows:
        print(f"{name:28s} {estimate / 2**20:13.2f} {measured / 2**20:13.2f} {estimate / measured:18.2f}")


if __name__ == "__main__":
    main()

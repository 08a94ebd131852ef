"""``fsvideo export``: a run's networks as saved-model folders (``fsvideo.pretrained``).

    fsvideo export runs/tiny-dit-pretrain-video --out models/     # → models/dit/ (EMA weights)
    fsvideo export runs/x/checkpoints/step-200.ckpt --out models/ --raw --name dit
    fsvideo export runs/x/checkpoints/last.ckpt --out models/   # a distributed checkpoint folder alike

A distributed checkpoint folder (``save_distributed_checkpoint: true``: every rank's shards, ``fsvideo.checkpoints``)
is read in this one process without a process group, tensor by tensor; its export equals that of a one-file
checkpoint of the same state.

Each network the run's checkpoint names is written to ``OUT/<name>/`` (``config.json`` + safetensors, sharded
above ``--max-shard-gb``), with its records (a DiT's latent statistics and latent space). Every place that
names a network — ``init_from``, pipeline configs, the latent cache's FSAE, teachers, reward models — reads
these folders as it reads runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fsvideo.pretrained import DEFAULT_MAX_SHARD_BYTES, read_snapshot, save_snapshot, snapshot_names


def export_run(
    path: str | Path,
    out: str | Path,
    raw: bool = False,
    names: list[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Path]:
    """Write the networks of a run directory or checkpoint as ``out/<name>/`` folders; returns them by name.

    Args:
        raw: the trained weights instead of their EMA twin (EMA is the default where the run keeps it).
        names: only these networks (default: every one the checkpoint names).
    """
    available = snapshot_names(path)
    unknown = sorted(set(names or []) - set(available))
    if unknown:
        raise ValueError(f"{path} holds no network {unknown}; it holds {available}.")
    written = {}
    for name in names or available:
        snapshot = read_snapshot(path, name=name, ema=not raw)
        written[name] = save_snapshot(snapshot, Path(out) / name, max_shard_bytes)
    return written


def export_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fsvideo export`` (``argv`` excludes ``export`` itself)."""
    parser = argparse.ArgumentParser(
        prog="fsvideo export",
        description="Write the networks of a training run as saved-model folders (config.json + safetensors).",
    )
    parser.add_argument(
        "run",
        help="run directory (uses checkpoints/last.ckpt) or a checkpoint: a file or a distributed checkpoint folder",
    )
    parser.add_argument("--out", required=True, help="folder to write OUT/<network name>/ into")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA twin")
    parser.add_argument("--name", action="append", help="export only this network (repeatable)")
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split weights into shards of this size"
    )
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        parser.error(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    written = export_run(args.run, args.out, args.raw, args.name, int(args.max_shard_gb * 1024**3))
    weights = "trained" if args.raw else "EMA (where kept)"
    for name, folder in written.items():
        print(f"{name}: {folder} ({weights} weights)")

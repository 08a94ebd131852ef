"""Two CPU processes over gloo, for the tests of sharded (FSDP2) networks: `fsvideo fit` runs with
ModelParallelStrategy, and worker functions with a device mesh of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

REPO = Path(__file__).resolve().parents[1]

SHARDED_FIT_ARGS = (
    "--trainer.devices=2",
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=false",
    "--model.init_args.parallel.fsdp=true",
)
"""`fsvideo fit` arguments that shard the DiT and its EMA twin with FSDP2 over two CPU processes."""


def run_cli(args: list[str], cwd: Path, import_paths: tuple[Path, ...] = ()) -> None:
    """``cli.py *args`` in a fresh process (one thread per process: two ranks share the CPU cores);
    ``import_paths`` are added to the repository on its ``PYTHONPATH`` (for callbacks the tests define)."""
    pythonpath = os.pathsep.join(str(path) for path in (REPO, *import_paths))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _join(rank: int, store: str, worker: Callable[[DeviceMesh], None]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        worker(init_device_mesh("cpu", (2,)))
    finally:
        dist.destroy_process_group()


def spawn_two(worker: Callable[[DeviceMesh], None], tmp_path: Path) -> None:
    """Run ``worker(mesh)`` in two processes joined by gloo (a 1-D CPU mesh over both); a failed assertion
    in either is raised here with its traceback. ``worker`` must be a module-level function."""
    mp.spawn(_join, args=(str(tmp_path / "gloo_store"), worker), nprocs=2)

"""Two CPU processes over gloo, for the tests of sharded (FSDP2) and context-parallel networks: `fsvideo fit`
runs with ModelParallelStrategy, and worker functions with a device mesh of their own."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import run_command
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_modules.cli import FSVideoCLI

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

SHARDED_FIT_ARGS = (
    "--trainer.devices=2",
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=false",
    "--model.init_args.parallel.fsdp=true",
)
"""`fsvideo fit` arguments that shard the DiT and its EMA twin with FSDP2 over two CPU processes."""


class ReseedAtTrainStart(L.Callback):
    """Seeds every generator again with the run's seed when training starts (``--trainer.callbacks+=
    two_process.ReseedAtTrainStart``): runs whose networks were initialised on different numbers of shards
    (random init of CPU DTensors draws per shard) then draw the same noise and σ."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(int(os.environ["PL_GLOBAL_SEED"]), verbose=False)


def run_cli(args: list[str], cwd: Path, in_process: bool = False) -> None:
    """``cli.py *args`` in a fresh process (one thread per process: two ranks share the CPU cores); the
    tests folder is importable, for callbacks such as ``ReseedAtTrainStart``. ``in_process``: in this test's own
    process instead, for the one-process reference runs, which would otherwise spend seconds starting up."""
    if in_process:
        with contextlib.chdir(cwd):
            FSVideoCLI(args=args)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    done = run_command([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _join(rank: int, store: str, worker: Callable[[DeviceMesh], None]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        worker(init_device_mesh("cpu", (2,)))
    finally:
        dist.destroy_process_group()


def spawn_two(worker: Callable[[DeviceMesh], None], tmp_path: Path, timeout: float = 600) -> None:
    """Run ``worker(mesh)`` in two processes joined by gloo (a 1-D CPU mesh over both); a failed assertion
    in either is raised here with its traceback, and both are killed when they run past ``timeout`` seconds
    (a rank waiting on a collective its peer never reaches would otherwise wait for gloo's 30 minutes).
    ``worker`` must be a module-level function."""
    processes = mp.start_processes(_join, args=(str(tmp_path / "gloo_store"), worker), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not processes.join(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{worker} on two processes ran past {timeout:.0f} s")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()

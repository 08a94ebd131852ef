"""benchmarks/table4.py and benchmarks/estimate_vs_measured.py run at tiny sizes on the CPU (issue 18), so the
GPU scripts stay correct: stage times, NFE and analytic TFLOP per NFE per DiT stage, the two-GPU row's reason
when it is skipped and the row itself on two gloo processes under torchrun; and the estimate-vs-measured table's
rows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from processes import run_command

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, launcher: tuple[str, ...] = ()) -> str:
    """``benchmarks/name *args`` in a fresh Python (``launcher``: the module arguments that start it, torchrun's)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = run_command(
        [sys.executable, *launcher, str(REPO / "benchmarks" / name), *args], env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # about 30 s on a 2-core CPU (the tiny FSAE decodes most of it)
def test_table4_runs_tiny_on_the_cpu():
    out = run_script(
        "table4.py",
        "--tiny",
        "--frames=5",
        "--base-steps=1",
        "--refine-steps=1",
        "--warmup=0",
        "--rows",
        "offload",
        "two-gpu",
    )
    assert "1 GPU, offloading" in out and "DiT latency (base + refine)" in out
    assert "dit: 2 NFE ×" in out and "refine: 1 NFE ×" in out and "TFLOP/NFE" in out
    assert "2 GPUs, FSDP + CP      skipped: needs" in out


@pytest.mark.slow  # about 25 s on a 2-core CPU
def test_table4_two_gpu_row_runs_on_two_cpu_processes():
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    out = run_script(
        "table4.py",
        "--tiny",
        "--frames=5",
        "--base-steps=1",
        "--refine-steps=1",
        "--warmup=0",
        "--rows",
        "two-gpu",
        launcher=torchrun,
    )
    assert "on CPU × 2 processes" in out
    assert out.count("2 CPU procs, FSDP + CP") == 1, "printed by the first process only"
    assert "DiT latency (base + refine)" in out
    assert "dit: 2 NFE ×" in out and "refine: 1 NFE ×" in out and "TFLOP/NFE" in out


def test_estimate_vs_measured_prints_every_row():
    out = run_script("estimate_vs_measured.py", "--dim=64", "--layers=2", "--grid", "2", "4", "4")
    for row in ("gradients", "AdamW state", "activations, training", "activations, checkpointing"):
        assert row in out
    assert "activations, inference" in out

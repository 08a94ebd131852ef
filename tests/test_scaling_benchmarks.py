"""benchmarks/table4.py and benchmarks/estimate_vs_measured.py run at tiny sizes on the CPU (issue 18), so the
GPU scripts stay correct: stage times, NFE and analytic TFLOP per NFE per DiT stage, the two-GPU row's reason
when it is skipped; and the estimate-vs-measured table's rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
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


def test_estimate_vs_measured_prints_every_row():
    out = run_script("estimate_vs_measured.py", "--dim=64", "--layers=2", "--grid", "2", "4", "4")
    for row in ("gradients", "AdamW state", "activations, training", "activations, checkpointing"):
        assert row in out
    assert "activations, inference" in out

"""Context parallel (Ulysses, fsvideo.parallel) over two gloo processes: a tiny DiT with Layer Memory split over
two cp ranks gives the one-process outputs, router maxima and (with FSDP over the dp×cp mesh, activation
checkpointing on) the one-process gradients, also at token counts cp does not divide; bad layouts get one-line
errors; the generation pipeline with its DiTs sharded and context-parallel gives the one-process video."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from processes import run_command
from run_dirs import write_test_image, write_tiny_runs, write_two_stage_config
from test_parallel import dit_inputs, output_and_grads, random_dit
from torch.distributed.device_mesh import DeviceMesh
from two_process import REPO, spawn_two

from fsvideo.dit import DiTConfig
from fsvideo.parallel import ParallelConfig, data_parallel_rank_and_size, device_mesh, parallelize
from fsvideo.pipeline import FSVideoPipeline
from lightning_modules.dit import DiTModule

# Float32 on the CPU: the split computation sums the same products in other orders (attention over all
# tokens is the same kernel call; the gather's backward adds two partial gradients), so results agree to
# rounding. Measured max abs differences are far below these bounds (README, "Scaling out").
OUTPUT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
GENERATION_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""Latents and video after a few sampler steps and the decoder: the DiTs' rounding differences, carried on."""


def _assert_split_matches_plain(split, reference, inputs, where: str = "") -> tuple:
    """The context-parallel ``split`` gives ``reference``'s output on ``inputs``, and the cp ranks' gradients sum to
    twice one process's (each rank backpropagates the whole loss); returns the one-process output and gradients."""
    out_split, grads_split = output_and_grads(split, inputs)
    out_plain, grads_plain = output_and_grads(reference, inputs)
    torch.testing.assert_close(out_split, out_plain, **OUTPUT_TOLERANCE)
    for name, grad in grads_plain.items():
        summed = grads_split[name].clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed / 2, grad, **GRAD_TOLERANCE, msg=f"{name}{where}")
    return out_plain, grads_plain


def _context_parallel_matches_one_process(_: DeviceMesh) -> None:
    config = DiTConfig.tiny()  # Layer Memory on, 4 heads, 3×4×4 = 48 tokens
    reference = random_dit(config)
    with torch.no_grad():
        for router in reference.routers:
            router.gate.fill_(0.7)  # an open gate: the routed mixture reaches the attention
    inputs = dit_inputs(config)
    mesh = device_mesh("cpu", 2, context_parallel=2)

    # 1. context parallel alone: outputs and router maxima equal; the cp ranks' gradients sum to twice one
    # process's (each rank backpropagates the whole loss), which FSDP's mean over the mesh halves (3.)
    split = copy.deepcopy(reference)
    parallelize([split], [], ParallelConfig(context_parallel=2), mesh)
    out_plain, grads_plain = _assert_split_matches_plain(split, reference, inputs)

    # 2. router maxima (the Figure 6 heatmap): the max over all tokens, on every rank
    with torch.no_grad():
        _, maxima_split = split(*inputs, return_router_weights=True)
        _, maxima_plain = reference(*inputs, return_router_weights=True)
    for got, expected in zip(maxima_split, maxima_plain, strict=True):
        torch.testing.assert_close(got, expected, **OUTPUT_TOLERANCE)

    # 3. as training runs it: FSDP over the flattened dp×cp mesh and activation checkpointing; names unchanged
    trained = copy.deepcopy(reference)
    parallelize(
        [trained], [], ParallelConfig(fsdp=True, activation_checkpointing=True, context_parallel=2), mesh
    )
    assert [n for n, _ in trained.named_parameters()] == [n for n, _ in reference.named_parameters()]
    out_trained, grads_trained = output_and_grads(trained, inputs)
    torch.testing.assert_close(out_trained, out_plain, **OUTPUT_TOLERANCE)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_trained[name], grad, **GRAD_TOLERANCE, msg=name)

    # 4. a frozen, sharded network (a teacher, generation) under no_grad
    frozen = copy.deepcopy(reference)
    parallelize([], [frozen], ParallelConfig(fsdp=True, context_parallel=2), mesh)
    with torch.no_grad():
        torch.testing.assert_close(frozen(*inputs), out_plain, **OUTPUT_TOLERANCE)

    # 5. token counts cp does not divide: uneven runs (3 tokens: 2 + 1), and a rank with none (1 token)
    for frames, width in [(1, 3), (1, 1)]:
        odd = (torch.randn(2, config.in_channels, frames, 1, width), *inputs[1:])
        _assert_split_matches_plain(split, reference, odd, f" at {frames}×1×{width}")
        with torch.no_grad():
            maxima_split = split(*odd, return_router_weights=True)[1]
            maxima_plain = reference(*odd, return_router_weights=True)[1]
        torch.testing.assert_close(maxima_split, maxima_plain, **OUTPUT_TOLERANCE)

    # 6. heads Ulysses cannot split
    three_heads = random_dit(DiTConfig.tiny(num_heads=3, dim=36, layer_memory=False))
    with pytest.raises(ValueError, match="must divide the attention heads"):
        parallelize([], [three_heads], ParallelConfig(context_parallel=2), mesh)


@pytest.mark.slow
def test_context_parallel_matches_one_process_over_two_processes(tmp_path):
    spawn_two(_context_parallel_matches_one_process, tmp_path)


def test_context_parallel_config_errors():
    with pytest.raises(ValueError, match="positive"):
        ParallelConfig(context_parallel=0)
    with pytest.raises(ValueError, match="needs a"):
        parallelize([random_dit(DiTConfig.tiny())], [], ParallelConfig(context_parallel=2), None)
    with pytest.raises(ValueError, match="must divide the number of processes"):
        device_mesh("cpu", 3, context_parallel=2)
    stage = DiTModule(DiTConfig.tiny(), parallel=ParallelConfig(fsdp=True, context_parallel=2))
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        stage.configure_model()  # no device mesh: not under ModelParallelStrategy
    # a cp group is consecutive ranks, which share their data-parallel coordinate
    assert [data_parallel_rank_and_size(rank, 8, 2) for rank in (0, 1, 2, 7)] == [
        (0, 4),
        (0, 4),
        (1, 4),
        (3, 4),
    ]


def _generation_matches_one_process(config: Path, image: Path, _: DeviceMesh) -> None:
    """The two-stage chain (base DiT, upsampler, refiner): each process generates once alone, then both
    together with the DiTs sharded and context-parallel."""
    alone = FSVideoPipeline.from_config(config).generate(image, "a cat walks", steps=2)
    pipe = FSVideoPipeline.from_config(config)
    pipe.parallelize(device_mesh("cpu", 2, context_parallel=2))
    together = pipe.generate(image, "a cat walks", steps=2)
    torch.testing.assert_close(together.latent, alone.latent, **GENERATION_TOLERANCE)
    torch.testing.assert_close(together.video, alone.video, **GENERATION_TOLERANCE)


@pytest.mark.slow
def test_generation_on_two_processes_matches_one(tmp_path):
    config = write_two_stage_config(tmp_path)
    image = write_test_image(tmp_path / "image.png")
    spawn_two(functools.partial(_generation_matches_one_process, config, image), tmp_path)


@pytest.mark.slow
def test_generate_command_under_torchrun_writes_from_the_first_process(tmp_path):
    config = write_tiny_runs(tmp_path)
    image = write_test_image(tmp_path / "image.png")
    out = tmp_path / "two.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(REPO / "cli.py"),
        "generate",
    ]
    args = [
        "--image",
        str(image),
        "--prompt",
        "a cat",
        "--out",
        str(out),
        "--config",
        str(config),
        "--steps",
        "2",
    ]
    done = run_command([*command, *args], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.count("wrote ") == 1
        and "2 processes: DiTs FSDP-sharded, context parallel 2" in done.stdout
    )
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["processes"] == 2 and record["nfe"] == 4

"""fsvideo.estimate (issue 18): the analytic DiT FLOP count equals torch's FlopCounterMode on tiny DiTs; the
training estimate of a paper preset shards parameters, gradients, AdamW and EMA over the GPUs and keeps less
with activation checkpointing; context parallel splits the training activations (`--context-parallel`) and, on
N GPUs, a generation's DiT weights and activations; `fsvideo estimate` prints JSON and refuses a config it cannot
size in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from run_dirs import write_two_stage_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cli import main
from fsvideo.dit import DiT, DiTConfig
from fsvideo.estimate import (
    GIB,
    block_activation_bytes,
    device_peak_tflops,
    dit_forward_flops,
    dit_inference_bytes,
    estimate_pipeline,
    estimate_training,
    meta_parameters,
)
from fsvideo.pretrained import load_network

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layer_memory", [True, False])
@pytest.mark.parametrize("image_dim", [32, None])
def test_dit_flops_match_torch_flop_counter(layer_memory, image_dim):
    config = DiTConfig.tiny(layer_memory=layer_memory, image_dim=image_dim, patch_size=(1, 2, 2))
    model = DiT(config)
    latent = torch.randn(2, config.in_channels, 3, 4, 6)
    text = torch.randn(2, 7, config.text_dim)
    image = torch.randn(2, 5, image_dim) if image_dim else None
    # the math backend runs attention as matmuls, which the counter sees (the CPU flash kernel it does not)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(latent, torch.rand(2), text, image)
    expected = dit_forward_flops(config, (3, 4, 6), text_len=7, image_len=5, batch=2)
    assert counter.get_total_flops() == expected


def test_training_estimate_of_the_paper_preset_shards_states():
    config = REPO / "configs/dit/pretrain-video512.yaml"
    one, eight = estimate_training(config, 1), estimate_training(config, 8)
    parameters = meta_parameters(_paper_dit())
    rows = {r.name: r.bytes for r in eight.rows}
    assert rows["parameters"] == 4 * parameters // 8
    assert rows["AdamW state"] == 8 * parameters // 8
    assert rows["EMA twin"] == rows["gradients"] == rows["parameters"]
    assert {r.name: r.bytes for r in one.rows}["parameters"] == 4 * parameters
    # 121 frames at 512²: 31 × 8 × 8 latent tokens, batch 2
    tokens = 31 * 8 * 8
    block = block_activation_bytes(DiTConfig(), tokens, 2, 512, 257)
    assert rows["activations, no checkpointing"] == 40 * block
    for estimate in (one, eight):
        assert (
            estimate.totals["with activation checkpointing"]
            < estimate.totals["without activation checkpointing"]
        )
    assert (
        eight.totals["with activation checkpointing"] < 80 * GIB < one.totals["with activation checkpointing"]
    )


def _paper_dit() -> DiT:
    with torch.device("meta"):
        return DiT(DiTConfig.paper())


def test_estimate_command_prints_json_and_refuses_other_configs(capsys):
    main(
        [
            "estimate",
            "--config",
            str(REPO / "configs/dit/pretrain-video512.yaml"),
            "--gpus",
            "2",
            "64",
            "--json",
        ]
    )
    estimates = json.loads(capsys.readouterr().out)
    assert [e["gpus"] for e in estimates] == [2, 64]
    assert (
        estimates[0]["kind"] == "training" and "with activation checkpointing" in estimates[0]["totals_gib"]
    )
    with pytest.raises(SystemExit):
        main(["estimate", "--config", str(REPO / "configs/fsae/stage1.yaml")])
    assert "fsvideo estimate sizes DiT-family training stages" in capsys.readouterr().err


def test_device_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_pipeline_estimate_reads_the_saved_networks(tmp_path):
    config = write_two_stage_config(tmp_path)
    estimate = estimate_pipeline(config, frames=5, height=128, width=128)
    rows = {r.name: r for r in estimate.rows}
    dit = load_network(yaml.safe_load(config.read_text())["dit"], DiT)
    assert rows["base DiT: DiT weights"].bytes == 2 * meta_parameters(dit)  # bf16 on the GPU
    assert "from" in rows["base DiT: DiT weights"].note, "the saved DiT's architecture, not the paper preset"
    # base at 64², refiner at 128²: latent 2×1×1 and 2×2×2 tokens, the refiner with its guidance batch of 2
    assert rows["base DiT: DiT activations"].bytes == dit_inference_bytes(dit.config, 2, 2)
    assert rows["refine: refiner activations"].bytes == dit_inference_bytes(dit.config, 8, 2)
    assert rows["decode: decode activations"].bytes > 0 and rows["upsample: upsampler activations"].bytes > 0
    totals = estimate.totals
    assert totals["offload (one stage's networks at a time)"] < totals["everything on the GPU"]


def test_context_parallel_splits_the_tokens_of_training_and_generation(tmp_path):
    config = REPO / "configs/dit/pretrain-video512.yaml"
    one, four = estimate_training(config, 8), estimate_training(config, 8, context_parallel=4)
    tokens = 31 * 8 * 8  # 121 frames at 512²
    block = block_activation_bytes(DiTConfig(), tokens // 4, 2, 512, 257)
    assert {r.name: r.bytes for r in four.rows}["activations, no checkpointing"] == 40 * block
    assert four.settings["context parallel"] == f"4 → {tokens // 4} tokens per GPU"
    assert four.totals["without activation checkpointing"] < one.totals["without activation checkpointing"]
    with pytest.raises(ValueError, match="must divide the DiT's 40 attention heads"):
        estimate_training(config, 8, context_parallel=3)

    pipeline = write_two_stage_config(tmp_path)
    alone, two = (estimate_pipeline(pipeline, 5, 128, 128, gpus=n) for n in (1, 2))
    rows_alone, rows_two = ({r.name: r.bytes for r in e.rows} for e in (alone, two))
    assert rows_two["base DiT: DiT weights"] == rows_alone["base DiT: DiT weights"] // 2  # FSDP over 2
    dit = load_network(yaml.safe_load(pipeline.read_text())["dit"], DiT)
    assert rows_two["refine: refiner activations"] == dit_inference_bytes(dit.config, 4, 2)  # 8 tokens / cp 2
    assert rows_two["decode: decode activations"] == rows_alone["decode: decode activations"]  # whole each
    assert list(two.totals) == ["everything on the GPU"]  # parallelize refuses offloading

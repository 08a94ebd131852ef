"""The README's main command end to end, with even smaller settings: FSAE stage 1 -> latent cache -> DiT
pretraining -> generate -> latent upsampler -> refiner -> two-stage generate and contact sheet -> distillation ->
reward finetuning -> ReFL -> GRPO of the distilled refiner, each a real `fsvideo` command, in a scratch folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import av
import pytest
from processes import run_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow(minutes=5)
@pytest.mark.timeout(1800)
def test_demo_runs_the_whole_recipe(sample_shards, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "DEMO_AE_STEPS": "12",
        "DEMO_DIT_STEPS": "20",
        "DEMO_UPSAMPLER_STEPS": "4",
        "DEMO_REFINER_STEPS": "4",
        "DEMO_DISTILL_STEPS": "2",
        "DEMO_REWARD_STEPS": "2",
        "DEMO_REFL_STEPS": "2",
        "DEMO_GRPO_STEPS": "2",
        "FSVIDEO": str(bin_dir / "fsvideo"),
        "PY": sys.executable,
        "WANDB_MODE": "offline",
    }
    done = run_command(
        ["bash", str(REPO / "demo.sh"), str(sample_shards.root)], cwd=tmp_path, env=env, timeout=1500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FSAE held-out PSNR" in done.stdout and "DiT training loss" in done.stdout
    video = tmp_path / "runs/demo/generated.mp4"
    with av.open(str(video)) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert len(frames) == 17 and (frames[0].height, frames[0].width) == (128, 128)
    assert (tmp_path / "runs/demo/generated.json").is_file()
    assert (tmp_path / "runs/tiny-dit-pretrain-video/checkpoints/last.ckpt").is_file()
    with av.open(str(tmp_path / "runs/demo/generated-2x.mp4")) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert len(frames) == 17 and (frames[0].height, frames[0].width) == (256, 256)
    stages = [
        stage["name"]
        for stage in json.loads((tmp_path / "runs/demo/generated-2x.json").read_text())["stages"]
    ]
    assert stages == ["encode", "dit", "upsample", "refine", "decode"]
    assert (tmp_path / "runs/demo/contact-sheet.png").is_file() and "contact-sheet.png" in done.stdout
    assert (tmp_path / "runs/tiny-dit-refl/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "runs/tiny-refiner-grpo/export/refiner/config.json").is_file()
    distilled = json.loads((tmp_path / "runs/demo/generated-2x-distilled.json").read_text())
    assert distilled["stages"][3]["nfe"] == 8

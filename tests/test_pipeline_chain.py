"""The two-stage chain of Figure 2: base DiT at half the size → latent upsampler → refiner → decoder."""

from __future__ import annotations

import json

import pytest
import torch
from run_dirs import FRAMES, write_test_image, write_two_stage_config

from cli import main
from fsvideo.pipeline import FSVideoPipeline, PipelineConfig, fit_image, load_image


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chain")
    config = write_two_stage_config(directory)
    return config, FSVideoPipeline.from_config(config), write_test_image(directory / "image.png")


def test_two_stage_generation_runs_every_stage_at_its_size(chain):
    _, pipe, image = chain
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape)

        return hook

    hooks = [
        network.register_forward_pre_hook(record(name))
        for name, network in (
            ("base", pipe.dit),
            ("refiner", pipe.chain.refiner),
            ("upsampler", pipe.chain.upsampler),
        )
    ]
    try:
        result = pipe.generate(image, "a cat")
    finally:
        for hook in hooks:
            hook.remove()
    assert result.video.shape == (3, FRAMES, 128, 128) and result.generated_size is None
    assert [stage["name"] for stage in result.stages] == ["encode", "dit", "upsample", "refine", "decode"]
    assert seen["base"][-2:] == (1, 1) and seen["refiner"][-2:] == (2, 2)  # 64² then 128² with the 64× FSAE
    assert seen["upsampler"][-2:] == (1, 1)
    base, refine = result.stages[1], result.stages[3]
    assert base["nfe"] == 3 * 2 and refine["nfe"] == 2 * 2 and refine["shift"] == base["shift"]
    assert 0 < refine["mask_confidence"] < 1
    # frame 0 of the final latent is the image encoded at the final size (given to the refiner)
    pixels = fit_image(load_image(image), 128, 128, "crop")
    expected = pipe.autoencoder.encode(pixels[None, :, None])[0, :, :1]
    torch.testing.assert_close(result.latent[:, :1], expected, rtol=1e-4, atol=1e-4)


def test_a_side_off_the_128_grid_is_generated_larger_and_centre_cropped(chain):
    _, pipe, image = chain
    result = pipe.generate(image, "a cat", height=192, width=128)
    assert result.generated_size == (256, 128)
    assert result.video.shape == (3, FRAMES, 192, 128)


def test_generate_command_records_both_stages(chain, tmp_path):
    config, _, image = chain
    out = tmp_path / "out.mp4"
    main(
        [
            "generate",
            "--config",
            str(config),
            "--image",
            str(image),
            "--prompt",
            "a cat",
            "--out",
            str(out),
            "--refine-steps",
            "1",
        ]
    )
    record = json.loads(out.with_suffix(".json").read_text())
    assert [stage["name"] for stage in record["stages"]] == ["encode", "dit", "upsample", "refine", "decode"]
    assert record["refine"]["steps"] == 1 and record["nfe"] == 3 * 2 + 1 * 2
    assert record["models"]["refiner"].endswith("refiner")


def test_upsampler_and_refiner_come_together(chain):
    config, _, _ = chain
    raw = PipelineConfig.from_yaml(config)
    with pytest.raises(ValueError, match="set both upsampler and refiner"):
        PipelineConfig(raw.autoencoder, raw.dit, raw.text_encoder, raw.image_encoder, upsampler=raw.upsampler)

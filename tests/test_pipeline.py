"""The image-to-video pipeline on tiny random networks loaded from hand-written run directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from run_dirs import FRAMES, HEIGHT, WIDTH, write_test_image, write_tiny_runs

from fsvideo.ae import FSAE, NUM_FIRST_FRAME_FEATURES
from fsvideo.pipeline import (
    FSVideoPipeline,
    GenerationSettings,
    PipelineConfig,
    fit_image,
    load_image,
    read_latent_stats,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FSVideoPipeline, Path]:
    """(pipeline config path, pipeline loaded from it, test image path)."""
    directory = tmp_path_factory.mktemp("pipeline")
    config = write_tiny_runs(directory)
    return config, FSVideoPipeline.from_config(config), write_test_image(directory / "image.png")


@pytest.fixture(scope="module")
def reference(tiny):
    """The video of the config's default settings (seed 0, euler, guidance 3) for "a cat"."""
    _, pipe, image = tiny
    return pipe.generate(image, "a cat")


def test_output_shape_range_and_first_frame(tiny, reference):
    _, pipe, image = tiny
    result = reference
    assert result.video.shape == (3, FRAMES, HEIGHT, WIDTH)
    assert result.video.dtype == torch.float32 and torch.isfinite(result.video).all()
    assert result.video.min() >= -1 and result.video.max() <= 1 and result.video.std() > 0.01
    frames = result.frames_uint8()
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert len(result.first_frame_features) == NUM_FIRST_FRAME_FEATURES
    assert all(f.shape[:3] == (1, f.shape[1], 1) for f in result.first_frame_features)
    assert set(result.timings) == {"encode", "dit", "decode"} and min(result.timings.values()) > 0
    assert result.shift == 2.0 and result.settings.seed == 0
    # frame 0 of the latent is the input image's latent: the DiT's normalisation was undone exactly
    pixels = fit_image(load_image(image), HEIGHT, WIDTH, "crop")
    expected = pipe.autoencoder.encode(pixels[None, :, None])[0, :, :1]
    assert result.latent.shape == (16, 1 + (FRAMES - 1) // 4, HEIGHT // 64, WIDTH // 64)
    torch.testing.assert_close(result.latent[:, :1], expected, rtol=1e-4, atol=1e-4)


def test_dit_sees_latents_normalised_with_the_checkpoint_statistics(tiny):
    config, pipe, image = tiny
    mean, std = read_latent_stats(PipelineConfig.from_yaml(config).dit)
    seen = []
    hook = pipe.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        result = pipe.generate(image, "a cat", steps=1, guidance_scale=1.0)
    finally:
        hook.remove()
    assert len(seen) == 1  # one step, guidance 1: the unconditional branch is skipped
    channels = result.latent.shape[0]
    condition = seen[0][0, channels + 4 :]  # after the noisy latent and the 4 mask channels
    normalised = (result.latent[:, :1] - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
    torch.testing.assert_close(condition[:, :1], normalised, rtol=1e-4, atol=1e-4)
    assert condition[:, 1:].abs().max() == 0
    mask = seen[0][0, channels : channels + 4]
    assert mask[:, 0].min() == 1 and mask[:, 1:].abs().max() == 0


def test_same_seed_same_video_other_seed_other_video(tiny, reference):
    _, pipe, image = tiny
    assert torch.equal(pipe.generate(image, "a cat", seed=0).video, reference.video)
    assert (pipe.generate(image, "a cat", seed=1).video - reference.video).abs().max() > 1e-3


def test_unipc_samples_too(tiny, reference):
    _, pipe, image = tiny
    unipc = pipe.generate(image, "a cat", sampler="unipc").video
    assert torch.isfinite(unipc).all() and unipc.shape == reference.video.shape
    assert (unipc - reference.video).abs().max() > 1e-4


def test_negative_prompt_matters_only_with_guidance(tiny, reference):
    _, pipe, image = tiny
    other = pipe.generate(image, "a cat", negative_prompt="the camera pans slowly").video
    assert (other - reference.video).abs().max() > 1e-4  # guidance 3: the unconditional branch counts
    unguided = [
        pipe.generate(image, "a cat", guidance_scale=1.0, steps=1, negative_prompt=negative).video
        for negative in ("", "the camera pans slowly")
    ]
    assert torch.equal(*unguided)


def test_offload_and_bf16_paths(tiny, reference):
    config, _, image = tiny
    reference = reference.video
    offloaded = FSVideoPipeline.from_config(
        dataclasses.replace(PipelineConfig.from_yaml(config), offload=True)
    )
    assert offloaded.offload and offloaded.device == torch.device("cpu")
    torch.testing.assert_close(offloaded.generate(image, "a cat").video, reference)
    assert all(p.device.type == "cpu" for network in offloaded._networks() for p in network.parameters())
    bf16 = FSVideoPipeline.from_config(
        dataclasses.replace(PipelineConfig.from_yaml(config), precision="bf16")
    )
    assert next(bf16.dit.parameters()).dtype == torch.bfloat16
    assert next(bf16.autoencoder.parameters()).dtype == torch.float32
    video = bf16.generate(image, "a cat").video
    assert torch.isfinite(video).all() and video.shape == reference.shape
    assert (video - reference).abs().mean() < 0.1  # the same video up to bf16 rounding


def test_temporally_split_decoding_matches(tiny, reference):
    config, _, image = tiny
    raw = yaml.safe_load(config.read_text())
    raw["tiling"] = {"chunk_latent_frames": 1}
    split = FSVideoPipeline.from_config(PipelineConfig(**raw))
    assert split.tiling.chunk_latent_frames == 1
    torch.testing.assert_close(split.generate(image, "a cat").video, reference.video, rtol=1e-4, atol=1e-4)


def test_image_modes(tmp_path, tiny):
    rgb = load_image(write_test_image(tmp_path / "rgb.png"))
    assert rgb.shape == (3, 96, 160) and rgb.min() >= -1 and rgb.max() <= 1
    gray = load_image(write_test_image(tmp_path / "gray.png", mode="L"))
    assert gray.shape == (3, 96, 160) and torch.equal(gray[0], gray[2])
    opaque = load_image(write_test_image(tmp_path / "rgba.png", mode="RGBA"))
    torch.testing.assert_close(opaque, rgb)
    with Image.open(tmp_path / "rgba.png") as image:
        rgba = np.asarray(image).copy()
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    with pytest.raises(ValueError, match="transparent"):
        load_image(tmp_path / "transparent.png")
    with pytest.raises(ValueError, match="C×H×W"):
        load_image(torch.zeros(2, 8, 8))
    assert load_image(torch.zeros(1, 8, 8)).shape == (3, 8, 8)


def test_fit_image_modes():
    image = torch.linspace(-1, 1, 200).repeat(3, 100, 1)  # 3×100×200, brightness grows with x
    cropped = fit_image(image, 64, 64, "crop")
    assert cropped.shape == (3, 64, 64)
    assert cropped[:, :, 0].mean() > -0.6 and cropped[:, :, -1].mean() < 0.6  # the sides were cut away
    stretched = fit_image(image, 64, 64, "resize")
    assert stretched[:, :, 0].mean() < -0.9 and stretched[:, :, -1].mean() > 0.9  # the whole width kept
    assert fit_image(image, 100, 200, "error") is image
    with pytest.raises(ValueError, match="resize_mode 'crop'"):
        fit_image(image, 64, 64, "error")


def test_input_errors(tmp_path, tiny):
    config, pipe, image = tiny
    with pytest.raises(FileNotFoundError, match="no such file"):
        pipe.generate(tmp_path / "missing.png", "a cat")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="could not be read as an image"):
        pipe.generate(tmp_path / "broken.png", "a cat")
    with pytest.raises(ValueError, match="multiple of 64"):
        pipe.generate(image, "a cat", height=100)
    with pytest.raises(ValueError, match=r"1 \+ 4·k"):
        pipe.generate(image, "a cat", num_frames=8)
    with pytest.raises(ValueError, match=r"1 \+ 4·k"):
        pipe.generate(image, "a cat", num_frames=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pipe.generate(image, "a cat", steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate(image, "a cat", sampler="ddim")
    with pytest.raises(ValueError, match="resize_mode"):
        pipe.generate(image, "a cat", resize_mode="error")
    with pytest.raises(ValueError, match="unknown generation setting"):
        pipe.generate(image, "a cat", frames=9)
    raw = yaml.safe_load(config.read_text())
    with pytest.raises(ValueError, match="set both upsampler and refiner"):
        PipelineConfig(**raw, upsampler="runs/upsampler")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**raw, "generation": {"step": 3}}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['step'\]"):
        PipelineConfig.from_yaml(tmp_path / "typo.yaml")


def test_dit_run_without_latent_statistics_is_refused(tmp_path):
    config = write_tiny_runs(tmp_path, latent_stats=False)
    with pytest.raises(ValueError, match="latent_mean / latent_std"):
        FSVideoPipeline.from_config(config)


PIPELINE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=[p.name for p in PIPELINE_CONFIGS])
def test_bundled_pipeline_configs_parse(path):
    config = PipelineConfig.from_yaml(path)
    assert (config.upsampler is None) == (config.refiner is None)
    assert (config.generation.num_frames - 1) % 4 == 0 and config.generation.height % 64 == 0


def test_settings_defaults_come_from_the_config(tiny):
    config, pipe, _ = tiny
    assert pipe.defaults == PipelineConfig.from_yaml(config).generation
    assert pipe.defaults.steps == 3 and GenerationSettings().steps == 30
    assert pipe.resolve_shift(dataclasses.replace(pipe.defaults, shift=None)) > 1.0


def test_standard_decoder_gets_the_first_frame_features_and_seeded_noise(tiny):
    _, pipe, image = tiny
    standard_config = pipe.autoencoder.config.with_decoder_variant("standard")
    standard = FSAE(standard_config)
    standard.init_weights()
    standard.encoder.load_state_dict(pipe.autoencoder.encoder.state_dict())
    for name, param in standard.named_parameters():
        if "to_out" in name:  # open the zero-initialised injection, so the features change the output
            torch.nn.init.normal_(param, std=0.5)
    swapped = FSVideoPipeline(
        standard,
        pipe.dit,
        pipe.text_encoder,
        pipe.image_encoder,
        pipe.latent_mean,
        pipe.latent_std,
        device="cpu",
        defaults=pipe.defaults,
    )
    first, again = swapped.generate(image, "a cat"), swapped.generate(image, "a cat")
    assert torch.equal(first.video, again.video), "the decoder's noise must follow the seed"
    other_seed = swapped.generate(image, "a cat", seed=1)
    assert not torch.equal(first.video, other_seed.video)

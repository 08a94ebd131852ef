"""Latent regularization in FSAE training (§2.2.2, Table 1): the Video VF loss and the scale baselines."""

from __future__ import annotations

import pytest
import torch

from fsvideo.ae import FSAEConfig
from lightning_modules.autoencoder import AutoencoderModule, LatentRegularizationConfig, PerceptualConfig

VIDEO = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def module(regularization: LatentRegularizationConfig) -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(
        autoencoder=FSAEConfig.tiny(), perceptual=PerceptualConfig(net="alex"), regularization=regularization
    )


def test_video_vf_loss_trains_the_projection_and_keeps_dino_out_of_checkpoints(tiny_encoders):
    model = module(LatentRegularizationConfig(method="video_vf", dino_path=str(tiny_encoders["dino"])))
    recon, target, latent = model.reconstruct_for_loss(VIDEO)
    parts = model.regularization_loss(latent, VIDEO)
    assert parts["reg"].item() == pytest.approx(0.5 * (parts["vf_mcos"] + parts["vf_mdms"]).item(), rel=1e-5)
    parts["reg"].backward()
    projection = model.vf_loss.proj.weight
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    assert any(p is projection for p in model.generator_parameters()), (
        "W must be trained with the autoencoder"
    )
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.autoencoder.encoder.parameters())
    assert not any("dino" in key for key in model.state_dict())


@pytest.mark.parametrize("method", ["downscale", "upscale"])
def test_scale_baselines_decode_a_resized_latent(method):
    model = module(LatentRegularizationConfig(method=method))
    _, _, latent = model.reconstruct_for_loss(VIDEO)
    parts = model.regularization_loss(latent, VIDEO)
    assert parts["reg"].item() == pytest.approx(0.5 * parts[method].item())
    parts["reg"].backward()
    assert any(p.grad is not None for p in model.autoencoder.encoder.parameters())


def test_video_vf_without_dino_path_is_a_clear_error():
    with pytest.raises(ValueError, match="dino_path"):
        LatentRegularizationConfig(method="video_vf")
    with pytest.raises(ValueError, match="one of"):
        LatentRegularizationConfig(method="vf")

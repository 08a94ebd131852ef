"""AutoencoderModule's stage logic: GAN schedule and step counting, stage-3 patch decoding, init_from."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fsvideo.ae import FSAEConfig
from fsvideo.discriminator import DiscriminatorConfig
from lightning_modules.autoencoder import AutoencoderModule, GANConfig, PatchDecodeConfig, PerceptualConfig
from lightning_modules.base import OptimizerConfig


def batches(num: int, frames: int = 5, size: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = [
        {
            "video": torch.rand(1, 3, frames, size, size, generator=generator) * 2 - 1,
            "is_image": torch.zeros(1),
        }
        for _ in range(num)
    ]
    return DataLoader(data, batch_size=None)


def tiny_module(**kwargs) -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(
        autoencoder=FSAEConfig.tiny(),
        optimizer=OptimizerConfig(lr=1e-3),
        perceptual=PerceptualConfig(net="alex"),
        ema_decay=0.9,
        **kwargs,
    )


def fit(module: AutoencoderModule, steps: int, tmp_path) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=batches(steps + 2))
    return trainer


def test_gan_starts_at_configured_step_and_only_generator_steps_count(tmp_path):
    gan = GANConfig(discriminator=DiscriminatorConfig.tiny(), start_step=2, r1_every=2)
    module = tiny_module(gan=gan)
    d_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer = fit(module, steps=2, tmp_path=tmp_path)
    assert trainer.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))

    module.gan_config.start_step = 0
    trainer = fit(module, steps=3, tmp_path=tmp_path)
    assert trainer.global_step == 3, "discriminator steps must not advance global_step"
    assert not all(torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))


def test_ema_follows_the_weights(tmp_path):
    module = tiny_module()
    fit(module, steps=2, tmp_path=tmp_path)
    ema, live = dict(module.autoencoder_ema.named_parameters()), dict(module.autoencoder.named_parameters())
    name = next(iter(live))
    assert not torch.equal(ema[name], live[name])
    assert not ema[name].requires_grad


def test_patch_decoding_used_only_at_high_resolution():
    module = tiny_module(patch_decode=PatchDecodeConfig(min_pixels=128 * 128, latent_patch_size=(2, 12, 12)))
    small = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    recon, target, _ = module.reconstruct_for_loss(small)
    assert recon.shape == target.shape == small.shape

    large = torch.rand(1, 3, 5, 128, 128) * 2 - 1
    recon, target, _ = module.reconstruct_for_loss(large)
    assert recon.shape == target.shape
    assert recon.shape[-1] < 128 and recon.shape[-2] < 128, "only a patch should be decoded"
    recon.float().mean().backward()


def test_patch_that_leaves_no_valid_pixels_is_a_clear_error():
    module = tiny_module(patch_decode=PatchDecodeConfig(min_pixels=1, latent_patch_size=(1, 1, 1)))
    with pytest.raises(ValueError, match="enlarge the patch"):
        module.reconstruct_for_loss(torch.zeros(1, 3, 5, 64, 64))


def test_init_from_loads_ema_weights(tmp_path):
    source = tiny_module()
    trainer = fit(source, steps=1, tmp_path=tmp_path)
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)
    module = tiny_module(init_from=str(path))
    for (name, loaded), expected in zip(
        module.autoencoder.state_dict().items(), source.autoencoder_ema.state_dict().values()
    ):
        assert torch.equal(loaded, expected), name


def test_init_from_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tiny_module(init_from=str(tmp_path / "missing.ckpt"))


def test_dcae_weights_start_the_autoencoder(tmp_path):
    from diffusers import AutoencoderDC

    from fsvideo.convert.dcae import import_dcae

    torch.manual_seed(0)
    widths = (8, 16, 32, 32, 64, 64)
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    widths = FSAEConfig.tiny().widths[:6]
    dcae = AutoencoderDC(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
    )
    dcae.save_pretrained(tmp_path / "dcae")
    module = tiny_module(dcae_weights=str(tmp_path / "dcae"))
    expected, _ = import_dcae(tmp_path / "dcae", config=FSAEConfig.tiny(), verbose=False)
    first_conv = next(k for k in expected.state_dict() if k.startswith("encoder.") and k.endswith("weight"))
    assert torch.equal(module.autoencoder.state_dict()[first_conv], expected.state_dict()[first_conv])

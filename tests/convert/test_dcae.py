import pytest
import torch
from diffusers import AutoencoderDC

from fsvideo.ae import FSAEConfig
from fsvideo.ae.blocks import run_blocks
from fsvideo.convert.dcae import import_dcae

STAGES = 6


@pytest.fixture(scope="module")
def dcae_folder(tmp_path_factory):
    """A tiny random AutoencoderDC in the dc-ae-f32c32-sana-1.0 layout, saved like a real checkpoint."""
    torch.manual_seed(0)
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    model = AutoencoderDC(
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=FSAEConfig.tiny().widths[:STAGES],
        decoder_block_out_channels=FSAEConfig.tiny().widths[:STAGES],
        encoder_layers_per_block=(1,) * STAGES,
        decoder_layers_per_block=(1,) * STAGES,
        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
    ).eval()
    with torch.no_grad():  # norms away from identity, so copying them is visible
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("dcae")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(dcae_folder):
    source = AutoencoderDC.from_pretrained(dcae_folder).eval()
    model, report = import_dcae(str(dcae_folder), FSAEConfig.tiny(), verbose=False)
    return source, model.eval(), report


def test_report_counts(imported):
    source, model, report = imported
    # per side: 3 ResBlocks (conv1.w/b, conv2.w, norm.w/b), 3 EfficientViT blocks (fused qkv,
    # multiscale depthwise + pointwise, proj, attn norm ×2, mlp inverted ×2, depthwise ×2, pointwise,
    # mlp norm ×2), 5 resamplings (w, b), plus encoder conv_in (w, b) / decoder norm_out + conv_out.
    assert len(report.inflated) == 2 * (3 * 2 + 3 * 2 + 5) + 1 + 1
    assert len(report.copied) == 2 * (3 * 3 + 3 * 11 + 5) + 1 + 3
    assert sorted(name for name, _ in report.skipped) == [
        "decoder.conv_in.bias",
        "decoder.conv_in.weight",
        "encoder.conv_out.bias",
        "encoder.conv_out.weight",
    ]
    used = len(report.inflated) + len(report.copied) + 2 * 6  # q, k, v → one fused tensor in 6 blocks
    assert used + len(report.skipped) == len(source.state_dict())
    assert len(report.new) == len(model.state_dict()) - len(report.inflated) - len(report.copied)
    new_parts = ("encoder.stages.6.", "decoder.stages.6.", "encoder.stages.5.down.", "decoder.stages.5.up.")
    new_parts += ("encoder.conv_out.", "decoder.conv_in.")
    assert all(name.startswith(new_parts) for name in report.new)
    assert "DC-AE import: 98 copied, 36 inflated" in report.summary()


def test_inflated_conv_reproduces_the_2d_conv_on_a_still_image(imported):
    source, model, _ = imported
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = source.encoder.conv_in(image)
        got = model.encoder.conv_in(image.unsqueeze(2))[:, :, 0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    kernel = model.encoder.conv_in.weight
    assert kernel.shape[2] == 3 and kernel[:, :, :2].abs().sum() == 0


def test_encoder_stages_reproduce_dcae_on_an_image(imported):
    source, model, _ = imported
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        h = source.encoder.conv_in(image)
        for stage in source.encoder.down_blocks:
            h = stage(h)
        _, features = model.encode(image.unsqueeze(2), return_first_frame_features=True)
    stage5 = features[model.feature_stages.index(STAGES - 1)][:, :, 0]
    torch.testing.assert_close(stage5, h, atol=1e-5, rtol=1e-5)


def test_decoder_stages_reproduce_dcae_on_an_image(imported):
    source, model, _ = imported
    h = torch.randn(2, 64, 2, 2)
    with torch.no_grad():
        expected = h
        for stage in reversed(source.decoder.up_blocks):
            expected = stage(expected)
        expected = source.decoder.norm_out(expected.movedim(1, -1)).movedim(-1, 1)
        expected = source.decoder.conv_out(source.decoder.conv_act(expected))
        # DC-AE's top stage has no upsampling; FSAE's stage 5 upsamples from the new stage 6
        got = run_blocks(model.decoder.stages[STAGES - 1].blocks, h.unsqueeze(2), None, False)
        got = model.decoder.head(model.decoder.run_stages(got, range(STAGES - 2, -1, -1)))[:, :, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rejects_a_state_dict_in_another_layout():
    with pytest.raises(ValueError, match="not a diffusers AutoencoderDC"):
        import_dcae({"main.encoder.project_in.conv.weight": torch.zeros(1)}, FSAEConfig.tiny())

"""Wan2.1 I2V → our DiT: the converted model reproduces a tiny random diffusers WanTransformer3DModel."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import WanTransformer3DModel

from fsvideo.convert.wan import convert_wan_state_dict, load_wan_i2v
from fsvideo.dit import DiTConfig

# diffusers -> original names, written from diffusers' scripts/convert_wan_to_diffusers.py (read backwards),
# independent of the tables in fsvideo.convert.wan.
_TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.image_embedder\.norm1", "img_emb.proj.0"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
    (r"condition_embedder\.image_embedder\.norm2", "img_emb.proj.4"),
    (r"^proj_out", "head.head"),
    (r"^scale_shift_table", "head.modulation"),
    (r"\.scale_shift_table", ".modulation"),
    (r"\.ffn\.net\.0\.proj", ".ffn.0"),
    (r"\.ffn\.net\.2", ".ffn.2"),
    (r"\.norm2\.", ".norm3."),
    (r"\.attn1\.to_out\.0", ".self_attn.o"),
    (r"\.attn2\.to_out\.0", ".cross_attn.o"),
    (r"\.attn1\.to_([qkv])", r".self_attn.\1"),
    (r"\.attn2\.to_([qkv])", r".cross_attn.\1"),
    (r"\.attn1\.norm_", ".self_attn.norm_"),
    (r"\.attn2\.add_k_proj", ".cross_attn.k_img"),
    (r"\.attn2\.add_v_proj", ".cross_attn.v_img"),
    (r"\.attn2\.norm_added_k", ".cross_attn.norm_k_img"),
    (r"\.attn2\.norm_", ".cross_attn.norm_"),
]

DIM, HEADS, LAYERS, TEXT_DIM, IMAGE_DIM = 24, 2, 3, 8, 12


def _to_original(state_dict):
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def wan_and_inputs():
    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        in_channels=36,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=IMAGE_DIM,
        added_kv_proj_dim=DIM,
    ).eval()
    with torch.no_grad():  # move every norm weight off 1 so a swapped norm cannot pass unnoticed
        for param in wan.parameters():
            param.add_(0.1 * torch.randn_like(param))
    latent = torch.randn(2, 36, 3, 4, 6)
    sigma = torch.tensor([0.3, 0.8])
    text = torch.randn(2, 512, TEXT_DIM)  # diffusers' Wan attention hard-codes 512 text tokens
    image = torch.randn(2, 5, IMAGE_DIM)
    with torch.no_grad():
        expected = wan(latent, sigma * 1000, text, image, return_dict=False)[0]
    return wan, (latent, sigma, text, image), expected


def _config(**overrides):
    sizes = dict(dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_dim=32, freq_dim=16, text_dim=TEXT_DIM)
    return DiTConfig.wan_i2v_14b(**{**sizes, "image_dim": IMAGE_DIM, **overrides})


@pytest.mark.parametrize("naming", ["diffusers", "original"])
def test_converted_plain_dit_matches_wan(wan_and_inputs, naming):
    wan, (latent, sigma, text, image), expected = wan_and_inputs
    state_dict = wan.state_dict()
    if naming == "original":
        state_dict = _to_original(state_dict)
        assert "blocks.0.cross_attn.k_img.weight" in state_dict and "head.head.weight" in state_dict
    model, report = load_wan_i2v(state_dict, _config(layer_memory=False))
    assert report.naming == naming and report.new == [] and len(report.mapped) == len(state_dict)
    with torch.no_grad():
        out = model.eval()(latent, sigma, text, image)
    assert out.shape == expected.shape == (2, 16, 3, 4, 6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_converted_layer_memory_dit_starts_as_wan(wan_and_inputs):
    wan, (latent, sigma, text, image), expected = wan_and_inputs
    model, report = load_wan_i2v(_to_original(wan.state_dict()), _config())
    print(report)
    assert sorted(report.new) == [
        f"blocks.{i}.router.{p}" for i in (1, 2) for p in ("gate", "proj.bias", "proj.weight")
    ]
    assert "new: blocks.1.router.gate" in str(report)
    assert all(router.gate == 0 for router in model.routers)
    with torch.no_grad():
        out = model.eval()(latent, sigma, text, image)
    # the gates at 0 make every block Wan's: the same output as the plain conversion
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_conversion_rejects_unknown_and_mismatched_weights(wan_and_inputs):
    wan = wan_and_inputs[0]
    state_dict = dict(wan.state_dict())
    state_dict["blocks.0.attn2.norm_added_q.weight"] = torch.ones(DIM)  # an old export's harmless extra
    _, report = convert_wan_state_dict(state_dict)
    assert report.ignored == ["blocks.0.attn2.norm_added_q.weight"]
    with pytest.raises(ValueError, match="no mapping"):
        convert_wan_state_dict({**state_dict, "blocks.0.audio_proj.weight": torch.ones(1)})
    without_v = {k: v for k, v in state_dict.items() if k != "blocks.1.attn2.add_v_proj.bias"}
    with pytest.raises(ValueError, match="blocks.1.cross_attn.to_kv_img.bias stacks .* only 'k'"):
        convert_wan_state_dict(without_v)
    with pytest.raises(ValueError, match="not a Wan2.1"):
        convert_wan_state_dict({"foo.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="does not describe"):
        load_wan_i2v(wan.state_dict(), _config(ffn_dim=48))

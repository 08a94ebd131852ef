"""Frozen encoders: tiny random models saved to disk and loaded back through the user's loaders."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, Dinov2Model

from fsvideo.dit import DiT, DiTConfig
from fsvideo.encoders import (
    FrameFeatureEncoder,
    ImageEncoder,
    TextEncoder,
    drop_conditions,
)


def test_text_encoder_pads_masks_and_truncates(tiny_encoders):
    encoder = TextEncoder.from_pretrained(tiny_encoders["text"], text_len=12)
    tokens, mask = encoder(
        ["a cat walks across the garden", "the camera pans slowly over a city at night now"]
    )
    assert tokens.shape == (2, 12, 32) and mask.shape == (2, 12) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 7 + [False] * 5  # 6 words + </s>
    assert mask[1].sum() == 11  # 10 words + </s>; the unseen word "now" is kept as <unk>
    assert torch.count_nonzero(tokens[0, 7:]) == 0 and tokens[0, :7].abs().sum() > 0
    assert not tokens.requires_grad and not any(p.requires_grad for p in encoder.parameters())
    truncated, mask_t = TextEncoder.from_pretrained(tiny_encoders["text"], text_len=4)(
        ["a cat walks across the garden"]
    )
    assert truncated.shape == (1, 4, 32) and mask_t.all()
    encoder.train()
    assert not encoder.model.training
    with pytest.raises(ValueError, match="list of strings"):
        encoder("a cat")


def test_image_encoder_returns_penultimate_states(tiny_encoders):
    encoder = ImageEncoder.from_pretrained(tiny_encoders["image"])
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 5, 32)  # (28/14)² patches + class token
    # the same numbers as the library model's own penultimate state on our preprocessing
    reference = CLIPVisionModel.from_pretrained(tiny_encoders["image"])
    pixels = torch.nn.functional.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    with torch.no_grad():
        expected = reference(pixel_values=(pixels * 0.5 + 0.5 - mean) / std, output_hidden_states=True)
    torch.testing.assert_close(tokens, expected.hidden_states[1])  # 2 layers: index 1 is penultimate
    with pytest.raises(ValueError, match="B×3×H×W"):
        encoder(images[:, :1])


def test_dino_frame_features(tiny_encoders):
    encoder = FrameFeatureEncoder.from_pretrained(tiny_encoders["dino"], frames_per_batch=2)
    video = torch.rand(2, 3, 5, 30, 45) * 2 - 1
    features = encoder(video)
    assert encoder.grid_size(30, 45) == (2, 3)
    assert features.shape == (2, 32, 5, 2, 3)
    # frame (b=1, t=3) alone gives the same features: batching over frames is only bookkeeping
    single = encoder(video[1:2, :, 3:4])
    torch.testing.assert_close(single[0, :, 0], features[1, :, 3], rtol=1e-5, atol=1e-5)
    assert isinstance(encoder.model, Dinov2Model) and not features.requires_grad


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        TextEncoder.from_pretrained(tmp_path / "umt5-xxl")


def test_tiny_encoders_feed_the_tiny_dit(tiny_encoders):
    tokens, mask = TextEncoder.from_pretrained(tiny_encoders["text"], text_len=8)(["a red bicycle"])
    image = ImageEncoder.from_pretrained(tiny_encoders["image"])(torch.zeros(1, 3, 28, 28))
    config = DiTConfig.tiny()
    out = DiT(config)(torch.randn(1, config.in_channels, 2, 2, 2), torch.tensor([0.5]), tokens, image, mask)
    assert out.shape == (1, 8, 2, 2, 2)


def test_cfg_dropout():
    text, mask = torch.randn(1000, 4, 3), torch.tensor([True, True, False, False]).expand(1000, 4)
    image = torch.randn(1000, 5, 2)
    empty = (torch.full((1, 4, 3), 7.0), torch.tensor([[True, False, False, False]]))
    out = drop_conditions(text, mask, image, 0.1, 0.3, empty, generator=torch.Generator().manual_seed(0))
    assert 0.07 < out.text_dropped.float().mean() < 0.13 and 0.26 < out.image_dropped.float().mean() < 0.34
    assert torch.all(out.text_tokens[out.text_dropped] == 7.0)
    torch.testing.assert_close(out.text_tokens[~out.text_dropped], text[~out.text_dropped])
    assert (
        out.text_mask[out.text_dropped].sum(1).eq(1).all()
        and out.text_mask[~out.text_dropped].sum(1).eq(2).all()
    )
    assert torch.count_nonzero(out.image_tokens[out.image_dropped]) == 0
    torch.testing.assert_close(out.image_tokens[~out.image_dropped], image[~out.image_dropped])

    zeros = drop_conditions(text[:4], mask[:4], image[:4], 1.0, 0.0)
    assert (
        torch.count_nonzero(zeros.text_tokens) == 0
        and zeros.text_mask.all()
        and not zeros.image_dropped.any()
    )
    with pytest.raises(ValueError, match="text_drop_prob"):
        drop_conditions(text, mask, image, 1.5, 0.0)
    with pytest.raises(ValueError, match="same TextEncoder"):
        drop_conditions(
            text, mask, image, 0.5, 0.0, (torch.zeros(1, 3, 3), torch.ones(1, 3, dtype=torch.bool))
        )

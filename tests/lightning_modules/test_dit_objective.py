"""The DiT objective without a Trainer: what the network is given (I2V condition for clips, none for stills),
which frames the loss covers, CFG dropout, normalisation, σ shift, and that training on it learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fsvideo.dit import DiTConfig
from fsvideo.flow import pseudo_huber_loss
from fsvideo.latent_space import LatentStats
from fsvideo.parallel import ParallelConfig
from lightning_modules.dit import DiTModule, FlowMatchingConfig

CHANNELS = 8
TEXT_LEN = 6


def make_batch(frames: int, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, :4] = True
    return {
        "latent": 3.0 + 2.0 * torch.randn(batch, CHANNELS, frames, 2, 2, generator=g),
        "text_tokens": torch.randn(batch, TEXT_LEN, 32, generator=g) * mask[..., None],
        "text_mask": mask,
        "image_tokens": torch.randn(batch, 5, 32, generator=g),
        "is_image": torch.full((batch,), frames == 1),
    }


def make_module(**kwargs) -> DiTModule:
    module = DiTModule(DiTConfig.tiny(), ema_decay=0, **kwargs)
    module.set_latent_stats(LatentStats([3.0] * CHANNELS, [2.0] * CHANNELS, 1))
    empty = torch.full((1, TEXT_LEN, 32), 0.5)
    module.set_empty_text(empty, torch.ones(1, TEXT_LEN, dtype=torch.bool))
    return module


class Recorder(nn.Module):
    """Stands in for the DiT: remembers its inputs and returns a fixed prediction."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.prediction = prediction
        self.inputs: dict[str, torch.Tensor] = {}

    def forward(self, latent_in, sigma, text, image, text_mask, return_router_weights=False):
        self.inputs = {
            "latent_in": latent_in,
            "sigma": sigma,
            "text": text,
            "image": image,
            "mask": text_mask,
        }
        return self.prediction


def test_clip_gets_first_frame_condition_and_loss_skips_frame_zero():
    module = make_module()
    batch = make_batch(frames=3)
    z0 = module.normalize(batch["latent"])
    noise, sigma = torch.randn_like(z0), torch.tensor([0.3, 0.8])
    prediction = torch.randn_like(z0)
    recorder = Recorder(prediction)
    loss, _ = module.flow_loss(recorder, z0, batch, sigma, noise, drop=False)

    latent_in = recorder.inputs["latent_in"]  # (B, C + 4 + C, t, h, w)
    z_sigma, mask, condition = latent_in.split([CHANNELS, 4, CHANNELS], dim=1)
    assert torch.allclose(z_sigma, (1 - sigma.view(-1, 1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1, 1) * noise)
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    assert torch.equal(condition[:, :, :1], z0[:, :, :1]) and not condition[:, :, 1:].any()
    assert torch.equal(recorder.inputs["image"], batch["image_tokens"])

    target = noise - z0
    assert torch.allclose(loss, pseudo_huber_loss(prediction[:, :, 1:], target[:, :, 1:]))
    recorder.prediction = prediction.clone()
    recorder.prediction[:, :, 0] += 100.0  # frame 0 is given: its prediction does not count
    assert torch.equal(module.flow_loss(recorder, z0, batch, sigma, noise, drop=False)[0], loss)
    recorder.prediction[:, :, 1] += 1.0
    assert module.flow_loss(recorder, z0, batch, sigma, noise, drop=False)[0] > loss


def test_still_is_text_to_image_and_every_element_counts():
    module = make_module()
    batch = make_batch(frames=1)
    z0 = module.normalize(batch["latent"])
    noise, sigma = torch.randn_like(z0), torch.tensor([0.5, 0.5])
    recorder = Recorder(torch.zeros_like(z0))
    loss, _ = module.flow_loss(recorder, z0, batch, sigma, noise, drop=False)
    assert not recorder.inputs["latent_in"][:, CHANNELS:].any(), "a still has no mask and no condition latent"
    assert not recorder.inputs["image"].any(), "a still's own image tokens would give it away"
    assert torch.allclose(loss, pseudo_huber_loss(torch.zeros_like(z0), noise - z0))


def test_normalisation_uses_the_latent_statistics():
    module = make_module()
    z0 = module.normalize(make_batch(frames=2)["latent"])
    assert abs(z0.mean().item()) < 0.3 and abs(z0.std().item() - 1.0) < 0.3
    with pytest.raises(ValueError, match="latent_channels"):
        module.set_latent_stats(LatentStats([0.0] * 4, [1.0] * 4, 1))


def test_cfg_dropout_substitutes_the_empty_prompt_and_zero_image():
    batch = make_batch(frames=3)
    text, mask, image = make_module(text_drop_prob=1.0, image_drop_prob=1.0).conditions(
        batch, True, drop=True
    )
    assert torch.equal(text, torch.full_like(text, 0.5)) and mask.all()
    assert not image.any()
    text, mask, image = make_module(text_drop_prob=0.0, image_drop_prob=0.0).conditions(
        batch, True, drop=True
    )
    assert torch.equal(text, batch["text_tokens"]) and torch.equal(image, batch["image_tokens"])


def test_resolution_shift_moves_sigma_up_for_long_latents():
    flow = FlowMatchingConfig(resolution_shift=True, shift_base_tokens=4, shift_max_tokens=64)
    assert math.isclose(flow.shift_for(4), math.exp(0.5))
    assert math.isclose(flow.shift_for(64), math.exp(1.15))
    module = make_module(flow=flow)
    torch.manual_seed(0)
    long = module.sample_sigma(torch.zeros(4096, CHANNELS, 16, 2, 2))  # 64 tokens
    torch.manual_seed(0)
    plain = make_module().sample_sigma(torch.zeros(4096, CHANNELS, 16, 2, 2))
    assert long.mean() > plain.mean() + 0.1
    assert ((long > 0) & (long < 1)).all()


def test_training_on_a_fixed_batch_lowers_the_loss():
    torch.manual_seed(0)
    module = make_module()
    batch = make_batch(frames=3, batch=4)
    z0 = module.normalize(batch["latent"])
    noise, sigma = torch.randn_like(z0), torch.rand(4)
    optimizer = torch.optim.AdamW(module.dit.parameters(), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(15):
        loss, _ = module.flow_loss(module.dit, z0, batch, sigma, noise, drop=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="text_drop_prob"):
        DiTModule(DiTConfig.tiny(), text_drop_prob=1.5)
    with pytest.raises(ValueError, match="val_sigmas"):
        DiTModule(DiTConfig.tiny(), val_sigmas=(0.0, 0.5))
    with pytest.raises(ValueError, match="sigma_std"):
        FlowMatchingConfig(sigma_std=0.0)


def test_activation_checkpointing_gives_the_same_gradients():
    """``parallel.activation_checkpointing`` reaches the DiT through ``configure_model`` without FSDP, and a
    second ``configure_model`` (Lightning calls it at every trainer entry point) changes nothing."""
    batch = make_batch(frames=3)
    grads, block_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = make_module(parallel=ParallelConfig(activation_checkpointing=checkpointing))
        module.configure_model()
        module.configure_model()
        calls = []
        module.dit.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        z0 = module.normalize(batch["latent"])
        g = torch.Generator().manual_seed(1)
        noise, sigma = torch.randn(z0.shape, generator=g), torch.tensor([0.2, 0.7])
        module.flow_loss(module.dit, z0, batch, sigma, noise, drop=False)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.dit.parameters() if p.grad is not None]))
        block_calls.append(len(calls))
    assert block_calls == [1, 2], "with checkpointing the backward pass runs each block again"
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

"""A step with a non-finite loss or gradient is skipped, counted, and too many in a row stop the run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fsvideo.ae import FSAEConfig
from lightning_modules.autoencoder import AutoencoderModule, PerceptualConfig
from lightning_modules.base import NonFiniteError


def module(**kwargs) -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(autoencoder=FSAEConfig.tiny(), perceptual=PerceptualConfig(net="alex"), **kwargs)


def loader(poison: set[int]) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = []
    for index in range(6):
        video = torch.rand(1, 3, 1, 64, 64, generator=generator) * 2 - 1
        if index in poison:
            video[..., 0, 0] = float("nan")
        data.append({"video": video})
    return DataLoader(data, batch_size=None)


def trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def snapshot(network: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in network.parameters()]


def test_nan_batch_is_skipped_without_touching_weights_or_ema(tmp_path):
    model = module()
    before, ema_before = snapshot(model.autoencoder), snapshot(model.autoencoder_ema)
    run = trainer(tmp_path, steps=-1)
    run.fit(model, train_dataloaders=DataLoader([loader(poison={0}).dataset[0]], batch_size=None))
    assert run.global_step == 0
    assert int(model.skipped_nonfinite) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.autoencoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.autoencoder_ema.parameters()))


def test_training_goes_on_after_a_skipped_step(tmp_path):
    model = module()
    run = trainer(tmp_path, steps=1)
    run.fit(model, train_dataloaders=loader(poison={0}))
    assert run.global_step == 1, "the poisoned batch does not count as a step; the next clean one does"
    assert int(model.skipped_nonfinite) == 1
    assert model.nonfinite_in_row == 0


def test_nan_gradient_is_skipped(tmp_path):
    model = module()
    parameter = next(model.autoencoder.parameters())
    handle = parameter.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = snapshot(model.autoencoder)
    try:
        trainer(tmp_path, steps=2).fit(
            model, train_dataloaders=DataLoader([loader(set()).dataset[0]], batch_size=None)
        )
    finally:
        handle.remove()
    assert int(model.skipped_nonfinite) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.autoencoder.parameters()))


def test_too_many_in_a_row_stop_with_a_clear_error(tmp_path):
    model = module(max_nonfinite_in_row=3)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps.*global step 0.*learning rate"):
        trainer(tmp_path, steps=5).fit(model, train_dataloaders=loader(poison={0, 1, 2, 3}))

"""Frozen networks: out of the module tree (checkpoints, optimizers, train mode), yet moved with the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.base import TrainingStage


class Stage(TrainingStage):
    def __init__(self) -> None:
        super().__init__(ema_decay=0)
        self.trained = nn.Linear(3, 3)
        self.frozen.add("teacher", nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))


def test_frozen_networks_stay_out_of_state_dict_optimizer_and_train_mode():
    stage = Stage()
    teacher = stage.frozen["teacher"]
    assert not any(key.startswith("teacher") or "frozen" in key for key in stage.state_dict())
    assert {id(p) for p in stage.parameters()} == {id(p) for p in stage.trained.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    stage.train()
    assert stage.trained.training and not teacher.training
    x = torch.ones(1, 3)
    assert torch.equal(teacher(x), teacher(x))  # dropout off: eval mode
    with pytest.raises(ValueError, match="already held"):
        stage.frozen.add("teacher", nn.Linear(1, 1))


def test_frozen_networks_move_and_cast_with_the_module():
    stage = Stage().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in stage.frozen["teacher"].parameters())
    stage.to("meta")
    assert all(p.is_meta for p in stage.frozen["teacher"].parameters())
    assert list(stage.frozen) == ["teacher"] and "teacher" in stage.frozen

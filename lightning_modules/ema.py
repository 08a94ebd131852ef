"""Exponential moving average of a network's weights, kept as a frozen twin module.

The twin is a registered submodule of the LightningModule, so it moves with ``.to()``, is saved in
every checkpoint and restored on resume without extra code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_twin(network: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``network`` to hold its moving average."""
    twin = copy.deepcopy(network).eval()
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def update_ema(ema: nn.Module, network: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·network`` for parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters() if p.is_floating_point()]
    net_params = [p.detach() for p in network.parameters() if p.is_floating_point()]
    torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), network.buffers()):
        ema_buffer.copy_(buffer)

"""Networks a stage uses but never trains: perceptual and feature networks, teachers, reward models, a frozen base
DiT feeding a refiner.

``FrozenNetworks`` holds them outside the module tree, so they are never in a checkpoint, an optimizer or a
``state_dict``, and ``LightningModule.train()`` cannot switch them out of eval mode; ``TrainingStage`` moves
(and casts) them with itself, so they are always on the module's device. Large ones are handed to the
parallelize layer with the trained networks (``networks()``), sharded forward-only or replicated by config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


class FrozenNetworks:
    """Named frozen networks: eval mode, ``requires_grad`` off, moved with the module that holds them."""

    def __init__(self) -> None:
        self._networks: dict[str, nn.Module] = {}
        self._replicated: set[str] = set()

    def add(self, name: str, network: nn.Module, replicate: bool = False) -> nn.Module:
        """Freeze ``network`` and hold it under ``name``; returns it. ``replicate``: kept whole on every rank and
        never handed to the parallelize layer (small networks without repeated ``blocks``: reward models, the
        FSAE)."""
        if name in self._networks:
            raise ValueError(f"a frozen network named {name!r} is already held.")
        if replicate:
            self._replicated.add(name)
        network.eval()
        for param in network.parameters():  # TorchScript modules have no requires_grad_()
            param.requires_grad_(False)
        self._networks[name] = network
        return network

    def __getitem__(self, name: str) -> nn.Module:
        return self._networks[name]

    def __contains__(self, name: str) -> bool:
        return name in self._networks

    def __iter__(self) -> Iterator[str]:
        return iter(self._networks)

    def networks(self) -> list[nn.Module]:
        return list(self._networks.values())

    def parallelizable(self) -> list[nn.Module]:
        """The networks the parallelize layer lays out (sharded or replicated by its config): all but the
        ``replicate`` ones."""
        return [network for name, network in self._networks.items() if name not in self._replicated]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a tensor conversion (``nn.Module._apply``: device moves, dtype casts) to every network."""
        for network in self._networks.values():
            network._apply(fn)

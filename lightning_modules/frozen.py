"""Networks a stage uses but never trains: perceptual and feature networks, teachers, reward models, a frozen base
DiT feeding a refiner.

``FrozenNetworks`` holds them outside the module tree, so they are never in a checkpoint, an optimizer or a
``state_dict``, and ``LightningModule.train()`` cannot switch them out of eval mode; ``TrainingStage`` moves
(and casts) them with itself, so they are always on the module's device. Large ones are handed to the
parallelize layer with the trained networks (``parallelizable()``), sharded forward-only or replicated by config;
one that is sharded is best held with ``add_saved(..., shard=True)``, so that no process ever holds all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fsvideo.pretrained import NetworkSnapshot, build_network, load_network, load_weights, read_snapshot


class FrozenNetworks:
    """Named frozen networks: eval mode, ``requires_grad`` off, moved with the module that holds them."""

    def __init__(self) -> None:
        self._networks: dict[str, nn.Module] = {}
        self._replicated: set[str] = set()
        self._unfilled: dict[str, NetworkSnapshot] = {}
        """Networks built on the meta device by ``add_saved(shard=True)``, with the snapshot that fills them."""

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

    def add_saved(
        self, name: str, path: str | os.PathLike, expected: type[nn.Module], shard: bool
    ) -> nn.Module:
        """Hold the network saved at ``path`` (a folder, run or checkpoint: ``load_network``'s sources) under
        ``name``; returns it. ``shard`` (the stage shards its networks with FSDP): built on the meta device and
        filled by ``materialise`` once the parallelize layer has sharded it, each rank reading only its own
        rows of every tensor — a 14B frozen base DiT or teacher is never whole in any process's memory.
        Otherwise loaded whole now."""
        if not shard:
            return self.add(name, load_network(path, expected))
        snapshot = read_snapshot(path, expected=expected)
        network = self.add(name, build_network(snapshot, expected, device="meta"))
        self._unfilled[name] = snapshot
        return network

    def materialise(self, device: torch.device) -> None:
        """Give the networks ``add_saved(shard=True)`` built on the meta device their storage on ``device``
        and their saved weights (after ``parallelize``: a sharded network reads its own rows only)."""
        for name, snapshot in list(self._unfilled.items()):
            network = self._networks[name]
            network.to_empty(device=device)
            load_weights(network, snapshot.weights, snapshot.source)
            del self._unfilled[name]

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
        """Apply a tensor conversion (``nn.Module._apply``: device moves, dtype casts) to every network but those
        still on the meta device (``materialise`` places them)."""
        for name, network in self._networks.items():
            if name not in self._unfilled:
                network._apply(fn)

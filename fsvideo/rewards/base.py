"""The reward-model interface, and the saved-model folder of a network whose backbone is a transformers model.

Every reward model is an ``nn.Module`` with one differentiable entry point (ReFL backpropagates through it)::

    score(video B×3×T×H×W in [-1, 1], first_frame B×3×H×W in [-1, 1], prompts: list of B strings) -> B rewards

Its saved-model folder keeps the backbone in transformers' own format, readable by transformers alone::

    config.json            {"class_name": "VideoReward", "config": {…, "backbone": "backbone"}, …}  (ours)
    model.safetensors      the weights outside the backbone (the reward head)
    backbone/              backbone.save_pretrained + its tokenizer / preprocessor files

``fsvideo.pretrained.load_network`` (and so ``VideoReward.from_pretrained``) reads such a folder through
``load_saved_folder``; a run directory or checkpoint holds every weight in the checkpoint and rebuilds the
backbone's architecture and tokenizer from the folder its config names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsvideo.pretrained import (
    DEFAULT_MAX_SHARD_BYTES,
    NetworkSnapshot,
    PretrainedNetwork,
    config_to_json,
    network_class_name,
    save_snapshot,
)

BACKBONE_FOLDER = "backbone"
"""Subfolder of a reward model's saved-model folder holding the transformers backbone."""
BACKBONE_PREFIX = "backbone."
"""State-dict prefix of the backbone's weights."""


def local_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a directory, or a one-line error saying what to pass (nothing is ever downloaded)."""
    folder = Path(path)
    if not str(path) or not folder.is_dir():
        raise ValueError(
            f"{what} {str(path)!r} is not a directory; point it at a local save_pretrained() folder "
            "(weights are never downloaded at run time)."
        )
    return folder


def check_video(video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]) -> None:
    """Refuse inputs that break the ``score`` contract with an error naming the shapes."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be B×3×T×H×W in [-1, 1], got shape {tuple(video.shape)}")
    if isinstance(prompts, str) or len(prompts) != video.shape[0]:
        raise ValueError(
            f"prompts must be a list of {video.shape[0]} strings (one per video), got {prompts!r}"
        )
    if first_frame is not None and (first_frame.ndim != 4 or first_frame.shape[:2] != video.shape[:2]):
        raise ValueError(
            f"first_frame must be B×3×H×W with B = {video.shape[0]}, got shape {tuple(first_frame.shape)}"
        )


def model_pixels(
    frames: torch.Tensor, height: int, width: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``N×3×h×w`` in [-1, 1] → ``N×3×height×width`` normalised with a processor's mean / std of [0, 1] images.

    Differentiable (antialiased bilinear resize, then an affine map), so a reward's gradient reaches the video.
    """
    if frames.shape[-2:] != (height, width):
        frames = F.interpolate(
            frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    mean_t = frames.new_tensor(mean)[None, :, None, None]
    std_t = frames.new_tensor(std)[None, :, None, None]
    return (frames * 0.5 + 0.5 - mean_t) / std_t


class RewardModel(PretrainedNetwork, nn.Module):
    """Base of the reward models: ``score`` and the backbone-in-a-subfolder saved-model folder.

    A subclass has a ``config`` dataclass with a ``backbone`` field (the local transformers folder), a
    ``backbone`` attribute (the transformers model) and ``save_backbone_files(folder)`` for its tokenizer /
    preprocessor files; ``cls(config)`` builds the architecture without reading weights, ``cls.from_backbone``
    reads the backbone's weights with transformers.
    """

    config: Any
    backbone: nn.Module

    def score(
        self, video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        """``video`` ``B×3×T×H×W`` and ``first_frame`` ``B×3×H×W`` in [-1, 1], ``prompts`` B strings → ``B``."""
        raise NotImplementedError

    def forward(
        self, video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        return self.score(video, first_frame, prompts)

    def to_empty(self, *, device: str | torch.device | None, recurse: bool = True) -> RewardModel:
        super().to_empty(device=device, recurse=recurse)
        # Non-persistent buffers (rotary frequencies, position ids) come from the config, never from saved weights:
        # materialised from the meta device (load_network) they are uninitialised memory until transformers'
        # own initialisation recomputes them (it also re-draws those modules' weights, which loading overwrites).
        with torch.no_grad():
            for module in self.backbone.modules():
                if module._non_persistent_buffers_set:
                    self.backbone._init_weights(module)
        return self

    @classmethod
    def from_backbone(cls, config: Any, device: str | torch.device = "cpu") -> RewardModel:
        """A reward model whose backbone weights transformers reads from ``config.backbone``; the other weights
        (the head) keep their initialisation."""
        raise NotImplementedError

    def save_backbone_files(self, folder: Path) -> None:
        """Write the tokenizer / preprocessor files the backbone is used with into ``folder``."""
        raise NotImplementedError

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        records: Mapping[str, Any] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Write ``folder``: the backbone with transformers' ``save_pretrained`` into ``backbone/``, the other
        weights and the config (its ``backbone`` made relative) in fsvideo's format, the config last."""
        folder = Path(folder)
        backbone_dir = folder / BACKBONE_FOLDER
        self.backbone.save_pretrained(backbone_dir, max_shard_size=max_shard_bytes)
        self.save_backbone_files(backbone_dir)
        weights = {k: v for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
        config = config_to_json(self.config) | {"backbone": BACKBONE_FOLDER}
        name = network_class_name(self)
        snapshot = NetworkSnapshot(name, config, weights, dict(records or {}), f"a {name} in memory")
        return save_snapshot(snapshot, folder, max_shard_bytes)

    @classmethod
    def load_saved_folder(
        cls, folder: Path, snapshot: NetworkSnapshot, device: str | torch.device = "cpu"
    ) -> RewardModel | None:
        """The reward model of a folder ``save_pretrained`` wrote (called by ``load_network``); None for a folder
        that holds every weight in ``model.safetensors`` (``fsvideo export`` of a run), which the generic path
        builds."""
        backbone_dir = folder / BACKBONE_FOLDER
        if not (backbone_dir / "config.json").is_file():
            return None
        config = dataclasses.replace(snapshot.build_config(), backbone=str(backbone_dir))
        network = cls.from_backbone(config, device)
        own = {k: v for k, v in network.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
        if set(own) != set(snapshot.weights):
            raise ValueError(
                f"{folder}: its weights {sorted(snapshot.weights)} do not fit this {snapshot.class_name}'s head "
                f"{sorted(own)}; the folder was written by another version of fsvideo."
            )
        with torch.no_grad():
            for key, target in own.items():
                value = snapshot.weights[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{folder}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(value)
        return network

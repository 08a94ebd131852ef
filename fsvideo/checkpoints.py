"""Reading weights safely, and rebuilding a network from a finished run (``config.yaml`` + checkpoint).

Everything here loads with ``torch.load(weights_only=True)`` or safetensors: no checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

RUN_CONFIG = "config.yaml"
"""Name of the resolved config that ``fsvideo fit`` writes in every run directory."""

Network = TypeVar("Network", bound=nn.Module)


def safe_torch_load(
    path: str | os.PathLike, map_location: Any = "cpu", expected: str = "a checkpoint"
) -> Any:
    """``torch.load(weights_only=True)`` with an error that names the file and what was expected.

    The file is memory-mapped: tensors are read from disk when used, so taking a few tensors (or one shard
    of each) out of a large checkpoint does not read all of it into memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}. Check the path in your config.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(
            f"{path} could not be read as {expected} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "The file is truncated, corrupt, or not a PyTorch checkpoint; use an earlier checkpoint "
            "or re-export the weights."
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a Lightning ``.ckpt``, a ``torch.save``d dict or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; expected a safetensors weight file.")
        return load_file(str(path))
    checkpoint = safe_torch_load(path, expected="a checkpoint of an earlier stage")
    return checkpoint.get("state_dict", checkpoint)


def pick_module_weights(
    module: nn.Module, path: str | Path, prefix: str, may_add: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The ``{prefix}_ema.*`` weights of a checkpoint, else its ``{prefix}.*`` ones, renamed to ``module``'s
    names, and which of the two prefixes was used. Shapes must match exactly (a sharded module compares
    its global shapes): a mismatch names the tensors and the config field to fix.

    ``may_add(name)`` marks the module's tensors that the checkpoint may lack (parts the module adds to the
    checkpoint's architecture, such as Layer Memory routers on a plain DiT); they keep the module's values.
    """
    state = read_state_dict(path)
    for source in (f"{prefix}_ema.", f"{prefix}."):
        picked = {k[len(source) :]: v for k, v in state.items() if k.startswith(source)}
        if picked:
            break
    else:
        raise ValueError(
            f"{path} holds no '{prefix}.*' or '{prefix}_ema.*' weights; it is not a checkpoint of a stage "
            f"that trains a {type(module).__name__}."
        )
    own = module.state_dict()
    mismatched = [k for k, v in picked.items() if k in own and own[k].shape != v.shape]
    missing = sorted(name for name in set(own) - set(picked) if may_add is None or not may_add(name))
    unexpected = sorted(set(picked) - set(own))
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{path} does not fit this {type(module).__name__}: shape mismatch {mismatched[:5]}, missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. The architecture in the config must equal the one "
            "the checkpoint was trained with (compare with the config.yaml saved beside it)."
        )
    return picked, source.rstrip(".")


def load_module_weights(
    module: nn.Module, path: str | Path, prefix: str, may_add: Callable[[str], bool] | None = None
) -> str:
    """Load ``module`` from a checkpoint as ``pick_module_weights`` chooses; returns the prefix used."""
    picked, source = pick_module_weights(module, path, prefix, may_add)
    module.load_state_dict(picked, strict=may_add is None)
    return source


def find_run_files(path: str | Path) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint)`` of a run directory (its ``checkpoints/last.ckpt``) or of a checkpoint
    inside one (the nearest ``config.yaml`` above it)."""
    path = Path(path)
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
            raise FileNotFoundError(
                f"{checkpoint}: no such file (checkpoints there: {found or 'none'}); "
                "pass the checkpoint path itself."
            )
        candidates = [path / RUN_CONFIG]
    elif path.is_file():
        checkpoint = path
        candidates = [parent / RUN_CONFIG for parent in list(path.parents)[:2]]
    else:
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint.")
    for config in candidates:
        if config.is_file():
            return config, checkpoint
    raise FileNotFoundError(
        f"no {RUN_CONFIG} beside {path} (looked in {[str(c.parent) for c in candidates]}); the architecture "
        "is read from the config that `fsvideo fit` saves in the run directory."
    )


def load_network_from_run(
    path: str | Path,
    section: str,
    build: Callable[[dict[str, Any]], Network],
    device: str | torch.device = "cpu",
) -> Network:
    """Rebuild the network a run trained, in eval mode and frozen.

    Args:
        path: run directory (uses ``checkpoints/last.ckpt``) or a checkpoint inside one.
        section: the model argument holding the architecture (``autoencoder``, ``dit``, …); its weights
            are ``{section}.*`` / ``{section}_ema.*`` in the checkpoint (EMA preferred).
        build: turns the config section's fields into the network (e.g. ``lambda f: FSAE(FSAEConfig(**f))``).
    """
    config_path, checkpoint = find_run_files(path)
    config = yaml.safe_load(config_path.read_text()) or {}
    try:
        fields = config["model"]["init_args"][section]
    except (KeyError, TypeError):
        raise ValueError(
            f"{config_path} has no model.init_args.{section} section; it is not the config of a run that "
            f"trains a '{section}' network."
        ) from None
    try:
        with torch.device("meta"):  # no initialisation to waste: every tensor comes from the checkpoint
            network = build(fields or {})
    except TypeError as error:
        raise ValueError(
            f"{config_path}: model.init_args.{section} does not fit the network ({error})."
        ) from None
    network.to_empty(device=device)
    load_module_weights(network, checkpoint, prefix=section)
    return network.eval().requires_grad_(False)

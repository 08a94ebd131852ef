"""Starting a stage from an earlier stage's checkpoint (the ``init_from`` config field)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from callbacks.checkpoint_io import safe_torch_load


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a Lightning ``.ckpt``, a ``torch.save``d dict or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; expected a safetensors weight file.")
        return load_file(str(path))
    checkpoint = safe_torch_load(path, expected="a checkpoint of an earlier stage")
    return checkpoint.get("state_dict", checkpoint)


def load_module_weights(module: nn.Module, path: str | Path, prefix: str) -> str:
    """Load ``module`` from the ``{prefix}_ema.*`` weights of a checkpoint, else ``{prefix}.*``.

    Returns which of the two was used. Shapes must match exactly: a mismatch names the tensors
    and the config field to fix.
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
    missing = sorted(set(own) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{path} does not fit this {type(module).__name__}: shape mismatch {mismatched[:5]}, missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. The architecture in the config must equal the one "
            "the checkpoint was trained with (compare with the config.yaml saved beside it)."
        )
    module.load_state_dict(picked)
    return source.rstrip(".")

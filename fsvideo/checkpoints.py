"""Reading weights safely: checkpoints, state dicts, and the checkpoint of a run directory.

Everything here loads with ``torch.load(weights_only=True)`` or safetensors: no checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

RUN_CONFIG = "config.yaml"
"""Name of the resolved config that ``fsvideo fit`` writes in every run directory."""


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


def find_run_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a run directory (its ``checkpoints/last.ckpt``), or ``path`` itself when it is a file."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            return checkpoint
        found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt"))
        raise FileNotFoundError(
            f"{checkpoint}: no such file (checkpoints there: {found or 'none'}); pass the checkpoint path itself."
        )
    raise FileNotFoundError(f"{path}: no such saved-model folder, run directory or checkpoint.")

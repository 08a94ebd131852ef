"""Reading checkpoints safely, and finding the checkpoint of a run directory.

Everything here loads with ``torch.load(weights_only=True)``: no checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

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

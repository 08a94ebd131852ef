"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.sample_data import SampleDataset, write_sample_dataset
from fsvideo.encoders import save_tiny_encoders


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """The bundled sample dataset (seed 0), written once per session: ``.train`` is the brace pattern of
    4 training shards (5 clips + 3 stills each), ``.val`` the held-out shard (4 clips + 2 stills)."""
    return write_sample_dataset(tmp_path_factory.mktemp("sample_data"), seed=0)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random text (UMT5), image (CLIP) and DINOv2 encoders saved once per session, loaded by tests
    through the same ``from_pretrained(local path)`` calls a user's config triggers."""
    return save_tiny_encoders(tmp_path_factory.mktemp("tiny_encoders"))

"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from datamodules.sample_data import SampleDataset, write_sample_dataset


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """The bundled sample dataset (seed 0), written once per session: ``.train`` is the brace pattern of
    4 training shards (5 clips + 3 stills each), ``.val`` the held-out shard (4 clips + 2 stills)."""
    return write_sample_dataset(tmp_path_factory.mktemp("sample_data"), seed=0)

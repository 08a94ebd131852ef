"""Fixtures shared by every test folder."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

# Lightning gives its logger a handler on the stderr of the moment it is first imported: imported here, before any
# test captures stderr, so that a test calling `cli.main` in-process cannot bind it to its own, later closed, stream.
import lightning.pytorch  # noqa: F401
import pytest
import torch

from datamodules.sample_data import SampleDataset, write_sample_dataset
from fsvideo.encoders import save_tiny_encoders
from fsvideo.rewards import save_tiny_reward_models

# `make test` runs one pytest-xdist worker per core: each worker, and every process a test starts, computes
# on one thread, since torch's default (a thread per core in each of them) would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# DataLoader workers that tests start in-process come from a fork server, not from a fork of this process: a test
# process runs threads (xdist's channel to its controller, tqdm's monitor, wandb's), and a child forked while one of
# them held a lock can wait on it for ever, holding the worker's channel open so that the whole run stops.
multiprocessing.set_start_method("forkserver", force=True)
multiprocessing.set_forkserver_preload(["torch", "datamodules.pipeline", "datamodules.latents"])

# Nothing is downloaded: a model path that does not resolve locally fails at once instead of asking the hub.
os.environ["HF_HUB_OFFLINE"] = "1"


def _start_order(item: pytest.Item) -> tuple[bool, float]:
    slow = item.get_closest_marker("slow")
    return slow is None, -float(slow.kwargs.get("minutes", 0)) if slow is not None else 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow end-to-end tests run first, the longest (``@pytest.mark.slow(minutes=…)``) before the others, so
    that with several workers no long test starts last and leaves the other workers idle at the end."""
    items.sort(key=_start_order)


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


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random reward backbones saved once per session: ``{"qwen2_vl": folder, "clip": folder}`` as
    transformers' save_pretrained leaves them (``fsvideo.rewards.save_tiny_reward_models``)."""
    return save_tiny_reward_models(tmp_path_factory.mktemp("tiny_reward_models"))

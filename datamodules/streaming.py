"""What every batch stream of this project shares: per-worker streams that persist across epochs, an exact
quota of batches per rank, and the training position saved in and restored from checkpoints.

``VideoDataModule`` (raw clips) and ``LatentDataModule`` (latent caches) build on these two classes; each
supplies only how its worker stream is opened and read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.shards import WorkerSlot
from datamodules.skips import SKIP_REASONS, log_keys

log = logging.getLogger(__name__)


class WorkerStream(Protocol):
    slot: WorkerSlot

    def next_batch(self) -> dict[str, Any]: ...


class WorkerStreamDataset(IterableDataset):
    """Yields ready batches (``batch_size=None`` in the DataLoader), exactly ``batches`` per rank per iteration,
    split over the DataLoader workers. A training stream lives on in its (persistent) worker, so epoch ``e + 1``
    continues where epoch ``e`` stopped; ``start`` holds per-worker cursors to resume from."""

    def __init__(
        self,
        batch_size: int,
        batches: int,
        train: bool,
        image_fraction: float | None = None,
        rank: int = 0,
        world_size: int = 1,
        start: dict[int, dict[str, int]] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or batches < 1:
            raise ValueError(f"batch_size={batch_size} and batches={batches} must be at least 1.")
        if image_fraction is not None and not 0 <= image_fraction <= 1:
            raise ValueError(
                f"image_fraction={image_fraction} must be in [0, 1], or None for the data's own mix."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        self.batch_size = batch_size
        self.batches = batches
        self.train = train
        self.image_fraction = image_fraction
        self.rank = rank
        self.world_size = world_size
        self.start = start or {}
        self._streams: dict[int, WorkerStream] = {}

    def open_stream(self, slot: WorkerSlot, cursor: dict[str, int]) -> WorkerStream:
        """A fresh stream for one worker of one rank, starting at ``cursor`` (empty: the beginning)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.batches

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_streams"] = {}  # live readers stay in the process that made them
        return state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = WorkerSlot(self.rank, self.world_size, worker, num_workers)
        stream = self._streams.get(worker) if self.train else None
        if stream is None or stream.slot != slot:
            stream = self.open_stream(slot, self.start.get(worker, {}))
            self._streams[worker] = stream
        quota = self.batches // num_workers + (worker < self.batches % num_workers)
        for _ in range(quota):
            yield stream.next_batch()


class StreamDataModule(LightningDataModule):
    """Shared DataModule side of the streams: skip counts, and the training position in checkpoints.

    Subclasses set ``self.num_workers`` and fill ``self.loaders[stage]`` (``TrackingLoader``s) when they
    build their loaders, and pass ``self.resume_cursors(rank, world_size)`` to their training dataset.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loaders: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None

    def rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def skipped_counts(self, stage: str = "train") -> dict[str, int]:
        """``data/skipped_<reason>`` (and ``data/skipped_total``) so far on this rank: training counts run
        since the loader was made, validation counts cover the last validation run."""
        loader = self.loaders.get(stage)
        totals = {reason: 0 for reason in SKIP_REASONS}
        for counts in loader.skipped.values() if loader is not None else ():
            for reason, n in counts.items():
                totals[reason] += n
        return log_keys(totals)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's training-stream cursors (per worker). Under torch.distributed this gathers across
        ranks, so call it on every rank, as Lightning's checkpointing does."""
        loader = self.loaders.get("train")
        mine = {
            "num_workers": self.num_workers,
            "cursors": dict(loader.cursors) if loader is not None else {},
        }
        rank, world_size = self.rank_and_world()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, mine)
            ranks = dict(enumerate(gathered))
        else:
            ranks = {rank: mine}
        return {"world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Training resumes from the stored cursors (same world size and worker count needed)."""
        self._resume = state_dict

    def resume_cursors(self, rank: int, world_size: int) -> dict[int, dict[str, int]] | None:
        if not self._resume:
            return None
        saved = self._resume["ranks"].get(rank)
        if (
            self._resume["world_size"] != world_size
            or saved is None
            or saved["num_workers"] != self.num_workers
        ):
            log.warning(
                "data position not restored: the checkpoint was written with world_size=%s and "
                "num_workers=%s, this run has %s and %s; the data stream starts over.",
                self._resume["world_size"],
                saved["num_workers"] if saved else "?",
                world_size,
                self.num_workers,
            )
            return None
        return saved["cursors"]

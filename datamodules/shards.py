"""Shard lists: expand brace patterns, split them across ranks and workers, read samples with webdataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from datamodules.skips import SkipCounter, SkipSample


def expand_shards(shards: str | list[str]) -> list[str]:
    """Local paths, brace patterns (``train-{000000..000099}.tar``) and ``pipe:`` URLs → a flat URL list."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = [url for pattern in patterns for url in expand_urls(pattern)]
    if not urls:
        raise ValueError(f"no shards in {shards!r}; give a path, a brace pattern or a list of them.")
    return urls


@dataclass(frozen=True)
class WorkerSlot:
    """Where one data-reading process sits: rank of the job and worker of that rank's DataLoader."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        """Global worker index in ``[0, world_size · num_workers)``."""
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class PassPlan:
    """What one worker reads in one pass over the data.

    With at least as many shards as workers in the job, each worker reads its own shards. With fewer, every
    worker reads every shard and keeps sample ``i`` of shard position ``p`` when ``(i + p) % total == index``.
    """

    urls: list[str]
    """This worker's shards, in reading order."""
    shard_ids: list[int]
    """Index of each of those shards in the full shard list (seeds the per-sample RNG)."""
    sample_stride: int
    """1 when the worker owns whole shards, else the number of workers sharing every shard."""
    sample_offset: int
    """Which residue of the stride this worker keeps (with the shard position added)."""

    def keeps(self, position: int, sample_index: int) -> bool:
        return (sample_index + position) % self.sample_stride == self.sample_offset


def plan_pass(urls: list[str], slot: WorkerSlot, seed: int, pass_index: int, shuffle: bool) -> PassPlan:
    """The worker's part of pass ``pass_index``: shards in an order every rank agrees on, then split.

    Training reshuffles the shard order on each pass (seeded by ``seed`` and the pass only, so the split
    stays disjoint across ranks); validation keeps the listed order.
    """
    order = np.arange(len(urls))
    if shuffle:
        order = np.random.default_rng([seed, pass_index]).permutation(len(urls))
    if len(urls) >= slot.total:
        mine = [int(i) for i in order[slot.index :: slot.total]]
        return PassPlan([urls[i] for i in mine], mine, 1, 0)
    return PassPlan([urls[i] for i in order], [int(i) for i in order], slot.total, slot.index)


def read_shard(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", "mp4" | "jpg" | …, "json"}``) of one tar shard.

    An unreadable shard, or a read error part-way, ends the shard with a "shard" skip; samples already read
    stay good.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure (missing file, failed pipe) is a bad shard
        counter.record(SkipSample("shard", f"cannot open: {type(e).__name__}: {e}"), "", url)
        return
    complete = False
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None))
        complete = True
    except Exception as e:  # noqa: BLE001 - tarfile, gzip and pipe errors all mean the rest is unreadable
        counter.record(SkipSample("shard", f"read failed: {type(e).__name__}: {e}"), "", url)
    finally:
        try:
            stream.close()  # a pipe: URL reports its command's failure here
        except Exception as e:  # noqa: BLE001
            if complete:
                counter.record(SkipSample("shard", f"close failed: {type(e).__name__}: {e}"), "", url)

"""What every batch stream of this project shares: per-worker streams that group samples by bucket and persist
across epochs, an exact quota of batches per rank, and the training position saved in and restored from
checkpoints.

``VideoDataModule`` (raw clips) and ``LatentDataModule`` (latent caches) build on these classes; each supplies
only how a raw sample is decoded (``BucketStream.decode``) and how a batch is put together (``collate``).

Exact resume: a worker's ``Cursor`` names the next sample to read *and* the samples already read but not yet
batched (partly filled buckets, a full batch of the kind not asked for). Every sample's randomness comes from
its own address (seed, pass, shard, index), so a resumed stream decodes those held samples again, gets the
same items, and goes on exactly as the uninterrupted stream would have.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.shards import PassPlan, WorkerSlot, expand_shards, plan_pass, read_shard
from datamodules.skips import SKIP_REASONS, SkipCounter, SkipSample, log_keys
from fsvideo.parallel import data_parallel_rank_and_size

log = logging.getLogger(__name__)

KINDS = ("image", "video")

Address = list[int]
"""Where a sample sits in a worker's stream: ``[pass_index, shard_position, sample_index]``."""


@dataclass
class Cursor:
    """A worker's position in its stream (plain ints, lists and dicts: it travels in batches and checkpoints)."""

    pass_index: int = 0
    shard_position: int = 0
    """Index into the worker's shard list of the current pass."""
    sample_index: int = 0
    """Samples already read from that shard."""
    batches: int = 0
    """Batches yielded so far."""
    fruitless_passes: int = 0
    """Whole passes in a row that gave no usable sample of the kind wanted."""
    pending: list[list[Address]] = field(default_factory=list)
    """Samples waiting in partly filled buckets, one list per bucket, in the order the buckets were opened."""
    ready: dict[str, list[list[Address]]] = field(default_factory=dict)
    """Full batches waiting because the other kind (image / video) was asked for, per kind."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped so far, by reason."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchItem(Protocol):
    """What ``BucketStream.decode`` returns: anything with a bucket and an image flag."""

    bucket: Hashable
    is_image: bool


class BucketStream:
    """Batches for one worker: reads its samples in order, decodes them, groups them by bucket and picks the
    kind of each batch.

    With ``image_fraction`` p, batch b is a batch of stills with probability p (drawn from seed, rank, worker
    and b); a full batch of the other kind waits (at most one), and further samples of that kind are passed
    over while it waits (throttled, not counted as skipped). Subclasses implement ``decode`` and ``collate``.
    """

    def __init__(self, ds: WorkerStreamDataset, slot: WorkerSlot, cursor: dict[str, Any]) -> None:
        self.ds = ds
        self.slot = slot
        start = Cursor(**cursor)
        # The held samples live in the buffers below; position() writes them back into each cursor it reports.
        self.cursor = replace(start, pending=[], ready={}, skipped={})
        self.counter = SkipCounter(f" (rank {slot.rank}, worker {slot.worker})")
        self.counter.counts.update(start.skipped)
        self.pending: dict[Hashable, list[tuple[Address, BatchItem]]] = {}
        self.ready: dict[str, deque[list[tuple[Address, BatchItem]]]] = {kind: deque() for kind in KINDS}
        p = ds.image_fraction
        self.max_ready = {"image": int(p is None or p > 0), "video": int(p is None or p < 1)}
        self.wanted: str | None = None
        self.progress = False
        self.samples = self._samples()
        self._restore_held(start.pending, start.ready)

    # ---- what a subclass supplies ---------------------------------------------------------------------

    def decode(self, raw: dict[str, Any], rng: np.random.Generator) -> BatchItem:
        """A raw WebDataset sample → an item with ``bucket`` and ``is_image``; raises ``SkipSample``."""
        raise NotImplementedError

    def peek_kind(self, raw: dict[str, Any]) -> str | None:
        """The kind ("image" / "video") of a raw sample when it is known before decoding, so that a throttled
        kind is not decoded at all."""
        return None

    def collate(self, items: list[Any]) -> dict[str, Any]:
        """Items of one bucket → a batch dict with a ``meta`` dict (the stream adds its position to it)."""
        raise NotImplementedError

    # ---- the stream -----------------------------------------------------------------------------------

    def plan(self, pass_index: int) -> PassPlan:
        return plan_pass(self.ds.urls, self.slot, self.ds.seed, pass_index, shuffle=self.ds.train)

    def sample_rng(self, plan: PassPlan, address: Address) -> np.random.Generator:
        pass_index, position, index = address
        return np.random.default_rng(
            [self.ds.seed, int(self.ds.train), pass_index, plan.shard_ids[position], index]
        )

    def _samples(self) -> Iterator[tuple[Address, dict[str, Any], np.random.Generator]]:
        """This worker's raw samples, forever, each with its address and its own RNG; advances the cursor."""
        cur = self.cursor
        while True:
            plan = self.plan(cur.pass_index)
            while cur.shard_position < len(plan.urls):
                position, resume_at = cur.shard_position, cur.sample_index
                for index, raw in enumerate(read_shard(plan.urls[position], self.counter)):
                    if index < resume_at:
                        continue
                    cur.sample_index = index + 1
                    if plan.keeps(position, index):
                        address = [cur.pass_index, position, index]
                        yield address, raw, self.sample_rng(plan, address)
                cur.shard_position, cur.sample_index = position + 1, 0
            cur.pass_index, cur.shard_position = cur.pass_index + 1, 0
            cur.fruitless_passes = 0 if self.progress else cur.fruitless_passes + 1
            self.progress = False
            # The first pass may have started mid-way (resume); a second whole pass without progress is final.
            if cur.fruitless_passes >= 2:
                self._fail()

    def _fail(self) -> None:
        kind = f"{self.wanted} " if self.wanted else ""
        urls = self.plan(0).urls
        shown = ", ".join(urls[:3]) + (", …" if len(urls) > 3 else "")
        raise RuntimeError(
            f"no usable {kind}sample in a whole pass over the {len(urls)} shard(s) of rank {self.slot.rank} "
            f"worker {self.slot.worker} ({shown}); skipped so far: {dict(self.counter.counts)}. Check the "
            "shards with `fsvideo data inspect`, or change image_fraction if that kind is simply absent."
        )

    def _throttled(self, kind: str) -> bool:
        return kind != self.wanted and len(self.ready[kind]) >= self.max_ready[kind]

    def next_batch(self) -> dict[str, Any]:
        p = self.ds.image_fraction
        if p is not None:
            rng = np.random.default_rng([self.ds.seed, self.slot.rank, self.slot.worker, self.cursor.batches])
            self.wanted = "image" if rng.random() < p else "video"
        group = self._next_group()
        self.cursor.batches += 1
        self.progress = True
        batch = self.collate([item for _, item in group])
        batch["meta"].update(
            stage="train" if self.ds.train else "val",
            rank=self.slot.rank,
            worker=self.slot.worker,
            cursor=self.position(),
            skipped=self.counter.snapshot(),
        )
        return batch

    def _next_group(self) -> list[tuple[Address, BatchItem]]:
        if self.wanted is not None and self.ready[self.wanted]:
            return self.ready[self.wanted].popleft()
        while True:
            address, raw, rng = next(self.samples)
            kind = self.peek_kind(raw)
            if kind is not None and self._throttled(kind):
                continue
            try:
                item = self.decode(raw, rng)
            except SkipSample as skip:
                self.counter.record(skip, raw.get("__key__", ""), raw.get("__url__", ""))
                continue
            kind = "image" if item.is_image else "video"
            if self._throttled(kind):
                continue
            if self.wanted is None or kind == self.wanted:
                self.progress = True
            group = self.pending.setdefault(item.bucket, [])
            group.append((address, item))
            if len(group) < self.ds.batch_size:
                continue
            del self.pending[item.bucket]
            if self.wanted is None or kind == self.wanted:
                return group
            self.ready[kind].append(group)

    # ---- position -------------------------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """The cursor, with the addresses of the samples held in buckets and waiting batches."""
        cursor = self.cursor.as_dict()
        cursor["pending"] = [[address for address, _ in group] for group in self.pending.values()]
        cursor["ready"] = {
            kind: [[address for address, _ in group] for group in groups]
            for kind, groups in self.ready.items()
            if groups
        }
        cursor["skipped"] = dict(self.counter.counts)
        return cursor

    def _restore_held(self, pending: list[list[Address]], ready: dict[str, list[list[Address]]]) -> None:
        """Decode again the samples a saved cursor held, and put them back where they were."""
        held = [address for group in pending for address in group]
        held += [address for groups in ready.values() for group in groups for address in group]
        if not held:
            return
        items = self._read_again(held)
        for group in pending:
            restored = [(address, items[tuple(address)]) for address in group if tuple(address) in items]
            if restored:
                self.pending[restored[0][1].bucket] = restored
        for kind, groups in ready.items():
            for group in groups:
                if all(tuple(address) in items for address in group):
                    self.ready[kind].append([(address, items[tuple(address)]) for address in group])
        lost = len(held) - len(items)
        if lost:
            log.warning(
                "rank %d worker %d: %d of the %d samples held in buckets at the checkpoint could not be read "
                "again (were the shards changed?); the stream goes on without them.",
                self.slot.rank,
                self.slot.worker,
                lost,
                len(held),
            )

    def _read_again(self, addresses: list[Address]) -> dict[tuple[int, ...], BatchItem]:
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
        for pass_index, position, index in addresses:
            wanted[(pass_index, position)].add(index)
        found: dict[tuple[int, ...], BatchItem] = {}
        quiet = SkipCounter(warn=False)
        for (pass_index, position), indices in wanted.items():
            plan = self.plan(pass_index)
            if position >= len(plan.urls):
                continue
            for index, raw in enumerate(read_shard(plan.urls[position], quiet)):
                if index in indices:
                    address = [pass_index, position, index]
                    try:
                        found[tuple(address)] = self.decode(raw, self.sample_rng(plan, address))
                    except SkipSample:
                        pass
                if index >= max(indices):
                    break
        return found


class WorkerStreamDataset(IterableDataset):
    """Yields ready batches (``batch_size=None`` in the DataLoader), exactly ``batches`` per rank per iteration,
    split over the DataLoader workers. A training stream lives on in its (persistent) worker, so epoch ``e + 1``
    continues where epoch ``e`` stopped; ``start`` holds per-worker cursors to resume from. A stream resumed in
    the middle of an epoch yields only what is left of that epoch, so epochs keep their length."""

    stream_class: type[BucketStream] = BucketStream

    def __init__(
        self,
        shards: str | list[str],
        batch_size: int,
        batches: int,
        train: bool,
        image_fraction: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: dict[int, dict[str, Any]] | None = None,
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
        self.urls = expand_shards(shards)
        self.batch_size = batch_size
        self.batches = batches
        self.train = train
        self.image_fraction = image_fraction
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start or {}
        self._streams: dict[int, BucketStream] = {}

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
            stream = self.stream_class(self, slot, self.start.get(worker, {}))
            self._streams[worker] = stream
        quota = self.batches // num_workers + (worker < self.batches % num_workers)
        if quota == 0:
            return
        for _ in range(quota - stream.cursor.batches % quota):
            yield stream.next_batch()


class TrackingLoader(DataLoader):
    """A DataLoader over a ``WorkerStreamDataset`` that remembers the latest skip counts and cursor each worker
    reported in its batches, and applies ``transform`` to each batch (e.g. uint8 → float outside a Trainer).

    Its own seeded generator means that starting an iteration never draws from the global torch RNG, so a
    resumed run's random numbers match those of the run it continues."""

    def __init__(
        self,
        dataset: WorkerStreamDataset,
        num_workers: int,
        persistent: bool,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(dataset.seed),
        )
        self.transform = transform
        self.skipped: dict[int, dict[str, int]] = {}
        self.cursors: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            meta = batch["meta"]
            self.skipped[meta["worker"]] = meta["skipped"]
            self.cursors[meta["worker"]] = meta["cursor"]
            yield self.transform(batch) if self.transform is not None else batch


class StreamDataModule(LightningDataModule):
    """Shared DataModule side of the streams: loaders, skip counts, and the training position in checkpoints.

    Subclasses set ``self.num_workers`` and ``self.seed``, build their loaders with ``make_loader`` and pass
    ``self.resume_cursors(rank, world_size)`` to their training dataset.

    The saved position is that of the last batch *handed to training* (``on_before_batch_transfer``), not of
    the last one read: a Trainer fetches one batch ahead, and that batch must not be lost on resume. With
    several workers, each worker's stream is restored exactly; the DataLoader's round robin restarts at
    worker 0, so within the rest of the resumed epoch batches of different workers may come in another order
    unless the checkpoint fell on a multiple of ``num_workers`` batches into the epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loaders: dict[str, TrackingLoader] = {}
        self.consumed: dict[int, dict[str, Any]] = {}
        self._resume: dict[str, Any] | None = None

    def make_loader(
        self,
        stage: str,
        dataset: WorkerStreamDataset,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> TrackingLoader:
        # The training stream lives in its workers and continues across epochs.
        loader = TrackingLoader(dataset, self.num_workers, persistent=stage == "train", transform=transform)
        self.loaders[stage] = loader
        if stage == "train":
            self.consumed = dict(dataset.start)
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        meta = batch.get("meta", {}) if isinstance(batch, dict) else {}
        if meta.get("stage") == "train":
            self.consumed[meta["worker"]] = meta["cursor"]
        return batch

    def rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of data-parallel ranks: under context parallel
        (the module's ``parallel.context_parallel``) the ranks of one cp group read the same batches."""
        if self.trainer is not None:
            parallel = getattr(self.trainer.lightning_module, "parallel", None)
            context_parallel = getattr(parallel, "context_parallel", 1)
            return data_parallel_rank_and_size(
                self.trainer.global_rank, self.trainer.world_size, context_parallel
            )
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def skipped_counts(self, stage: str = "train") -> dict[str, int]:
        """``data/skipped_<reason>`` (and ``data/skipped_total``) so far on this rank: training counts cover
        the whole run (resumes included), validation counts the last validation run."""
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
        if self.trainer is not None:
            cursors = dict(self.consumed)
        else:  # iterated by hand: what was read is what was consumed
            cursors = dict(loader.cursors) if loader is not None else {}
        mine = {"num_workers": self.num_workers, "cursors": cursors}
        rank, world_size = self.rank_and_world()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every process takes part; the cp ranks of one data-parallel rank hold the same cursors
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rank, mine))
            ranks = dict(gathered)
        else:
            ranks = {rank: mine}
        return {"world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Training resumes from the stored cursors (see ``resume_cursors``)."""
        self._resume = state_dict

    def resume_cursors(self, rank: int, world_size: int) -> dict[int, dict[str, Any]] | None:
        """The cursors this rank's workers start from: the saved ones when the run has the checkpoint's world
        size and worker count; otherwise the data is re-split: every worker starts the first pass that no
        saved worker had begun (samples of the unfinished pass are left out, none is seen twice in a pass),
        and the log says so."""
        if not self._resume:
            return None
        saved = self._resume["ranks"].get(rank)
        if (
            self._resume["world_size"] == world_size
            and saved is not None
            and saved["num_workers"] == self.num_workers
        ):
            return saved["cursors"]
        passes = [
            c.get("pass_index", 0) for r in self._resume["ranks"].values() for c in r["cursors"].values()
        ]
        next_pass = max(passes, default=-1) + 1
        old_workers = {r["num_workers"] for r in self._resume["ranks"].values()}
        log.warning(
            "data position re-split: the checkpoint was written with world_size=%s and num_workers=%s, this run "
            "has world_size=%s and num_workers=%s; weights and optimizer state carry over, and every worker "
            "starts data pass %d (the first one no earlier worker had begun).",
            self._resume["world_size"],
            "/".join(str(n) for n in sorted(old_workers)) or "?",
            world_size,
            self.num_workers,
            next_pass,
        )
        return {worker: {"pass_index": next_pass} for worker in range(max(self.num_workers, 1))}

"""The peak-memory and time harness the memory benchmarks share (``ae.py``, ``decoder.py``, ``refl.py``,
``grpo.py``; ``scale.py`` reads the peak RSS the same way).

Each measurement runs in its own spawned process (:func:`run_spawned`), so its peak is its own. Inside it,
:class:`PeakMemory` measures what the timed call adds: on GPU the peak allocated above the allocation at
entry (``torch.cuda.max_memory_allocated``, reset at entry); on CPU the rise of the process's peak RSS above
its resident size at entry, with glibc's mmap threshold pinned by :func:`pin_mmap_threshold` in the parent
before it spawns, so that freed tensors leave the resident set. Weights and inputs built before entry are
excluded. Run the call once at a small size before entering, so lazily loaded kernels and allocator pools
stay out.

The scripts import it as ``from measure import …``: benchmarks/ is a script's import root.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch


def resident_kib() -> int:
    """This process's resident set now, in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pin_mmap_threshold(device: str) -> None:
    """On the CPU, make the processes spawned from now on take big allocations from mmap, so they go back to
    the OS when freed: the peak RSS then tracks live tensors instead of what malloc's arenas kept."""
    if device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class PeakMemory:
    """``with PeakMemory(cuda) as peak: …``; afterwards ``peak.bytes`` is what the block added at its peak
    (never negative)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.before = 0
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated() if self.cuda else resident_kib() * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
        self.bytes = max(peak - self.before, 0)


def timed(call: Callable[[], Any], cuda: bool) -> tuple[Any, float]:
    """``call()``'s result and its seconds, the device synchronized before the clock stops."""
    start = time.perf_counter()
    out = call()
    synchronize(cuda)
    return out, time.perf_counter() - start


def run_spawned(label: str, target: Callable[..., None], *args: Any) -> Any:
    """Runs ``target(*args, results)`` in a fresh spawned process and returns what it put on ``results``;
    raises if the process fails."""
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{label} failed (exit code {process.exitcode})")
    return results.get()

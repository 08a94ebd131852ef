"""Bad data never stops training: each bad sample or shard is skipped, counted by reason and warned about.

Counting happens where the data is read (a DataLoader worker); each batch carries its worker's counts back
in ``batch["meta"]["skipped"]`` and the DataModule sums the latest counts of every worker.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

SKIP_REASONS = {
    "decode": "undecodable or truncated media",
    "json": "missing or malformed json (a caption string is required)",
    "no_media": "no mp4/jpg/png member for the key",
    "short": "clip shorter than the frames needed at the target fps",
    "small": "frame smaller than its bucket (would need upscaling)",
    "shard": "unreadable or truncated shard",
}
"""Every reason a sample (or a whole shard) is skipped, with what it means."""

WARNINGS_PER_REASON = 5
"""Warnings logged per reason and worker before the rest are only counted."""


class SkipSample(Exception):
    """A sample (or shard) that cannot be used; ``reason`` is a key of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {sorted(SKIP_REASONS)}")
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Counts skipped samples by reason, logs the first few of each reason and keeps a few examples."""

    def __init__(self, where: str = "", warn: bool = True, keep_examples: int = 0) -> None:
        self.counts: Counter[str] = Counter()
        self.where = where
        self.warn = warn
        self.keep_examples = keep_examples
        self.examples: list[tuple[str, str, str, str]] = []
        """(url, key, reason, message) of the first ``keep_examples`` skips of each reason."""

    def record(self, skip: SkipSample, key: str, url: str) -> None:
        self.counts[skip.reason] += 1
        n = self.counts[skip.reason]
        if n <= self.keep_examples:
            self.examples.append((url, key, skip.reason, str(skip)))
        if self.warn and n <= WARNINGS_PER_REASON:
            more = " (further ones are only counted)" if n == WARNINGS_PER_REASON else ""
            log.warning(
                "skipped %s in %s%s: %s: %s%s", key or "shard", url, self.where, skip.reason, skip, more
            )

    def snapshot(self) -> dict[str, int]:
        """Counts for every reason (zeros included)."""
        return {reason: self.counts[reason] for reason in SKIP_REASONS}


def log_keys(counts: dict[str, int]) -> dict[str, int]:
    """``data/skipped_<reason>`` names for logging, plus ``data/skipped_total``."""
    keys = {f"data/skipped_{reason}": counts.get(reason, 0) for reason in SKIP_REASONS}
    keys["data/skipped_total"] = sum(counts.get(reason, 0) for reason in SKIP_REASONS)
    return keys

"""Labelled preference pairs for reward finetuning (§2.3.2), read from JSONL files.

One JSON object per line; paths are relative to the JSONL file's folder (or absolute)::

    {"prompt": "a cat walks …", "video_a": "videos/0001/sft.mp4", "video_b": "videos/0001/gt.mp4",
     "preference": "A" | "B" | "tie",
     "first_frame": "images/0001.png",            optional: else frame 0 of video_a
     "VQ": "A", "MQ": "tie", "TA": "B"}            optional per-dimension labels

``fsvideo rewards pool`` writes such files (``preference`` null until labelled). A row that is not valid JSON,
lacks a field, has an unknown label or names a missing file is skipped and counted when the file is read; a
video that does not decode or is too short is skipped and counted when its batch is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.buckets import Bucket
from datamodules.decode import CropPlan, VideoReader, read_image
from datamodules.skips import SkipCounter, SkipSample, log_keys
from fsvideo.rewards.preference import LABELS, MISSING
from fsvideo.rewards.video_reward import DIMENSIONS


def read_pairs(path: str | Path, skipped: SkipCounter) -> list[dict[str, Any]]:
    """The usable rows of a pairs JSONL, paths resolved; bad rows are counted in ``skipped``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path}: no such file (write one with `fsvideo rewards pool`)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key = f"line {number}"
        try:
            rows.append(_parse_row(line, path.parent))
        except SkipSample as skip:
            skipped.record(skip, key, str(path))
    return rows


def _parse_row(line: str, root: Path) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise SkipSample("json", f"not JSON ({error})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise SkipSample("json", "a row needs a prompt string")
    if row.get("preference") not in LABELS:
        raise SkipSample("json", f"preference must be one of {sorted(LABELS)}, got {row.get('preference')!r}")
    dims = []
    for dim in DIMENSIONS:
        label = row.get(dim)
        if label is not None and label not in LABELS:
            raise SkipSample("json", f"{dim} must be one of {sorted(LABELS)} or absent, got {label!r}")
        dims.append(MISSING if label is None else LABELS[label])
    files = {}
    for field in ("video_a", "video_b", "first_frame"):
        value = row.get(field)
        if value is None and field == "first_frame":
            continue
        if not isinstance(value, str):
            raise SkipSample("json", f"{field} must be a path string")
        file = root / value
        if not file.is_file():
            raise SkipSample("no_media", f"{field} {file}: no such file")
        files[field] = file
    return {"prompt": row["prompt"], "preference": LABELS[row["preference"]], "dimensions": dims, **files}


class PreferencePairs(Dataset):
    """Rows of ``read_pairs`` → samples: ``first_frame`` ``3×H×W``, ``video_a`` / ``video_b`` ``3×T×H×W`` in
    [-1, 1] (the first ``num_frames`` at ``fps``, centre-cropped and resized), ``prompt``, ``preference``,
    ``dimensions`` (3 labels, MISSING where absent). A sample that fails to decode is None (the collate skips it)."""

    def __init__(
        self, rows: list[dict[str, Any]], num_frames: int, height: int, width: int, fps: float
    ) -> None:
        self.rows, self.bucket, self.fps = rows, Bucket(num_frames, height, width), fps

    def __len__(self) -> int:
        return len(self.rows)

    def _video(self, path: Path) -> torch.Tensor:
        with VideoReader(path.read_bytes(), threads=False) as reader:
            plan = CropPlan.cover(reader.width, reader.height, self.bucket, rng=None)
            frames = reader.read(0.0, self.bucket.num_frames, self.fps, plan)  # (T, 3, H, W) uint8
        return frames.permute(1, 0, 2, 3).float().div(127.5).sub(1.0).contiguous()

    def _image(self, path: Path) -> torch.Tensor:
        image = read_image(path.read_bytes())
        try:
            rgb = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise SkipSample("decode", f"cannot decode image: {error}") from None
        plan = CropPlan.cover(
            image.width, image.height, Bucket(1, self.bucket.height, self.bucket.width), rng=None
        )
        return plan.apply([rgb])[0].float().div(127.5).sub(1.0)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index]
        try:
            video_a, video_b = self._video(row["video_a"]), self._video(row["video_b"])
            first = self._image(row["first_frame"]) if "first_frame" in row else video_a[:, 0]
        except SkipSample as skip:
            return {"skip": skip, "key": str(row["video_a"])}
        return {
            "first_frame": first,
            "video_a": video_a,
            "video_b": video_b,
            "prompt": row["prompt"],
            "preference": row["preference"],
            "dimensions": row["dimensions"],
        }


class PreferencePairsDataModule(L.LightningDataModule):
    """Train / validation pairs JSONL files → batches ``{first_frame B×3×H×W, video_a, video_b B×3×T×H×W,
    prompts [B], preference B, dimensions B×3}``.

    Args:
        train, val: pairs JSONL files (see the module docstring).
        num_frames, height, width, fps: the clip every video is cut to (the video reward samples it again).
        batch_size: pairs per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        train: str,
        val: str,
        num_frames: int = 61,
        height: int = 252,
        width: int = 448,
        fps: float = 24.0,
        batch_size: int = 1,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.train_path, self.val_path = train, val
        self.clip = (num_frames, height, width, fps)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skipped = SkipCounter(" (preference pairs)")

    def setup(self, stage: str | None = None) -> None:
        self.train_set = PreferencePairs(read_pairs(self.train_path, self.skipped), *self.clip)
        self.val_set = PreferencePairs(read_pairs(self.val_path, self.skipped), *self.clip)
        if not len(self.train_set):
            raise ValueError(
                f"{self.train_path} holds no usable labelled pair (skipped: {self.skipped.snapshot()})"
            )

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = []
        for sample in samples:
            if "skip" in sample:
                self.skipped.record(sample["skip"], sample["key"], "pairs")
            else:
                good.append(sample)
        batch: dict[str, Any] = {"skipped": log_keys(self.skipped.snapshot())}
        if not good:
            return batch | {"prompts": []}
        return batch | {
            "first_frame": torch.stack([s["first_frame"] for s in good]),
            "video_a": torch.stack([s["video_a"] for s in good]),
            "video_b": torch.stack([s["video_b"] for s in good]),
            "prompts": [s["prompt"] for s in good],
            "preference": torch.tensor([s["preference"] for s in good]),
            "dimensions": torch.tensor([s["dimensions"] for s in good]),
        }

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

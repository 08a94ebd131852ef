"""The candidate pool of §2.3.2 trick 1: videos to label for the first round of reward finetuning.

For each (image, prompt) of an inputs JSONL, the pool holds videos our pipeline (the SFT model) generates,
videos other models made from the same image and prompt (folders the user names, one ``<id>.mp4`` each) and
the ground-truth video; random pairs of candidates are written as a pairs JSONL to label, with a side-by-side
mp4 (A left, B right) per pair for the people labelling.

Inputs JSONL (paths relative to the file)::

    {"id": "0001", "image": "images/0001.png", "prompt": "a cat …", "ground_truth": "clips/0001.mp4"}

Output folder::

    images/<id>.<ext>                    the first frame
    videos/<id>/<source>.mp4             candidates: sft_<k> (generated), <name> (--other NAME=DIR), ground_truth
    side_by_side/<pair_id>.mp4           A | B, both resized to the first one's size and cut to the shorter
    pairs.jsonl                          {"pair_id", "id", "prompt", "first_frame", "video_a", "video_b",
                                          "source_a", "source_b", "side_by_side", "preference": null}

Labellers fill ``preference`` with "A", "B" or "tie" (and optionally "VQ", "MQ", "TA" the same way); the file is
then what ``datamodules.preference_pairs`` reads (paths relative to the output folder).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F

from fsvideo.video_io import from_uint8_frames, side_by_side, to_uint8_frames, write_mp4


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """Rows of an inputs JSONL with ``image`` (and ``ground_truth``) resolved; a bad row is a one-line error."""
    if not path.is_file():
        raise FileNotFoundError(f"inputs file {path}: no such file")
    rows, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not JSON ({error})") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("id", "image", "prompt")
        ):
            raise ValueError(f"{path} line {number}: a row needs string id, image and prompt")
        if row["id"] in seen or "/" in row["id"]:
            raise ValueError(f"{path} line {number}: id {row['id']!r} is repeated or contains '/'")
        seen.add(row["id"])
        for field in ("image", "ground_truth"):
            if field in row:
                row[field] = path.parent / row[field]
                if not row[field].is_file():
                    raise FileNotFoundError(f"{path} line {number}: {field} {row[field]}: no such file")
        rows.append(row)
    return rows


def read_video(path: Path) -> torch.Tensor:
    """Every frame of a video file → ``3×T×H×W`` in [-1, 1]."""
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError) as error:
        raise ValueError(f"{path} could not be decoded as a video ({error})") from None
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return from_uint8_frames(np.stack(frames))


def _fit(video: torch.Tensor, height: int, width: int, frames: int) -> torch.Tensor:
    """``3×T×H×W`` → ``3×frames×height×width`` (first frames, bilinear resize)."""
    video = video[:, :frames]
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video.transpose(0, 1), size=(height, width), mode="bilinear", antialias=True)
        video = video.transpose(0, 1)
    return video


def write_side_by_side(path_a: Path, path_b: Path, out: Path, fps: float) -> Path:
    """A | B as one mp4: B resized to A's size (rounded down to even sides), both cut to the shorter."""
    a, b = read_video(path_a), read_video(path_b)
    height, width = a.shape[2] // 2 * 2, a.shape[3] // 2 * 2
    frames = min(a.shape[1], b.shape[1])
    pair = side_by_side(_fit(a, height, width, frames), _fit(b, height, width, frames))
    return write_mp4(out, to_uint8_frames(pair), fps=fps)


def write_pool(
    inputs: Path,
    out: Path,
    pipeline_config: Path | None,
    others: dict[str, Path],
    samples_per_input: int = 1,
    pairs_per_input: int = 2,
    seed: int = 0,
    fps: float = 24.0,
) -> Path:
    """Write the pool folder (see the module docstring); returns ``out/pairs.jsonl``."""
    rows = read_inputs(inputs)
    pipeline = None
    if pipeline_config is not None and samples_per_input > 0:
        from fsvideo.pipeline import FSVideoPipeline

        pipeline = FSVideoPipeline.from_config(pipeline_config)
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        key = row["id"]
        image = out / "images" / f"{key}{row['image'].suffix}"
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row["image"], image)
        candidates: dict[str, Path] = {}
        folder = out / "videos" / key
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(samples_per_input if pipeline is not None else 0):
            result = pipeline.generate(row["image"], row["prompt"], seed=seed + k)
            candidates[f"sft_{k}"] = write_mp4(folder / f"sft_{k}.mp4", result.frames_uint8(), fps=fps)
        for name, other in others.items():
            source = other / f"{key}.mp4"
            if source.is_file():
                candidates[name] = Path(shutil.copyfile(source, folder / f"{name}.mp4"))
        if "ground_truth" in row:
            candidates["ground_truth"] = Path(
                shutil.copyfile(row["ground_truth"], folder / "ground_truth.mp4")
            )
        combos = list(itertools.combinations(sorted(candidates), 2))
        rng.shuffle(combos)
        for number, combo in enumerate(combos[:pairs_per_input]):
            source_a, source_b = combo if rng.random() < 0.5 else combo[::-1]
            pair_id = f"{key}_{number:03d}"
            view = write_side_by_side(
                candidates[source_a], candidates[source_b], out / "side_by_side" / f"{pair_id}.mp4", fps
            )
            pairs.append(
                {
                    "pair_id": pair_id,
                    "id": key,
                    "prompt": row["prompt"],
                    "first_frame": _relative(image, out),
                    "video_a": _relative(candidates[source_a], out),
                    "video_b": _relative(candidates[source_b], out),
                    "source_a": source_a,
                    "source_b": source_b,
                    "side_by_side": _relative(view, out),
                    "preference": None,
                }
            )
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def parse_others(values: Sequence[str]) -> dict[str, Path]:
    """``NAME=DIR`` arguments → {name: folder}; names must be unique and not clash with our own sources."""
    others: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--other takes NAME=DIR, got {value!r}")
        if name in others or name == "ground_truth" or name.startswith("sft_") or "/" in name:
            raise ValueError(f"--other name {name!r} is repeated or reserved (ground_truth, sft_*)")
        if not Path(folder).is_dir():
            raise ValueError(f"--other {name}: {folder} is not a directory of <id>.mp4 videos")
        others[name] = Path(folder)
    return others

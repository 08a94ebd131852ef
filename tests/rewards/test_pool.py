"""`fsvideo rewards pool`: SFT generations, other models' videos and the ground truth become pairs to label,
each with a side-by-side mp4; the labelled file is what the preference-pairs DataModule reads."""

from __future__ import annotations

import json

import numpy as np
from run_dirs import FRAMES, HEIGHT, WIDTH, write_test_image, write_tiny_runs

from cli import main
from datamodules.preference_pairs import PreferencePairs, read_pairs
from datamodules.skips import SkipCounter
from fsvideo.rewards.pool import read_video
from fsvideo.video_io import write_mp4


def _clip(frames: int, height: int, width: int, value: int) -> np.ndarray:
    return np.full((frames, height, width, 3), value, dtype=np.uint8)


def test_pool_writes_pairs_and_side_by_side_videos(tmp_path, capsys):
    pipeline = write_tiny_runs(tmp_path / "runs")
    inputs_dir = tmp_path / "inputs"
    inputs_dir.mkdir()
    write_test_image(inputs_dir / "0001.png")
    write_mp4(inputs_dir / "0001_gt.mp4", _clip(7, 96, 48, 200), fps=24)  # longer and smaller than ours
    other = tmp_path / "other_model"
    write_mp4(other / "0001.mp4", _clip(FRAMES, HEIGHT, WIDTH, 30), fps=24)
    row = {
        "id": "0001",
        "image": "0001.png",
        "prompt": "a cat walks across the garden",
        "ground_truth": "0001_gt.mp4",
    }
    (inputs_dir / "inputs.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "pool"

    main(
        [
            "rewards",
            "pool",
            f"--inputs={inputs_dir / 'inputs.jsonl'}",
            f"--pipeline={pipeline}",
            f"--other=wan={other}",
            "--pairs-per-input=3",
            f"--out={out}",
        ]
    )

    assert "wrote 3 pairs" in capsys.readouterr().out
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3  # every pair of {sft_0, wan, ground_truth}
    assert {frozenset((p["source_a"], p["source_b"])) for p in pairs} == {
        frozenset(c) for c in (("sft_0", "wan"), ("sft_0", "ground_truth"), ("wan", "ground_truth"))
    }
    for pair in pairs:
        assert pair["preference"] is None and pair["prompt"] == row["prompt"]
        a, view = read_video(out / pair["video_a"]), read_video(out / pair["side_by_side"])
        assert view.shape[2] == a.shape[2] and view.shape[3] == 2 * a.shape[3]  # A | B at A's size
    generated = read_video(out / "videos" / "0001" / "sft_0.mp4")
    assert generated.shape[1:] == (FRAMES, HEIGHT, WIDTH)

    # labelled, the file feeds reward finetuning
    labelled = "".join(json.dumps(p | {"preference": "A"}) + "\n" for p in pairs)
    (out / "pairs.jsonl").write_text(labelled)
    skipped = SkipCounter()
    dataset = PreferencePairs(read_pairs(out / "pairs.jsonl", skipped), FRAMES, 56, 56, 24.0)
    sample = dataset[0]
    assert sample["video_a"].shape == (3, FRAMES, 56, 56) and sample["first_frame"].shape == (3, 56, 56)
    assert sum(skipped.counts.values()) == 0

"""The preference-pairs DataModule: bad rows and undecodable videos are skipped and counted, never fatal."""

from __future__ import annotations

import json

import torch

from datamodules.preference_pairs import PreferencePairsDataModule
from fsvideo.rewards.preference import A_PREFERRED, MISSING, TIE
from fsvideo.rewards.synthetic import write_brightness_pairs


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_brightness_pairs(tmp_path, pairs=2, seed=0, ties=1)
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video")
    good = [json.loads(line) for line in path.read_text().splitlines()]
    bad = [
        "{not json",
        json.dumps(good[0] | {"preference": "maybe"}),
        json.dumps(good[0] | {"video_b": "videos/missing.mp4"}),
        json.dumps(good[0] | {"video_b": "videos/broken.mp4"}),
    ]
    first = good[0] | {"VQ": "A", "TA": "tie"}
    path.write_text("\n".join([json.dumps(first), *bad, *map(json.dumps, good[1:])]) + "\n")
    clean = write_brightness_pairs(tmp_path / "train", pairs=2, seed=1)
    data = PreferencePairsDataModule(
        str(clean), str(path), num_frames=4, height=56, width=56, fps=8.0, batch_size=8, num_workers=0
    )
    data.setup("fit")

    assert data.skipped.counts == {"json": 2, "no_media": 1}
    batch = next(iter(data.val_dataloader()))
    assert data.skipped.counts["decode"] == 1  # the broken video, when its batch was built
    assert batch["skipped"]["data/skipped_total"] == 4
    assert batch["video_a"].shape == (3, 3, 4, 56, 56) and batch["first_frame"].shape == (3, 3, 56, 56)
    assert batch["preference"][2] == TIE and len(batch["prompts"]) == 3
    assert batch["dimensions"][0].tolist() == [A_PREFERRED, MISSING, TIE]
    torch.testing.assert_close(batch["first_frame"], batch["video_a"][:, :, 0])  # no image: frame 0 of A

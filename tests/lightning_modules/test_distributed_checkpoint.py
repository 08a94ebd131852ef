"""Distributed checkpoints (`trainer.strategy.save_distributed_checkpoint: true`, issue 18): two gloo processes
training the tiny DiT with FSDP2 write one DCP folder per save (each rank its shards, rank 0 `meta.pt` with the
network manifest); the run resumes from one on two processes exactly (the weights and optimizer state equal
those of the run that went on uninterrupted), resumes on one process (data position re-split), and exports, in
one process without a process group, to the folder a one-file checkpoint of the same state exports to. Every
rank resumes its own random generators, so the resumed losses are those of the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from run_dirs import latent_cache_args, tiny_fit_args
from safetensors.torch import load_file
from two_process import SHARDED_FIT_ARGS, run_cli

from callbacks.checkpoint_io import DCP_REPLACED, swap_in_checkpoint
from fsvideo.checkpoints import (
    DistributedCheckpointWeights,
    check_distributed_checkpoint,
    find_run_checkpoint,
    is_distributed_checkpoint,
    load_checkpoint_metadata,
)
from fsvideo.dit import DiT
from fsvideo.export import export_run
from fsvideo.pretrained import load_network


def fit(run_dir: Path, cache: Path, max_steps: int, processes: int, *extra: str) -> None:
    args = [
        *tiny_fit_args("dit-pretrain-video.yaml", run_dir, max_steps),
        *SHARDED_FIT_ARGS,
        f"--trainer.devices={processes}",
        f"--trainer.strategy.data_parallel_size={processes}",
        "--trainer.strategy.save_distributed_checkpoint=true",
        "--trainer.callbacks=[step_recorder.StepRecorder]",
        "--checkpoint.every_n_train_steps=2",
        "--checkpoint.filename=step-{step}",
        "--checkpoint.auto_insert_metric_name=false",
        *latent_cache_args(cache),
        "--model.init_args.init_from=null",
        "--model.init_args.dit.latent_channels=8",
        *extra,
    ]
    run_cli(args, cwd=run_dir.parent)


def recorded_losses(run_dir: Path, steps: set[int]) -> list[tuple]:
    """(step, sample keys, loss) of every rank's steps in ``steps`` (ranks append in either order)."""
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return sorted((r["step"], r["keys"], r["metrics"]["train/loss"]) for r in rows if r["step"] in steps)


def dcp_state(folder: Path) -> dict[str, torch.Tensor]:
    return dict(DistributedCheckpointWeights(folder).items())


@pytest.mark.slow(minutes=1.5)
def test_distributed_checkpoint_resumes_exactly_on_two_processes_on_one_and_exports(tiny_latents, tmp_path):
    """One test for the three runs: both resumes start from the straight run, which a fixture would build again
    on every xdist worker that ran one of them."""
    cache = tiny_latents.train.root
    straight = tmp_path / "straight"  # 2 processes, 4 steps, a distributed checkpoint every 2
    fit(straight, cache, 4, 2)
    checkpoints = straight / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-2.ckpt", "step-4.ckpt"]
    for name in ("last.ckpt", "step-2.ckpt"):
        assert is_distributed_checkpoint(checkpoints / name)
        assert sorted(p.name for p in (checkpoints / name).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "meta.pt",
        ], "each rank writes its own shards; no staging folder is left"
    assert find_run_checkpoint(straight) == checkpoints / "last.ckpt"
    meta = load_checkpoint_metadata(checkpoints / "last.ckpt")
    assert meta["global_step"] == 4 and set(meta["networks"]) == {"dit"}
    assert "state_dict" not in meta and "optimizer_states" not in meta
    final = dcp_state(checkpoints / "step-4.ckpt")

    # exact resume on two processes from the step-2 folder; this run saves one file at step 4
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoints / "step-2.ckpt", resumed / "checkpoints" / "step-2.ckpt")
    fit(
        resumed,
        cache,
        4,
        2,
        f"--ckpt_path={resumed / 'checkpoints' / 'step-2.ckpt'}",
        "--trainer.strategy.save_distributed_checkpoint=false",
    )
    straight_losses, resumed_losses = recorded_losses(straight, {3, 4}), recorded_losses(resumed, {3, 4})
    assert [r[:2] for r in resumed_losses] == [r[:2] for r in straight_losses], "the same samples per rank"
    for (_, _, a), (_, _, b) in zip(straight_losses, resumed_losses):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    one_file = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert one_file["global_step"] == 4
    assert final.keys() == one_file["state_dict"].keys()
    for name, tensor in final.items():
        torch.testing.assert_close(one_file["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # the DCP folder exports (here, no process group) to the folder that the one-file checkpoint exports to
    from_dcp = export_run(checkpoints / "step-4.ckpt", tmp_path / "export-dcp")["dit"]
    from_file = export_run(resumed / "checkpoints" / "last.ckpt", tmp_path / "export-file")["dit"]
    assert (from_dcp / "config.json").read_text() == (from_file / "config.json").read_text()
    a, b = load_file(from_dcp / "model.safetensors"), load_file(from_file / "model.safetensors")
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    network = load_network(checkpoints / "step-4.ckpt", expected=DiT)  # every reader takes the folder itself
    torch.testing.assert_close(network.state_dict()["head.proj.weight"], a["head.proj.weight"])

    # DCP reshards the two ranks' shards for one process; the data position is re-split
    single = tmp_path / "single"
    shutil.copytree(checkpoints / "step-2.ckpt", single / "checkpoints" / "step-2.ckpt")
    fit(single, cache, 4, 1, f"--ckpt_path={single / 'checkpoints' / 'step-2.ckpt'}")
    after = dcp_state(single / "checkpoints" / "last.ckpt")
    start = dcp_state(checkpoints / "step-2.ckpt")
    assert load_checkpoint_metadata(single / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert sorted(p.name for p in (single / "checkpoints" / "last.ckpt").iterdir())[-2:] == [
        "__0_0.distcp",
        "meta.pt",
    ]
    moved = [not torch.equal(after[k], v) for k, v in start.items() if k.startswith("dit.")]
    assert sum(moved) > len(moved) // 2, "the resumed run must go on training"


def test_incomplete_distributed_checkpoint_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "last.ckpt"
    state = {"state_dict": {"dit.weight": torch.ones(2, 3)}}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"networks": {}}, folder / "meta.pt")
    check_distributed_checkpoint(folder)
    assert torch.equal(dcp_state(folder)["dit.weight"], torch.ones(2, 3))
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard files \['__0_0.distcp'\] of 1 are missing"):
        load_checkpoint_metadata(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(
        FileNotFoundError, match="no .metadata; the distributed checkpoint folder is incomplete"
    ):
        export_run(folder, tmp_path / "out")


def test_swap_replaces_a_checkpoint_folder_or_file_whole(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for old in ("folder", "file"):
        path = checkpoints / f"last-{old}.ckpt"
        if old == "folder":
            (path / "old").mkdir(parents=True)
        else:
            path.write_bytes(b"one-file checkpoint")
        staging = checkpoints / ".dcp-staging"
        staging.mkdir()
        (staging / "meta.pt").write_bytes(b"new")
        swap_in_checkpoint(staging, path)
        assert sorted(p.name for p in path.iterdir()) == ["meta.pt"]
        assert not staging.exists() and not (checkpoints / DCP_REPLACED).exists()

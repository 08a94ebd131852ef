"""DiT samples during training: a real 2-step fit of a tiny DiTModule on a latent cache of the sample data
writes side-by-side mp4s of the held-out clips; generation is seeded, uses the EMA weights only, leaves the
module's modes and the global random states alone, and autocasts without touching the weights."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import av
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from run_dirs import write_dit_stage_checkpoint, write_fsae_run
from two_process import REPO, SHARDED_FIT_ARGS, run_cli

from callbacks.dit_samples import DiTSamples, read_held_out_clips
from callbacks.videos import save_videos
from datamodules.buckets import BucketConfig
from datamodules.latent_cache import LatentCache
from datamodules.latent_encoder import EncoderPaths
from datamodules.latent_writer import encode_shards
from datamodules.latents import LatentDataModule
from fsvideo.dit import DiTConfig
from lightning_modules.dit import DiTModule

FRAMES, SIZE, STEPS = 5, 64, 2
SAMPLE_ARGS = {
    "num_samples": 2,
    "num_frames": FRAMES,
    "height": SIZE,
    "width": SIZE,
    "steps": STEPS,
    "fps": 8.0,
}


@pytest.fixture(scope="module")
def cache(sample_shards, tiny_encoders, tmp_path_factory) -> LatentCache:
    """A latent cache of the validation shard (64² bucket, 5 frames) by a random FSAE and the tiny encoders."""
    root = tmp_path_factory.mktemp("dit_samples_cache")
    return encode_shards(
        write_fsae_run(root / "fsae"),
        sample_shards.val,
        root / "cache",
        text_encoder=tiny_encoders["text"],
        image_encoder=tiny_encoders["image"],
        text_len=16,
        buckets=BucketConfig(size=SIZE),
        num_frames=FRAMES,
        validation=True,
    )


@pytest.fixture(scope="module")
def fitted(cache, sample_shards, tmp_path_factory) -> SimpleNamespace:
    """A tiny DiTModule fitted for 2 steps (EMA decay 0.5) on ``cache`` (train and validation read the same
    cache), with the DiTSamples callback at its first validation."""
    root = tmp_path_factory.mktemp("dit_samples")
    torch.manual_seed(0)
    module = DiTModule(DiTConfig.tiny(), ema_decay=0.5)
    data = LatentDataModule(
        str(cache.root),
        str(cache.root),
        num_workers=0,
        image_fraction=0.0,
        batches_per_epoch=2,
        val_batches=1,
    )
    callback = DiTSamples(**SAMPLE_ARGS)
    trainer = L.Trainer(
        default_root_dir=root / "run",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=data)
    return SimpleNamespace(
        trainer=trainer, module=module, callback=callback, cache=cache, shards=sample_shards
    )


def read_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def videos(samples) -> list[torch.Tensor]:
    return [s.video for s in samples]


def test_fit_writes_side_by_side_samples_with_prompts(fitted):
    folder = Path(fitted.trainer.default_root_dir) / "samples" / "step-0000002"
    record = json.loads((folder / "prompts.json").read_text())
    assert [s["file"] for s in record["samples"]] == ["00.mp4", "01.mp4"]
    assert [s["seed"] for s in record["samples"]] == [0, 1]
    clips = read_held_out_clips(fitted.shards.val, 2, FRAMES, SIZE, SIZE, 8.0)
    assert [s["prompt"] for s in record["samples"]] == [c.prompt for c in clips]
    for name, clip in zip(("00.mp4", "01.mp4"), clips):
        frames = read_mp4(folder / name)
        assert frames.shape == (FRAMES, SIZE, 2 * SIZE, 3)  # ground truth | generated
        truth = torch.from_numpy(frames[..., :SIZE, :]).permute(3, 0, 1, 2).float() / 127.5 - 1
        assert (truth - clip.video).abs().mean() < 0.05  # the left half is the held-out clip (lossy mp4)
        assert frames[..., SIZE:, :].std() > 1.0  # the right half is a generated picture, not a blank


def test_samples_are_seeded_and_reproducible(fitted):
    first = videos(fitted.callback.generate(fitted.trainer, fitted.module))
    second = videos(fitted.callback.generate(fitted.trainer, fitted.module))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    for video in first:
        assert video.shape == (3, FRAMES, SIZE, SIZE) and video.abs().max() <= 1


def test_samples_use_the_ema_weights(fitted):
    module = fitted.module
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    baseline = videos(fitted.callback.generate(fitted.trainer, module))
    generator = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in module.dit.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
        raw_perturbed = videos(fitted.callback.generate(fitted.trainer, module))
        assert all(torch.equal(a, b) for a, b in zip(baseline, raw_perturbed))
        with torch.no_grad():
            for p in module.dit_ema.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
        ema_perturbed = videos(fitted.callback.generate(fitted.trainer, module))
        assert all((a - b).abs().max() > 1e-2 for a, b in zip(baseline, ema_perturbed))
    finally:
        module.load_state_dict(saved)


def test_global_random_states_untouched_including_first_load(fitted):
    callback = DiTSamples(**SAMPLE_ARGS, folder="samples-rng")  # loads its networks inside the measured call
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    callback.on_validation_epoch_end(fitted.trainer, fitted.module)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert (Path(fitted.trainer.default_root_dir) / "samples-rng" / "step-0000002" / "01.mp4").is_file()


@pytest.mark.parametrize("training", [True, False])
def test_module_modes_and_trainable_flags_restored_without_ema(fitted, training):
    """With EMA off the pipeline gets the training DiT itself, which it puts in eval mode and freezes."""
    module = DiTModule(DiTConfig.tiny(), ema_decay=0.0)
    module.set_latent_stats(fitted.cache.stats)
    module.train(training)
    modes = [m.training for m in module.modules()]
    samples = fitted.callback.generate(fitted.trainer, module)
    assert len(samples) == 2
    assert [m.training for m in module.modules()] == modes
    assert all(p.requires_grad for p in module.dit.parameters())


def test_bf16_precision_autocasts_without_casting_the_weights(fitted):
    module = fitted.module
    full = videos(fitted.callback.generate(fitted.trainer, module))
    bf16_trainer = SimpleNamespace(precision="bf16-mixed", datamodule=fitted.trainer.datamodule)
    mixed = videos(fitted.callback.generate(bf16_trainer, module))
    assert all(p.dtype == torch.float32 for p in module.dit_ema.parameters())
    differences = [(a - b).abs().max().item() for a, b in zip(full, mixed)]
    assert all(0 < d < 0.5 for d in differences), differences


def test_schedule_counts_validations_and_survives_resume():
    callback = DiTSamples(every_n_validations=2)
    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING))
    assert [callback._due(trainer) for _ in range(3)] == [True, False, True]
    resumed = DiTSamples(every_n_validations=2)
    resumed.load_state_dict(callback.state_dict())
    assert [resumed._due(trainer) for _ in range(2)] == [False, True]
    assert not resumed._due(SimpleNamespace(sanity_checking=True))
    assert resumed._due(
        SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    )


def test_clear_errors_for_missing_paths_and_unusable_shards(sample_shards):
    with pytest.raises(ValueError, match="init_args.encoders"):
        DiTSamples().networks(SimpleNamespace(datamodule=None))
    moved = EncoderPaths("/nonexistent/fsae", "/nonexistent/text", "/nonexistent/image")
    with pytest.raises(ValueError, match="cannot load .* set the callback's init_args.encoders"):
        DiTSamples(encoders=moved).networks(SimpleNamespace(datamodule=None))
    with pytest.raises(ValueError, match="init_args.shards"):
        DiTSamples().held_out_clips(SimpleNamespace(datamodule=None))
    with pytest.raises(ValueError, match="no usable video clip.*'small': 4"):
        read_held_out_clips(sample_shards.val, 2, FRAMES, 1024, 1024, 8.0)
    with pytest.raises(ValueError, match="num_frames=6 is not 1 \\+ 4k"):
        DiTSamples(num_frames=6)


def test_save_videos_writes_numbered_files_and_checks_captions(tmp_path):
    trainer = SimpleNamespace(loggers=[], global_step=0)
    video = torch.linspace(-1, 1, 3 * 5 * 8 * 8).reshape(3, 5, 8, 8)
    paths = save_videos(trainer, [video, -video], tmp_path / "out", "val/x", captions=["a", "b"])
    assert [p.name for p in paths] == ["00.mp4", "01.mp4"]
    assert read_mp4(paths[1]).shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match="one caption per video"):
        save_videos(trainer, [video], tmp_path / "bad", "val/x", captions=["a", "b"])


def cli_fit(run_dir: Path, cache: LatentCache, init_from: Path, *extra: str) -> Path:
    """``fsvideo fit`` of the tiny video stage for 2 steps at learning rate 0 (the EMA stays ``init_from``'s),
    with DiTSamples as its only callback; returns the step-2 samples folder."""
    callbacks = {"class_path": "callbacks.dit_samples.DiTSamples", "init_args": SAMPLE_ARGS}
    (run_dir.parent / "samples.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [callbacks]}}))
    args = [
        "fit",
        "--config",
        str(REPO / "configs/tiny/dit-pretrain-video.yaml"),
        "--config",
        str(run_dir.parent / "samples.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--wandb.mode=disabled",
        f"--data.init_args.train_cache={cache.root}",
        f"--data.init_args.val_cache={cache.root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=2",
        "--data.init_args.val_batches=1",
        f"--model.init_args.init_from={init_from}",
        "--model.init_args.dit.latent_channels=8",
        "--model.init_args.optimizer.lr=0",
        "--model.init_args.optimizer.warmup_steps=0",
        *extra,
    ]
    run_cli(args, cwd=run_dir.parent)
    return run_dir / "samples" / "step-0000002"


@pytest.mark.slow
def test_sharded_dit_samples_on_every_rank_equal_unsharded(cache, tmp_path):
    """With FSDP2 (two gloo processes) every rank must join the sharded forwards; the videos are those of the
    same weights unsharded."""
    init_from = tmp_path / "init.ckpt"
    write_dit_stage_checkpoint(init_from, cache.stats)
    plain = cli_fit(tmp_path / "plain", cache, init_from)
    sharded = cli_fit(
        tmp_path / "sharded",
        cache,
        init_from,
        *SHARDED_FIT_ARGS,
    )
    for name in ("00.mp4", "01.mp4"):
        assert np.array_equal(read_mp4(plain / name), read_mp4(sharded / name))

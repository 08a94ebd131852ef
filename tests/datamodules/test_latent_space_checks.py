"""A DiT is bound to the latent space of its training data (FSAE encoder, text / image encoders, text length):
its checkpoints record it, and training, resuming or generating with another one is refused, while chained
stages and FSAE Standard / Lite decoders (same frozen encoder) are accepted."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from run_dirs import SMALL_FSAE, write_fsae_run

from datamodules.buckets import BucketConfig
from datamodules.latent_encoder import EncoderPaths
from datamodules.latent_writer import encode_shards
from datamodules.latents import EncodingVideoDataModule
from fsvideo.pipeline import FSVideoPipeline, PipelineConfig
from lightning_modules.cli import FSVideoCLI

REPO = Path(__file__).resolve().parents[2]
CACHE_ARGS = {"text_len": 16, "buckets": BucketConfig(size=64), "num_frames": 5, "batch_size": 4}


def fit(run_dir: Path, train_cache: Path, *extra: str) -> FSVideoCLI:
    """One step of the tiny video stage on ``train_cache``."""
    return FSVideoCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "configs" / "tiny" / "dit-pretrain-video.yaml"),
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=1",
            "--wandb.mode=disabled",
            f"--data.init_args.train_cache={train_cache}",
            "--data.init_args.val_cache=null",
            "--data.init_args.num_workers=0",
            "--data.init_args.batches_per_epoch=1",
            "--model.init_args.dit.latent_channels=8",
            "--model.init_args.init_from=null",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def made(sample_shards, tiny_encoders, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("latent_space")
    fsae = write_fsae_run(root / "fsae", seed=0)
    standard = write_fsae_run(
        root / "standard", SMALL_FSAE.with_decoder_variant("standard"), 7, encoder_of=fsae
    )
    other = write_fsae_run(root / "other", seed=1)
    conditions = {"text_encoder": tiny_encoders["text"], "image_encoder": tiny_encoders["image"]}
    first, second = (str(sample_shards.root / f"train-00000{i}.tar") for i in (0, 1))
    image = encode_shards(fsae, first, root / "image", **conditions, **CACHE_ARGS)
    # the next stage's cache, encoded by the Standard decoder's run: another FSAE file, the same encoder
    video = encode_shards(standard, second, root / "video", **conditions, **CACHE_ARGS)
    foreign = encode_shards(other, first, root / "foreign", **conditions, **CACHE_ARGS)
    dit = root / "dit"
    fit(dit, image.root)
    return SimpleNamespace(
        root=root,
        fsae=fsae,
        standard=standard,
        other=other,
        encoders=tiny_encoders,
        image=image,
        video=video,
        foreign=foreign,
        dit=dit,
        checkpoint=dit / "checkpoints" / "last.ckpt",
    )


def test_latent_space_is_the_encoders_not_the_decoder(made, sample_shards):
    assert made.image.latent_space == made.video.latent_space
    assert made.image.fingerprint["encoders"] != made.video.fingerprint["encoders"]
    assert made.image.latent_space.differences(made.foreign.latent_space) == ["autoencoder.encoder_sha256"]
    # encoding on the fly describes its latent space with the same function as the cache writer
    paths = EncoderPaths(
        str(made.standard), str(made.encoders["text"]), str(made.encoders["image"]), text_len=16
    )
    module = EncodingVideoDataModule(
        paths, str(made.image.root), train_shards=sample_shards.val, num_workers=0, num_frames=5
    )
    module.setup("fit")
    assert module.latent_space == made.image.latent_space
    longer = dataclasses.replace(paths, text_len=32)
    module = EncodingVideoDataModule(
        longer, str(made.image.root), train_shards=sample_shards.val, num_workers=0, num_frames=5
    )
    module.setup("fit")
    assert module.latent_space.differences(made.image.latent_space) == ["text_len"]


def test_checkpoint_records_latent_space_and_chained_stage_is_accepted(made):
    record = torch.load(made.checkpoint, weights_only=True)["networks"]["dit"]["records"]["latent_space"]
    assert record["fields"] == made.image.latent_space.fields
    assert record["source"] == f"latent cache {made.image.root}"
    chained = made.root / "chained"
    fit(chained, made.video.root, f"--model.init_args.init_from={made.checkpoint}")
    record = torch.load(chained / "checkpoints" / "last.ckpt", weights_only=True)["networks"]["dit"][
        "records"
    ]
    record = record["latent_space"]
    assert record["fields"] == made.image.latent_space.fields


def test_fit_refuses_data_of_another_latent_space(made):
    with pytest.raises(
        ValueError,
        match=r"image\) and latent cache .*foreign .*\['autoencoder.encoder_sha256'\] differ.*init_from",
    ):
        fit(made.root / "refused", made.foreign.root, f"--model.init_args.init_from={made.checkpoint}")
    with pytest.raises(ValueError, match="latent cache .*foreign.*resume on the data"):
        fit(made.dit, made.foreign.root, "--trainer.max_steps=2", f"--ckpt_path={made.checkpoint}")


def test_checkpoint_without_record_is_accepted_with_a_warning(made):
    checkpoint = torch.load(made.checkpoint, weights_only=True)
    del checkpoint["networks"]["dit"]["records"]["latent_space"]
    old = made.dit / "checkpoints" / "no-record.ckpt"
    torch.save(checkpoint, old)
    with pytest.warns(UserWarning, match="records no latent space"):
        fit(made.root / "from-old", made.foreign.root, f"--model.init_args.init_from={old}")
    with pytest.warns(UserWarning, match="records no latent space"):
        fit(made.root / "resume-old", made.foreign.root, "--trainer.max_steps=2", f"--ckpt_path={old}")
    # the pipeline cannot check a DiT without a record either: any FSAE of the right shape loads
    config = PipelineConfig(
        str(made.other), str(old), str(made.encoders["text"]), str(made.encoders["image"]), 16, device="cpu"
    )
    FSVideoPipeline.from_config(config)


def test_pipeline_refuses_an_fsae_or_text_length_the_dit_did_not_train_with(made):
    def config(autoencoder: Path, text_len: int = 16) -> PipelineConfig:
        encoders = str(made.encoders["text"]), str(made.encoders["image"])
        return PipelineConfig(str(autoencoder), str(made.dit), *encoders, text_len, device="cpu")

    assert FSVideoPipeline.from_config(config(made.fsae)).autoencoder.config == SMALL_FSAE
    FSVideoPipeline.from_config(config(made.standard))  # the Standard decoder of the same encoder
    with pytest.raises(ValueError, match=r"\['autoencoder.encoder_sha256'\] differ.*latent cache"):
        FSVideoPipeline.from_config(config(made.other))
    with pytest.raises(ValueError, match=r"\['text_len'\] differ"):
        FSVideoPipeline.from_config(config(made.fsae, text_len=32))

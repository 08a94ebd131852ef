"""Saved-model folders: save / load round trips, sharding, export from runs, records, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from run_dirs import write_network_run, write_test_image, write_tiny_runs

from cli import main
from fsvideo.ae import FSAE, FSAEConfig
from fsvideo.dit import DiT, DiTConfig
from fsvideo.export import export_run
from fsvideo.latent_space import LatentStats
from fsvideo.pipeline import FSVideoPipeline, PipelineConfig, read_latent_stats
from fsvideo.pretrained import (
    CONFIG_FILE,
    INDEX_FILE,
    WEIGHTS_FILE,
    load_network,
    read_records,
    snapshot_names,
)


def random_dit(seed: int = 0) -> DiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = DiT(DiTConfig.tiny())
        with torch.no_grad():  # off the zero-initialised head, so outputs depend on every weight
            for param in dit.parameters():
                param.add_(0.05 * torch.randn(param.shape))
    return dit


def dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    config = DiTConfig.tiny()
    latent_in = torch.randn(1, config.in_channels, 3, 2, 2, generator=g)
    return (
        latent_in,
        torch.tensor([0.4]),
        torch.randn(1, 6, config.text_dim, generator=g),
        torch.randn(1, 5, config.image_dim, generator=g),
    )


def test_dit_and_fsae_round_trip_bit_identically(tmp_path):
    dit = random_dit()
    records = {"latent_stats": LatentStats([0.5] * 8, [2.0] * 8, 0).record()}
    dit.save_pretrained(tmp_path / "dit", records=records)
    assert {p.name for p in (tmp_path / "dit").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    loaded = DiT.from_pretrained(tmp_path / "dit")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config == dit.config
    with torch.no_grad():
        assert torch.equal(loaded(*dit_inputs()), dit.eval()(*dit_inputs()))
    assert read_records(tmp_path / "dit") == records
    mean, std = read_latent_stats(tmp_path / "dit")
    assert mean.tolist() == [0.5] * 8 and std.tolist() == [2.0] * 8

    torch.manual_seed(0)
    autoencoder = FSAE(FSAEConfig.tiny())
    autoencoder.init_weights()
    autoencoder.save_pretrained(tmp_path / "fsae")
    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            FSAE.from_pretrained(tmp_path / "fsae").encode(video), autoencoder.eval().encode(video)
        )


def test_large_networks_are_sharded_with_an_index(tmp_path):
    dit = random_dit()
    dit.save_pretrained(tmp_path / "dit", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "dit" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "dit" / WEIGHTS_FILE).exists()
    assert set(index["weight_map"]) == set(dit.state_dict())
    total = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    assert index["metadata"]["total_size"] == total
    with torch.no_grad():
        assert torch.equal(load_network(tmp_path / "dit", DiT)(*dit_inputs()), dit.eval()(*dit_inputs()))
    # saving again in one piece leaves no stale shard behind
    dit.save_pretrained(tmp_path / "dit")
    assert sorted(p.name for p in (tmp_path / "dit").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_export_writes_the_ema_weights_of_a_run_and_reads_the_same_as_the_run(tmp_path):
    trained, ema = random_dit(0), random_dit(1)
    records = {"latent_stats": LatentStats([0.0] * 8, [1.0] * 8, 0).record()}
    run = write_network_run(tmp_path / "run", "dit", trained, ema=ema, records=records)
    assert snapshot_names(run) == ["dit"]
    written = export_run(run, tmp_path / "out")
    assert written == {"dit": tmp_path / "out" / "dit"}
    raw = export_run(run, tmp_path / "raw", raw=True)["dit"]
    inputs = dit_inputs()
    with torch.no_grad():
        expected_ema, expected_raw = ema.eval()(*inputs), trained.eval()(*inputs)
        assert torch.equal(DiT.from_pretrained(written["dit"])(*inputs), expected_ema)
        assert torch.equal(DiT.from_pretrained(raw)(*inputs), expected_raw)
        # one loader: the run itself (directory or checkpoint) gives the same network
        for source in (run, run / "checkpoints" / "last.ckpt"):
            assert torch.equal(DiT.from_pretrained(source)(*inputs), expected_ema)
    assert read_records(written["dit"]) == records


def test_export_command(tmp_path, capsys):
    run = write_network_run(tmp_path / "run", "dit", random_dit())
    main(["export", str(run), "--out", str(tmp_path / "models")])
    assert "dit: " in capsys.readouterr().out
    assert (tmp_path / "models" / "dit" / CONFIG_FILE).is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), "--out", str(tmp_path / "models"), "--name", "refiner"])
    assert exit_info.value.code == 2
    assert "holds no network ['refiner']" in capsys.readouterr().err


def test_torn_foreign_and_mismatched_files_are_one_line_errors(tmp_path):
    dit = random_dit()
    folder = dit.save_pretrained(tmp_path / "dit", max_shard_bytes=64 * 1024)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    torn = shard.read_bytes()[:100]
    shard.write_bytes(torn)
    with pytest.raises(ValueError, match=f"{shard.name} could not be read as safetensors"):
        load_network(folder)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: no such weight file"):
        load_network(folder)

    foreign = tmp_path / "diffusers"
    foreign.mkdir()
    (foreign / CONFIG_FILE).write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(ValueError, match="not an fsvideo saved-model config"):
        load_network(foreign)
    (foreign / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="could not be read as a saved-model config"):
        load_network(foreign)

    fsae_folder = FSAE(FSAEConfig.tiny()).save_pretrained(tmp_path / "fsae")
    with pytest.raises(ValueError, match="holds a FSAE, not a DiT"):
        DiT.from_pretrained(fsae_folder)
    wider = DiT(DiTConfig.tiny(dim=96, num_heads=4))
    wider_folder = wider.save_pretrained(tmp_path / "wider")
    meta = json.loads((wider_folder / CONFIG_FILE).read_text())
    meta["config"]["dim"] = DiTConfig.tiny().dim
    meta["config"]["num_heads"] = DiTConfig.tiny().num_heads
    (wider_folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit this DiT: shape mismatch"):
        load_network(wider_folder)

    no_manifest = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"dit.{k}": v for k, v in dit.state_dict().items()}}, no_manifest)
    with pytest.raises(ValueError, match="names no networks"):
        load_network(no_manifest)
    with pytest.raises(FileNotFoundError, match="no such saved-model folder, run directory or checkpoint"):
        load_network(tmp_path / "nowhere")


def test_pipeline_runs_from_exported_folders_alone(tmp_path):
    config_path = write_tiny_runs(tmp_path / "runs")
    config = PipelineConfig.from_yaml(config_path)
    image = write_test_image(tmp_path / "image.png")
    from_runs = FSVideoPipeline.from_config(config).generate(image, "a cat", steps=2)
    models = tmp_path / "models"
    export_run(config.autoencoder, models)
    export_run(config.dit, models)
    shutil.rmtree(tmp_path / "runs" / "fsae")
    shutil.rmtree(tmp_path / "runs" / "dit")
    folders = PipelineConfig(
        str(models / "autoencoder"),
        str(models / "dit"),
        config.text_encoder,
        config.image_encoder,
        config.text_len,
        device="cpu",
        generation=config.generation,
    )
    from_folders = FSVideoPipeline.from_config(folders).generate(image, "a cat", steps=2)
    assert torch.equal(from_folders.video, from_runs.video)
    assert [stage["name"] for stage in from_folders.stages] == ["encode", "dit", "decode"]
    assert from_folders.stages[1]["nfe"] == 4  # 2 steps × 2 guidance branches


def test_dit_training_starts_from_a_folder_with_its_latent_statistics(tmp_path):
    from lightning_modules.dit import DiTModule

    dit = random_dit()
    records = {"latent_stats": LatentStats([0.25] * 8, [3.0] * 8, 0).record()}
    folder = dit.save_pretrained(Path(tmp_path) / "dit", records=records)
    module = DiTModule(DiTConfig.tiny(), init_from=str(folder), ema_decay=0.5)
    assert all(torch.equal(a, b) for a, b in zip(module.dit.state_dict().values(), dit.state_dict().values()))
    assert module.latent_mean.tolist() == [0.25] * 8 and module.latent_std.tolist() == [3.0] * 8
    manifest = module.network_manifest()
    assert manifest["dit"]["weights"] == "dit" and manifest["dit"]["ema_weights"] == "dit_ema"
    assert manifest["dit"]["records"]["latent_stats"] == records["latent_stats"]

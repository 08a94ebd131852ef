"""``fsvideo generate``: the command writes a playable mp4 and a JSON of its settings."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from test_pipeline import HEIGHT, WIDTH, write_test_image, write_tiny_runs

from cli import main
from fsvideo.generate import generate_main


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline config of tiny random runs, input image)."""
    directory = tmp_path_factory.mktemp("generate")
    return write_tiny_runs(directory), write_test_image(directory / "image.png")


def test_generate_writes_mp4_and_settings(tiny_config, tmp_path, capsys):
    config, image = tiny_config
    out = tmp_path / "clips" / "cat.mp4"
    argv = ["--image", str(image), "--prompt", "a cat walks", "--out", str(out), "--config", str(config)]
    generate_main([*argv, "--seed", "3", "--frames", "9", "--sampler", "unipc", "--steps", "2"])
    with av.open(str(out)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == 9 and frames[0].shape == (HEIGHT, WIDTH, 3) and rate == 24
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a cat walks" and record["frames"] == 9
    settings = record["settings"]
    assert (settings["seed"], settings["num_frames"], settings["sampler"], settings["steps"]) == (
        3,
        9,
        "unipc",
        2,
    )
    assert settings["guidance_scale"] == 3.0  # from the config: flags override only what they name
    assert record["device"] == "cpu" and record["models"]["text_len"] == 16
    assert set(record["timings_s"]) == {"load", "encode", "dit", "decode"}
    printed = capsys.readouterr().out
    for stage in ("encode", "dit", "decode"):
        assert f"\n{stage} " in printed
    assert "2 unipc steps, 4 DiT calls" in printed


def test_generate_reports_bad_input_without_traceback(tiny_config, tmp_path, capsys):
    config, image = tiny_config
    base = ["generate", "--prompt", "a cat", "--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a.mp4")])
    assert exit_info.value.code == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--image", str(image), "--out", str(tmp_path / "b.mp4"), "--frames", "10"])
    assert "1 + 4·k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--image", str(image), "--out", str(tmp_path / "c.mp4"), "--device", "tpu7"])
    assert "unknown device 'tpu7'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--image", str(image), "--out", str(tmp_path / "c.gif")])
    assert "--out must name an .mp4 file" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("dit: [runs/dit\n")
    with pytest.raises(SystemExit):
        main(
            [*base[:-1], str(tmp_path / "bad.yaml"), "--image", str(image), "--out", str(tmp_path / "d.mp4")]
        )
    assert "bad.yaml is not valid YAML" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.json"))


def test_generate_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--image", "--prompt", "--out", "--config", "--seed", "--steps", "--frames", "--sampler"):
        assert flag in out

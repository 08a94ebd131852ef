"""Bad input ends in one line that names the problem and exit status 2: each case through ``cli.main`` as the
console script calls it, and the real ``fsvideo`` console script once with and once without ``--debug``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run_command

from cli import main

REPO = Path(__file__).resolve().parents[1]
FSVIDEO = Path(sys.executable).with_name("fsvideo")
TINY_FIT = ["fit", "--config", str(REPO / "configs/tiny/fsae-stage1.yaml"), "--wandb.mode=disabled"]
TINY_GENERATE = ["generate", "--prompt", "a cat", "--out", "cat.mp4"]

# (name, argv, words the error line must hold); the files these name are written by `bad_inputs`.
CASES = [
    ("truncated init_from", [*TINY_FIT, "--model.init_args.init_from=x.ckpt"], "x.ckpt could not be read"),
    ("frame count", [*TINY_FIT, "--data.init_args.num_frames=10"], "num_frames=10 is not 1 + 4k"),
    ("config not YAML", ["fit", "--config", "bad.yaml"], "not valid YAML"),
    ("config missing", ["fit", "--config", "nothere.yaml"], "nothere.yaml"),
    ("unreadable shard", ["data", "inspect", "garbage.tar"], "1 shard(s) could not be read"),
    (
        "image missing",
        [*TINY_GENERATE, "--config", str(REPO / "configs/pipeline/tiny-generate.yaml"), "--image", "no.png"],
        "no.png: no such file",
    ),
    ("run missing", ["report", "id", "--run", "a=runs/none", "--shards", "SHARDS"], "runs/none"),
]


def fsvideo(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "FSVIDEO_DEBUG"}
    environment.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", WANDB_SILENT="true")
    return run_command([str(FSVIDEO), *argv], cwd=cwd, env=environment, timeout=300)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """A folder holding the bad files CASES name."""
    cwd = tmp_path_factory.mktemp("bad_inputs")
    torch.save({"state_dict": {"autoencoder.w": torch.zeros(1000)}}, cwd / "x.ckpt")
    (cwd / "x.ckpt").write_bytes((cwd / "x.ckpt").read_bytes()[:2000])  # a copy cut short
    (cwd / "garbage.tar").write_bytes(bytes(range(256)) * 20)
    (cwd / "bad.yaml").write_text("trainer:\n  max_steps: [1\n model: 3\n")
    return cwd


def assert_one_error_line(stderr: str, words: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("fsvideo: error: ")]
    assert len(errors) == 1 and words in errors[0], stderr
    assert "--debug" in stderr


@pytest.mark.parametrize(
    ("argv", "words"), [(argv, words) for _, argv, words in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_without_traceback(argv, words, bad_inputs, sample_shards, capsys, monkeypatch):
    monkeypatch.delenv("FSVIDEO_DEBUG", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(bad_inputs)
    # a command's logging.basicConfig would leave a handler on this test's stderr, closed after it
    monkeypatch.setattr(logging.root, "handlers", [])
    with pytest.raises(SystemExit) as exit_info:
        main([sample_shards.val if arg == "SHARDS" else arg for arg in argv])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, words)


@pytest.mark.slow
def test_console_script_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    plain = fsvideo(["data", "inspect", "gone.tar"], tmp_path)
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert_one_error_line(plain.stdout + plain.stderr, "1 shard(s) could not be read")
    debug = fsvideo(["data", "inspect", "--debug", "gone.tar"], tmp_path)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ValueError: 1 shard(s) could not be read" in debug.stderr


def test_debug_environment_variable_raises_the_error_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("FSVIDEO_DEBUG", "1")
    with pytest.raises(ValueError, match="1 shard\\(s\\) could not be read"):
        main(["data", "inspect", str(tmp_path / "gone.tar")])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.delenv("FSVIDEO_DEBUG", raising=False)
    monkeypatch.setattr("datamodules.commands.inspect_shards", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "inspect", "any.tar"])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["fitt"], "invalid choice: 'fitt'"),
        ([*TINY_FIT, "--trainer.max_steps=abc"], "trainer.max_steps: Expected a <class 'int'>"),
        ([*TINY_FIT, "--model.init_args.bogus=3"], "'bogus' is not accepted"),
    ],
)
def test_parse_errors_name_the_option_in_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("FSVIDEO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err
    assert err.splitlines()[0].startswith("fsvideo: error: ") and words in err.splitlines()[0]
    assert "--help` lists the options" in err

"""The CLI: every bundled config parses, prints, and documents itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from processes import run_command

from cli import main

REPO = Path(__file__).resolve().parents[1]
# configs/pipeline/ holds inference pipeline configs (fsvideo generate), not LightningCLI run configs.
CONFIGS = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "pipeline" not in p.parts
)


def test_configs_exist():
    assert any("tiny" in c for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_print_config_resolves(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("lightning_modules.")
    assert resolved["data"]["class_path"].startswith("datamodules.")
    assert resolved["checkpoint"]["save_last"] is True


@pytest.mark.parametrize("config", CONFIGS)
def test_help_with_config(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--help"])
    assert "--ckpt_path" in capsys.readouterr().out


def test_console_script_matches_cli_py():
    fsvideo = Path(sys.executable).with_name("fsvideo")
    out_script = run_command([str(fsvideo), "--help"], timeout=120).stdout
    out_module = run_command([sys.executable, str(REPO / "cli.py"), "--help"], timeout=120).stdout
    assert "fit" in out_script and out_script == out_module.replace("cli.py", "fsvideo")


def test_data_subcommand_help(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert "sample" in out and "inspect" in out

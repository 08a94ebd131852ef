"""Commands the tests start in fresh processes: `fsvideo`, `cli.py` under Lightning's launcher or torchrun,
benchmark scripts, `demo.sh`. Every one runs in a session of its own, so that on its deadline the whole process
group is killed, the ranks a launcher started included: killing only the launcher would leave its ranks holding
the output pipes, and reading them would then wait for ever."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def run_command(
    command: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` with its stdout and stderr captured as text; the test fails, with the last output, when it
    runs past ``timeout`` seconds. Whatever the command left running in its group is killed when it returns or the
    test is stopped."""
    with subprocess.Popen(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)} ran past {timeout:.0f} s\n{stdout[-2000:]}\n{stderr[-3000:]}")
        finally:  # also when the test itself is stopped (pytest-timeout, Ctrl-C): leave nothing running
            _kill_group(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass

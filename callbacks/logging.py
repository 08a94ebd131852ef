"""wandb defaults: a run never waits for a login."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

WANDB_MODES = ("auto", "offline", "online", "disabled")
RUN_ID_FILE = "wandb_run_id"


def wandb_account_configured() -> bool:
    """True when wandb could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_wandb_mode(requested: str) -> str:
    """Turn the config's ``wandb.mode`` into offline / online / disabled.

    ``auto`` means: honour ``WANDB_MODE`` if the environment sets it, go online when an account is
    configured, else offline (``wandb sync <run dir>/wandb/offline-run-*`` uploads later).
    """
    if requested not in WANDB_MODES:
        raise ValueError(f"wandb.mode must be one of {WANDB_MODES}, got {requested!r}.")
    if requested != "auto":
        return requested
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "online", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_account_configured() else "offline"


def wandb_run_id(run_dir: str | Path, resuming: bool) -> str:
    """The wandb run id of the run in ``run_dir``: the stored one when resuming (``--ckpt_path``), so the
    resumed run continues the same wandb run and its charts; a new one (stored in ``run_dir/wandb_run_id``)
    for a fresh run."""
    path = Path(run_dir) / RUN_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{RUN_ID_FILE}.tmp")
    temporary.write_text(run_id + "\n")
    temporary.replace(path)
    return run_id

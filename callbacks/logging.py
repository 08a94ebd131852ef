"""wandb defaults: a run never waits for a login."""

from __future__ import annotations

import os
from pathlib import Path

WANDB_MODES = ("auto", "offline", "online", "disabled")


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

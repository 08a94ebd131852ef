"""The ``fsvideo`` command: the training stages through LightningCLI (``lightning_modules.cli``, imported only
for them) plus the data, generate, export, rewards and report subcommands, which start without Lightning.

    fsvideo fit --config configs/tiny/fsae-stage1.yaml          # train a stage
    fsvideo fit --config … --ckpt_path last                     # resume it
    fsvideo validate|test|predict --config …
    fsvideo data sample --out data/sample                       # write the bundled sample shards
    fsvideo data inspect 'data/sample/train-{000000..000003}.tar'
    fsvideo generate --config configs/pipeline/tiny.yaml --image first.png --prompt "…" --out out.mp4
    fsvideo export runs/tiny-dit-pretrain-video --out models/   # saved-model folders of a run's networks
    fsvideo estimate --config configs/dit/pretrain-video512.yaml --gpus 1 8  # memory per GPU, nothing allocated
    fsvideo rewards pool --inputs inputs.jsonl --pipeline configs/pipeline/… --out pool/   # pairs to label
    fsvideo report id --run "no reg=runs/a" --run "video VF=runs/b" --shards 'data/sample/val-000000.tar'

Every run lives in ``trainer.default_root_dir`` (``runs/<name>`` in the bundled configs): the fully
resolved ``config.yaml``, ``checkpoints/`` and the wandb run directory sit side by side.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError

import yaml

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FSVIDEO_DEBUG"
PROJECT_PACKAGES = {"cli", "fsvideo", "datamodules", "lightning_modules", "callbacks"}
# Who raised an error decides whether its message is meant for a user: this project and Lightning raise
# ValueError (and Lightning MisconfigurationException) for values they refuse, while one from deeper down
# (torch, numpy) is a bug whose traceback matters. Files and YAML are the user's wherever they fail.
VALIDATING_PACKAGES = PROJECT_PACKAGES | {"lightning", "lightning_fabric", "pytorch_lightning"}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
ENVIRONMENT_ERRORS = (OSError, yaml.YAMLError)
PARSER_PACKAGES = {"jsonargparse", "argparse"}  # jsonargparse builds on argparse, which raises some errors


def _validation_errors() -> tuple[type[Exception], ...]:
    """ValueError, and Lightning's MisconfigurationException once Lightning is loaded (a command that never
    imported Lightning cannot have raised it)."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (ValueError,) if exceptions is None else (ValueError, exceptions.MisconfigurationException)


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (or while handling), outermost first."""
    chain = [error]
    while True:
        inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if inner is None or inner in chain:
            return chain
        chain.append(inner)


def _raised_in(error: BaseException) -> str:
    """The top-level package of the code that raised ``error`` (its innermost Python frame)."""
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").partition(".")[0]


def user_error_message(error: Exception) -> str | None:
    """The one-line message that tells a user what ``error`` means, or None for a bug.

    jsonargparse wraps what a config's classes raise while it builds them ("Does not validate against any of
    the Union subtypes", the whole config, …): the message is that of the first exception in the chain that
    the parser did not raise. A chain of the parser's own errors is a parse error: its innermost error says
    what is wrong, its outermost which key.
    """
    chain = _causes(error)
    own = next((e for e in chain if _raised_in(e) not in PARSER_PACKAGES), None)
    if own is None:
        key = re.match(r'Parser key "([^"]+)"', str(chain[0]))
        message = f"{key[1]}: {chain[-1]}" if key else str(chain[-1])
    elif isinstance(own, yaml.YAMLError):
        message = f"a config file is not valid YAML: {own}"
    elif isinstance(own, ENVIRONMENT_ERRORS) or (
        isinstance(own, _validation_errors()) and _raised_in(own) in VALIDATING_PACKAGES
    ):
        message = str(own)
    else:
        return None
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fsvideo`` console script; ``argv`` defaults to the command line.

    A user's mistake (a missing or corrupt file, a value the project refuses, a config that does not parse)
    ends in one ``fsvideo: error: …`` line and exit status 2; ``--debug`` or ``FSVIDEO_DEBUG=1`` shows the
    traceback instead. Anything else is a bug and keeps its traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    if debug:
        return _dispatch(args)
    try:
        _dispatch(args)
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        if isinstance(error, ArgumentError):
            command = " ".join(["fsvideo", *[arg for arg in args[:1] if arg in LIGHTNING_SUBCOMMANDS]])
            message += f" (`{command} --help` lists the options)"
        print(f"fsvideo: error: {message}", file=sys.stderr)
        print(f"fsvideo: run again with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(args: list[str]) -> None:
    """Runs the subcommand named by ``args[0]``: ours, or one of LightningCLI's (fit, validate, …)."""
    if args[:1] == ["data"]:
        from datamodules.commands import data_main

        return data_main(args[1:])
    if args[:1] == ["generate"]:
        from fsvideo.generate import generate_main

        return generate_main(args[1:])
    if args[:1] == ["export"]:
        from fsvideo.export import export_main

        return export_main(args[1:])
    if args[:1] == ["estimate"]:
        from fsvideo.estimate import estimate_main

        return estimate_main(args[1:])
    if args[:1] == ["rewards"]:
        from fsvideo.rewards.commands import rewards_main

        return rewards_main(args[1:])
    if args[:1] == ["report"]:
        from callbacks.reports import report_main

        return report_main(args[1:])
    from lightning_modules.cli import FSVideoCLI

    FSVideoCLI(args=args)


if __name__ == "__main__":
    main()

"""``FSVideoCLI``: the LightningCLI that builds and runs every stage in this folder from a YAML config
(``fsvideo fit|validate|test|predict``), with the house defaults: omegaconf configs, a checkpoint section, an
offline-safe wandb logger, atomic checkpoint writes and the resolved config saved beside the run.

``cli.py`` imports this module only for those subcommands, so the data, generate, export, rewards and report
commands start without importing Lightning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.checkpoint_io import AtomicCheckpointIO, AtomicModelParallelStrategy
from callbacks.logging import resolve_wandb_mode, wandb_run_id
from fsvideo.checkpoints import RUN_CONFIG

# Lightning warnings that are expected with this project's design, silenced so real ones stand out:
# stages use manual optimization (checkpoints hold post-step weights, as intended), frozen networks
# (EMA twins, LPIPS, encoders) stay in eval mode, data streams know their per-rank length, and the
# DataModules (not the DataLoaders) save and restore the stream position, so a mid-epoch resume is exact.
for _message in (
    "Using ModelCheckpoint with manual optimization",
    "You're resuming from a checkpoint that ended before the epoch ended",
    r"Found \d+ module\(s\) in eval mode",
    "Your `IterableDataset` has `__len__` defined",
    "LightningCLI's args parameter is intended to run from within Python",
):
    warnings.filterwarnings("ignore", message=_message)


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config beside the run's checkpoints and sends it to the loggers."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, run_dir / RUN_CONFIG, skip_none=False, overwrite=True)
        resolved = self.parser.dump(self.config, format="yaml", skip_none=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict(), "config_yaml": resolved})


class FSVideoCLI(LightningCLI):
    """LightningCLI with the house defaults: omegaconf configs, a checkpoint section, wandb logging."""

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            # Parse errors are raised, not printed with the whole usage: main() reports them in one line.
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False, "exit_on_error": False},
            auto_configure_optimizers=False,
            seed_everything_default=0,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs/default",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 100,
            }
        )
        parser.link_arguments(
            "trainer.default_root_dir",
            "checkpoint.dirpath",
            compute_fn=lambda root: os.path.join(root, "checkpoints"),
        )
        parser.add_argument("--wandb.project", type=str, default="fsvideo", help="wandb project name.")
        parser.add_argument(
            "--wandb.mode",
            type=str,
            default="auto",
            help="auto (online only when an account is configured), offline, online or disabled.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        # A user-chosen logger wins; the default (True) becomes an offline-safe wandb run in the run dir.
        mode = resolve_wandb_mode(config.wandb.mode)
        default_logger = trainer.logger is None or trainer.logger is True
        if default_logger and mode != "disabled":
            root = trainer.default_root_dir
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {
                    "project": config.wandb.project,
                    "name": Path(root).name,
                    "save_dir": root,
                    "offline": mode == "offline",
                    "id": wandb_run_id(
                        root, resuming=self.subcommand == "fit" and config.get("ckpt_path") is not None
                    ),
                    "resume": "allow",
                },
            }
        elif default_logger:
            trainer.logger = False
        if trainer.plugins is None:
            trainer.plugins = [
                {"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}
            ]
        # ModelParallelStrategy writes its distributed checkpoints in place; its subclass swaps them in whole
        if getattr(trainer.strategy, "class_path", None) in MODEL_PARALLEL_CLASS_PATHS:
            trainer.strategy.class_path = (
                f"{AtomicModelParallelStrategy.__module__}.{AtomicModelParallelStrategy.__name__}"
            )


MODEL_PARALLEL_CLASS_PATHS = {
    "lightning.pytorch.strategies.ModelParallelStrategy",
    "lightning.pytorch.strategies.model_parallel.ModelParallelStrategy",
}
"""How a config names Lightning's ModelParallelStrategy (replaced by ``AtomicModelParallelStrategy``)."""

"""``genie fit --config configs/<setup>/<stage>.yaml``: train one stage with LightningCLI.

One CLI for every stage: the YAML names the stage's LightningModule (``model.class_path``), its
model and optimizer configs, the data (:class:`~genie.data.datamodule.VideoDataModule`) and the
trainer. Defaults every stage gets:

- precision ``bf16-mixed`` on GPU, ``32-true`` on CPU (unless the config sets one);
- gradient clipping at norm 1.0, training by ``max_steps``;
- a checkpoint every ``--checkpoint_every`` steps plus ``last.ckpt`` in ``<root>/checkpoints``,
  so ``--ckpt_path last`` resumes;
- the wandb logger, offline unless you are logged in (``WANDB_MODE`` / ``WANDB_API_KEY``);
- the data checked against the model before the first step (resolution, clip length, paths);
- at the end, the model exported in the Hugging Face layout to ``<root>/export``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from genie.data.datamodule import VideoDataModule
from genie.stages.base import StageModule


class ConfigError(ValueError):
    """A training config that cannot run (reported as one line)."""


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class ExportOnFitEnd(Callback):
    """Write the trained model (HF layout) when fitting ends; rank zero only."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, StageModule):
            return
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "export")
        pl_module.export(path)
        rank_zero_info(f"exported {type(pl_module.net).__name__} to {path}")


class GenieCLI(LightningCLI):
    """LightningCLI with genie's stage defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--checkpoint_every", type=int, default=1000, help="save a checkpoint every N steps")
        parser.add_argument(
            "--export_dir", type=str | None, default=None, help="where to export the model (default <root>/export)"
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        if trainer.get("precision") in (None, "auto"):
            trainer["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
        if not trainer.get("max_steps") or trainer["max_steps"] < 0:
            raise ConfigError("set trainer.max_steps: stages train by steps over endless shard streams")
        if trainer.get("logger") is None or trainer.get("logger") is True:
            if not wandb_logged_in():
                os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            root = trainer.get("default_root_dir") or "runs"
            trainer["logger"] = {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": root, "project": "genie"},
            }

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer, root = self.trainer, Path(self.trainer.default_root_dir)
        # Lightning's default checkpoint callback (no dirpath, no schedule) is replaced by ours: every N
        # steps plus last.ckpt, in a fixed folder so `--ckpt_path last` finds them whatever the run id.
        trainer.callbacks[:] = [cb for cb in trainer.callbacks if not _is_default_checkpoint(cb)]
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(root / "checkpoints")
        if trainer.checkpoint_callback is None:
            ckpt = ModelCheckpoint(
                dirpath=str(root / "checkpoints"),
                every_n_train_steps=cfg["checkpoint_every"],
                save_last=True,
                save_top_k=-1,
                filename="step{step:07d}",
                auto_insert_metric_name=False,
            )
            trainer.callbacks.append(ckpt)
        if not any(isinstance(cb, ExportOnFitEnd) for cb in trainer.callbacks):
            trainer.callbacks.append(ExportOnFitEnd(cfg.get("export_dir")))
        if trainer.loggers and not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks):
            trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        self.check_data()

    def check_data(self) -> None:
        """Fail before the first step, with one line, if the data cannot feed this model."""
        model, data = self.model, self.datamodule
        if not isinstance(model, StageModule) or not isinstance(data, VideoDataModule):
            return
        res, frames = model.expected_resolution(), model.expected_frames()
        if data.resolution is None:
            data.resolution = res
        if frames is not None and data.num_frames > frames:
            raise ConfigError(
                f"data.num_frames={data.num_frames} exceeds the model's num_frames={frames}: lower data.num_frames"
            )
        data.check(resolution=res)


def _is_default_checkpoint(cb: Callback) -> bool:
    """The ModelCheckpoint Lightning adds on its own when the config names none."""
    return (
        type(cb) is ModelCheckpoint
        and cb.dirpath is None
        and cb.save_last is None
        and not cb._every_n_train_steps
        and cb.monitor is None
    )


TRAINER_DEFAULTS: dict[str, Any] = {
    "gradient_clip_val": 1.0,
    "gradient_clip_algorithm": "norm",
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
    "precision": None,
    "max_epochs": -1,
}


# the informative line of jsonargparse's nested error reports, in order of preference
_CONFIG_ERROR_HINTS = ("is not accepted", "unrecognized arguments", "does not exist", "No such file", "Expected a")


def config_error_line(message: str) -> str:
    """One line out of jsonargparse's multi-line, nested error report."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    for hint in _CONFIG_ERROR_HINTS:
        for line in lines:
            if hint in line:
                return line.replace("unrecognized arguments: fit ", "unrecognized arguments: ")
    return lines[0] if lines else message


def stage_error_line(message: str) -> str | None:
    """The stage's own error out of jsonargparse's "Does not validate against any of the Union subtypes"."""
    if "Does not validate against any" not in message:
        return None
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
            return line[2:]
    return None


def fit(argv: list[str]) -> int:
    """Entry of ``genie fit``; ``argv`` are LightningCLI's arguments (``--config``, overrides)."""
    from argparse import ArgumentError

    from genie.data.loader import DataError

    saved_argv = sys.argv
    sys.argv = saved_argv[:1]  # the arguments come from `argv`; LightningCLI warns when both are set
    no_exit = {"exit_on_error": False}
    try:
        GenieCLI(
            StageModule,
            VideoDataModule,
            subclass_mode_model=True,
            args=["fit", *argv],
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_exit, "fit": {"default_env": False, **no_exit}},
        )
    except ArgumentError as e:
        print(f"error: bad config: {config_error_line(str(e))} (genie fit --help lists every option)", file=sys.stderr)
        return 2
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # a stage's own check failing while jsonargparse instantiates it arrives wrapped in a union report
        reason = stage_error_line(str(e))
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0

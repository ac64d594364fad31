"""``genie fit --config configs/<setup>/<stage>.yaml``: train one stage with LightningCLI.

One CLI for every stage: the YAML names the stage's LightningModule (``model.class_path``), its
model and optimizer configs, the data (:class:`~genie.data.datamodule.VideoDataModule`) and the
trainer. Defaults every stage gets:

- precision ``bf16-mixed`` on GPU, ``32-true`` on CPU (unless the config sets one);
- gradient clipping at norm 1.0, training by ``max_steps``;
- a checkpoint every ``--checkpoint_every`` steps plus ``last.ckpt`` in ``<root>/checkpoints``,
  so ``--ckpt_path last`` resumes;
- a non-finite loss or gradient is never applied: the step is skipped and counted (``--nonfinite skip``,
  stopping after ``--max_nonfinite_skips`` in a row) or the run stops (``--nonfinite stop``);
- any ``trainer.strategy`` (DDP by default on several devices, FSDP in the large configs; FSDP needs CUDA,
  so on CPU those configs run unsharded); ``--gradient_checkpointing`` recomputes block activations;
  ``--compile`` compiles the ST blocks;
- the wandb logger, offline unless you are logged in (``WANDB_MODE`` / ``WANDB_API_KEY``);
- the data checked against the model before the first step (resolution, clip length, paths);
- at the end, the model exported in the Hugging Face layout to ``<root>/export``;
- when stdout is not a terminal (a pipe, a log file, a notebook) or the progress bar is off, a plain progress
  line every 10 % of ``max_steps`` or 30 s (:class:`PlainProgress`) instead of Lightning's live bar, which
  shows nothing there until the end; the model summary is one line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    RichModelSummary,
    RichProgressBar,
    Timer,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from genie.data.datamodule import VideoDataModule
from genie.models.hub import DamagedFileError
from genie.stages.base import NonFiniteError, StageModule, load_checkpoint, stage_from_state


class ConfigError(ValueError):
    """A training config that cannot run (reported as one line)."""


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class ExportOnFitEnd(Callback):
    """Write the trained model (HF layout) when fitting ends, with ``training.json`` (the steps it trained, the
    wall-clock seconds of this run, the last training loss); rank zero writes, under FSDP after every rank has
    helped gather the weights."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.started: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = time.monotonic()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, StageModule):
            return
        stage = whole_stage(trainer, pl_module)  # every rank must get here: under FSDP it is a collective
        if stage is None or not trainer.is_global_zero:
            return
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "export")
        stage.export(path)
        loss = trainer.callback_metrics.get("train/loss")
        record = {
            "global_step": trainer.global_step,
            "train_seconds": None if self.started is None else round(time.monotonic() - self.started, 2),
            "last_train_loss": None if loss is None else float(loss),
            "max_steps": trainer.max_steps,
        }
        (path / "training.json").write_text(json.dumps(record, indent=1))
        what = "world bundle" if (path / "world.json").is_file() else type(pl_module.net).__name__
        if getattr(pl_module, "lam_training", None) == "joint":
            what += " and the LAM it trained (lam/)"
        rank_zero_info(f"exported {what} to {path}")


def stage_name(pl_module: LightningModule) -> str:
    """``TokenizerStage`` -> ``tokenizer``: how progress lines name the stage."""
    name = type(pl_module).__name__
    return (name[: -len("Stage")] if name.endswith("Stage") and name != "Stage" else name).lower()


class PlainProgress(Callback):
    """A plain line now and then while a stage trains, for output that is not a live terminal.

    Lightning's progress bar redraws one line in place: piped to a file or another program its Rich bar shows
    nothing until the run ends (and tqdm's floods carriage returns). This prints, on rank zero, a line whenever
    training passes another ``every_fraction`` of ``max_steps`` or ``every_seconds`` have gone by since the last
    one (a run stopped by ``max_time`` is not a fraction of its steps), one after each validation, and one at
    the end. The percentage is of ``max_steps`` or, when ``trainer.max_time`` will stop the run first, of that
    time::

        [tokenizer] step 120/400 (30%) · loss 0.0213 · train/psnr 24.1 · 41 s, 2.9 steps/s
        [tokenizer] validation at step 200: val/loss 0.0198 · val/psnr 25.3
        [dynamics] step 300 (45% of max_time 0:03:36) · loss 4.12 · 97 s, 3.1 steps/s

    Args:
        every_seconds: longest gap between two lines during training.
        every_fraction: also a line each time this share of ``max_steps`` is done.
    """

    def __init__(self, every_seconds: float = 30.0, every_fraction: float = 0.1):
        self.every_seconds, self.every_fraction = every_seconds, every_fraction
        self.started = self.last_line = 0.0
        self.first_step = 0
        self.next_mark = 0

    def _print(self, trainer: Trainer, pl_module: LightningModule, text: str) -> None:
        if trainer.is_global_zero:
            print(f"[{stage_name(pl_module)}] {text}", flush=True)

    def _mark_after(self, trainer: Trainer, step: int) -> int:
        """The first step at a multiple of ``every_fraction * max_steps`` after ``step`` (never for no max_steps)."""
        if trainer.max_steps is None or trainer.max_steps <= 0:
            return 2**62
        stride = max(1, round(trainer.max_steps * self.every_fraction))
        return (step // stride + 1) * stride

    def _metrics(self, trainer: Trainer, prefix: str) -> str:
        shown = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith(prefix)}
        loss = trainer.callback_metrics.get(f"{prefix}loss")
        if loss is not None:
            shown = {f"{prefix}loss" if prefix == "val/" else "loss": float(loss), **shown}
        return " · ".join(f"{k} {v:.4g}" for k, v in shown.items() if k != "train/loss")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = self.last_line = time.monotonic()
        self.first_step = trainer.global_step
        self.next_mark = self._mark_after(trainer, trainer.global_step)
        limits = [f"max_steps {trainer.max_steps}"] if trainer.max_steps > 0 else []
        seconds = self._max_time(trainer)
        if seconds is not None:
            limits.append(f"max_time {datetime.timedelta(seconds=round(seconds))}")
        self._print(trainer, pl_module, f"training from step {trainer.global_step} ({', '.join(limits) or 'no limit'})")

    @staticmethod
    def _timer(trainer: Trainer) -> Timer | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)  # max_time's callback

    def _max_time(self, trainer: Trainer) -> float | None:
        timer = self._timer(trainer)
        remaining = None if timer is None else timer.time_remaining()
        return None if remaining is None or timer is None else remaining + timer.time_elapsed()

    def _total(self, trainer: Trainer) -> str:
        """``/400 (30%)``, or `` (45% of max_time 0:03:36)`` when the clock is further along than the steps."""
        step = trainer.global_step
        by_steps = step / trainer.max_steps if trainer.max_steps > 0 else 0.0
        seconds, timer = self._max_time(trainer), self._timer(trainer)
        if seconds and timer is not None and timer.time_elapsed() / seconds > by_steps:
            return f" ({timer.time_elapsed() / seconds:.0%} of max_time {datetime.timedelta(seconds=round(seconds))})"
        return f"/{trainer.max_steps} ({by_steps:.0%})" if trainer.max_steps > 0 else ""

    def _line(self, trainer: Trainer, pl_module: LightningModule, head: str) -> None:
        now = time.monotonic()
        step, elapsed = trainer.global_step, now - self.started
        total = self._total(trainer)
        rate = (step - self.first_step) / max(elapsed, 1e-9)
        metrics = self._metrics(trainer, "train/")
        self._print(
            trainer,
            pl_module,
            f"{head}step {step}{total}{' · ' + metrics if metrics else ''} · {elapsed:.0f} s, {rate:.3g} steps/s",
        )
        self.last_line = now

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if 0 < trainer.max_steps <= step:
            return  # the last step: on_train_end's line says it
        if step >= self.next_mark or time.monotonic() - self.last_line >= self.every_seconds:
            self.next_mark = self._mark_after(trainer, step)
            self._line(trainer, pl_module, "")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._metrics(trainer, "val/")
        self._print(trainer, pl_module, f"validation at step {trainer.global_step}: {metrics or '-'}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._line(trainer, pl_module, "done: ")


def name_bar_by_stage(bar: RichProgressBar, name: str) -> None:
    """Lightning's Rich bar titled with the stage (``tokenizer``) instead of ``Epoch 0/-2``: stages train by
    steps over endless streams (``max_epochs`` -1), so the epoch says nothing."""
    original = bar._get_train_description

    def describe(current_epoch: int) -> str:
        if bar.trainer.max_epochs is not None and bar.trainer.max_epochs > 0:
            return original(current_epoch)
        return f"{name:<{len('Validation')}}"  # as long as the validation bar's title: no flicker

    bar._get_train_description = describe  # type: ignore[method-assign]


class OneLineSummary(ModelSummary):
    """Lightning's model summary as one line: the top-level modules with their parameter counts.

    Lightning's table (Rich's, 12 lines) has one row per top-level module, a stage has one or two, and a FLOPs
    column that reads 0 for every genie stage (it needs an ``example_input_array``).
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        cols = dict(summary_data)
        parts = ", ".join(f"{n} ({t}, {p})" for n, t, p in zip(cols["Name"], cols["Type"], cols["Params"], strict=True))
        rank_zero_info(
            f"model: {parts}; {get_human_readable_count(trainable_parameters)} of "
            f"{get_human_readable_count(total_parameters)} parameters trainable, {model_size:.1f} MB"
        )


def whole_stage(trainer: Trainer, pl_module: StageModule) -> StageModule | None:
    """The stage with all of its weights, for export: ``pl_module`` itself, or under FSDP a copy rebuilt on rank
    zero from the gathered full state dict (None on the other ranks).

    Under FSDP every rank holds only a shard of each parameter, and the model's submodules are wrapped, so
    ``save_pretrained`` on the live module would write shards (or hang in a collective on rank zero alone).
    All ranks must call this: gathering the state dict is a collective.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
        return pl_module
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # offloading to the CPU is what keeps a big model off the GPU, but on CPU ranks it would free the very
    # storage the gathered tensors live in
    full = FullStateDictConfig(offload_to_cpu=strategy.root_device.type != "cpu", rank0_only=True)
    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, full):
        state = strategy.model.state_dict()
    if not trainer.is_global_zero:
        return None
    return stage_from_state(dict(pl_module.hparams), {k: v.cpu() for k, v in state.items()})


def newest_checkpoint(paths: list[Path]) -> Path | None:
    """The checkpoint file of the highest step among ``paths`` (``last.ckpt`` on a tie); unreadable ones are skipped.

    What ``--ckpt_path last`` resumes from. Lightning's own "last" is the newest file named ``*last*``, but the
    periodic checkpoint is written first and ``last.ckpt`` right after it: a run killed in between would resume a
    whole checkpoint interval back, or start over if it had no ``last.ckpt`` yet. Reading a checkpoint's step is
    cheap: the file is memory-mapped, its tensors are never read.
    """
    best: tuple[tuple[int, bool], Path] | None = None
    for path in sorted(paths):
        if not path.is_file():
            continue  # a sharded (FSDP) checkpoint folder: left to Lightning
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception as e:  # truncated or foreign: resuming from it would fail, an older one will not
            rank_zero_warn(f"ignoring unreadable checkpoint {path}: {type(e).__name__}: {e}")
            continue
        key = (step, path.name == "last.ckpt")
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else best[1]


def _strategy_name(strategy: Any) -> str:
    """A ``trainer.strategy`` config value (a name, a class_path mapping or an instance) as a lower-case name."""
    if isinstance(strategy, str):
        return strategy.lower()
    if hasattr(strategy, "get") and strategy.get("class_path"):
        return str(strategy.get("class_path")).rsplit(".", 1)[-1].lower()
    return type(strategy).__name__.lower() if strategy is not None else ""


def _strategy_init_args(strategy: Any) -> dict[str, Any]:
    args = strategy.get("init_args") if hasattr(strategy, "get") else None
    return dict(args or {})


class GenieCLI(LightningCLI):
    """LightningCLI with genie's stage defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--checkpoint_every", type=int, default=1000, help="save a checkpoint every N steps")
        parser.add_argument(
            "--export_dir", type=str | None, default=None, help="where to export the model (default <root>/export)"
        )
        parser.add_argument(
            "--nonfinite",
            type=Literal["skip", "stop"],
            default="skip",
            help="a step whose loss or gradients are not finite: skip it (no update) or stop the run",
        )
        parser.add_argument(
            "--max_nonfinite_skips",
            type=int,
            default=10,
            help="with --nonfinite skip: stop after more than this many skipped steps in a row",
        )
        parser.add_argument(
            "--gradient_checkpointing",
            type=bool,
            default=False,
            help="recompute each ST block's activations in backward (less memory, ~1/3 more compute); "
            "under FSDP use the strategy's activation_checkpointing_policy instead",
        )
        parser.add_argument(
            "--compile",
            type=bool,
            default=False,
            help="torch.compile each ST block of the stage's model (compiled once, reused by every block; "
            "the first steps wait for the compiler)",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # the arguments come from `args`; LightningCLI warns when sys.argv holds them too (it does, see `fit`)
        saved, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = saved
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            # LightningCLI reads the checkpoint's hyper-parameters next: a damaged file is one line naming it here,
            # not PyTorch's traceback there (memory-mapped: its tensors are not read)
            load_checkpoint(ckpt_path, mmap=True)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        if trainer.get("precision") in (None, "auto"):
            trainer["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
        if not trainer.get("max_steps") or trainer["max_steps"] < 0:
            raise ConfigError("set trainer.max_steps: stages train by steps over endless shard streams")
        self.check_strategy(cfg)
        if trainer.get("enable_progress_bar") is None and not sys.stdout.isatty():
            trainer["enable_progress_bar"] = False  # a live bar shows nothing in a pipe: PlainProgress instead
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
        if trainer.progress_bar_callback is None and not any(isinstance(cb, PlainProgress) for cb in trainer.callbacks):
            trainer.callbacks.append(PlainProgress())
        elif isinstance(trainer.progress_bar_callback, RichProgressBar):
            name_bar_by_stage(trainer.progress_bar_callback, stage_name(self.model))
        # Lightning's own summary (the one it adds when the config names none) -> one line
        trainer.callbacks[:] = [
            OneLineSummary() if type(cb) in (ModelSummary, RichModelSummary) and cb._max_depth == 1 else cb
            for cb in trainer.callbacks
        ]
        for logger in trainer.loggers:
            # Lightning passes wandb `anonymous=None`, which wandb (0.31 here) answers with a deprecation warning
            init = getattr(logger, "_wandb_init", None)
            if isinstance(init, dict) and init.get("anonymous", "") is None:
                del init["anonymous"]
        if cfg.get("ckpt_path") == "last":
            # ours, and the one Lightning writes on SLURM's pre-emption signal before requeueing the job
            newest = newest_checkpoint([*(root / "checkpoints").glob("*.ckpt"), *root.glob("hpc_ckpt_*.ckpt")])
            if newest is not None:
                self.config_init[self.subcommand]["ckpt_path"] = str(newest)
        if isinstance(self.model, StageModule):
            self.model.nonfinite = cfg["nonfinite"]
            self.model.max_nonfinite_skips = cfg["max_nonfinite_skips"]
            if cfg["gradient_checkpointing"]:
                self.model.set_gradient_checkpointing(True)
            if cfg["compile"]:
                self.model.compile_blocks()
        self.check_data()

    def check_strategy(self, cfg: Any) -> None:
        """FSDP only where it can run, and one kind of activation checkpointing.

        Lightning refuses FSDP without CUDA; the large configs name it, and on a CPU (tests, a quick look) they
        run unsharded instead of failing. Checkpointing a block both ways would recompute it twice.
        """
        trainer = cfg["trainer"]
        strategy = trainer.get("strategy")
        if not _strategy_name(strategy).startswith("fsdp"):
            return
        accelerator = str(trainer.get("accelerator") or "auto")
        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            rank_zero_warn("FSDP needs CUDA devices (Lightning refuses it on CPU): training unsharded instead")
            trainer["strategy"] = "auto"
            return
        if cfg["gradient_checkpointing"] and _strategy_init_args(strategy).get("activation_checkpointing_policy"):
            raise ConfigError(
                "--gradient_checkpointing and the FSDP strategy's activation_checkpointing_policy both checkpoint "
                "the blocks: keep one (under FSDP, the policy)"
            )

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


MODEL_FIELDS_ARG = "--model.init_args.model"


def fold_model_overrides(argv: list[str]) -> list[str]:
    """Fold ``--model.init_args.model.<field>=<value>`` overrides of a dynamics model of a kind other than maskgit
    into one ``--model.init_args.model=<JSON of every field>``.

    The dynamics stage's ``model`` is a union of one config class per kind, and jsonargparse parses each dotted
    override of a union on its own, trying the classes in order: ``--model.init_args.model.width=64`` on a causal
    config turned it into a MaskGIT one, silently (jsonargparse issues 588, 829). A whole dict, ``kind`` included,
    picks the right class. The fields come from the last ``--config`` file that has them (or an earlier whole-dict
    argument), each override's value read as YAML (``64`` -> int, ``true`` -> bool), as jsonargparse would.
    """
    import yaml

    base: dict[str, Any] | None = None
    overrides: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        takes_next = not eq and i + 1 < len(argv)
        if name == "--config" and (eq or takes_next):
            path = value if eq else argv[i + 1]
            with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError, KeyError):
                fields = yaml.safe_load(Path(path).read_text())["model"]["init_args"]["model"]
                base = dict(fields) if isinstance(fields, dict) else base
        elif name == MODEL_FIELDS_ARG and (eq or takes_next):
            with contextlib.suppress(yaml.YAMLError):
                given = yaml.safe_load(value if eq else argv[i + 1])
                base = dict(given) if isinstance(given, dict) else base
        elif name.startswith(MODEL_FIELDS_ARG + ".") and (eq or takes_next):
            overrides[name[len(MODEL_FIELDS_ARG) + 1 :]] = yaml.safe_load(value if eq else argv[i + 1])
            i += 1 if eq else 2
            continue
        rest.append(arg)
        i += 1
    fields = {**(base or {}), **overrides}
    kind = fields.get("kind", "maskgit")
    if not overrides or kind == "maskgit":
        return argv
    from genie.models.kinds import CONFIGS

    if kind not in CONFIGS:
        raise ConfigError(f"model.kind={kind!r}: choose one of {', '.join(CONFIGS)}")
    # the class named too: a config file's model of another kind must not claim the fields
    cls = CONFIGS[kind]
    return [
        *rest,
        f"{MODEL_FIELDS_ARG}={json.dumps({'class_path': f'{cls.__module__}.{cls.__name__}', 'init_args': fields})}",
    ]


def fit(argv: list[str]) -> int:
    """Entry of ``genie fit``; ``argv`` are LightningCLI's arguments (``--config``, overrides)."""
    from argparse import ArgumentError

    from genie.data.loader import DataError

    saved_argv = sys.argv
    # Lightning's own launcher (devices > 1 without torchrun/SLURM) starts the other ranks by re-running this
    # process's command line: it must be this `genie fit` command, not an empty one
    sys.argv = [saved_argv[0], "fit", *argv]
    no_exit = {"exit_on_error": False}
    try:
        argv = fold_model_overrides(argv)
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
    except (ConfigError, DataError, FileNotFoundError, DamagedFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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

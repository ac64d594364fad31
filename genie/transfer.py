"""``genie transfer``: does pretraining pay? Fine-tune a pretrained world on robot video, and train the same
architecture from scratch with the same data and steps, then compare them on held-out robot clips.

Two arms, each an ordinary ``genie fit`` of the fine-tune stage (``--config``, ``configs/robot/finetune.yaml`` by
default) with the same seed, data, steps and schedule:

- ``pretrained``: the stage starts from the bundle's weights (``model.init_args.init=pretrained``);
- ``scratch``: every part the stage trains starts from fresh random weights of the same architecture
  (``init=scratch``); the frozen parts (the tokenizer, unless the config trains it) are the bundle's in both
  arms, so the comparison isolates what the pretrained dynamics model and LAM bring.

A callback (:class:`TransferCurve`) evaluates each arm every ``--eval-every`` steps (and before the first):
it exports the stage's current world and runs ``genie eval world``'s evaluation on ``--clips`` held-out robot
clips (rollout PSNR/SSIM from one prompt frame with the LAM's inferred actions, ΔtPSNR at t=4, teacher-forced
token accuracy, adapter accuracy). ``--unseen`` adds a last evaluation on clips of tasks fine-tuning never saw.

The answer is the fine-tune steps each arm needs to reach a target PSNR (``--target-psnr``; by default the
from-scratch arm's final PSNR less ``--tolerance``, 0.1 dB: "how many steps does the pretrained world need to
match what training from scratch reaches in N?"). The tolerance keeps the answer from hanging on evaluation
noise once both arms plateau at the same PSNR (on the sprites world's robot test they wander by +-0.2 dB there).

Writes ``OUT/transfer.json`` (both curves, the finals, steps to target, settings), ``OUT/transfer.png`` (the
curves) and each arm's run folder ``OUT/<arm>/`` (checkpoints, ``export/`` world bundle, ``curve.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from genie.data.loader import DataError, expand_shards, probe_meta
from genie.models.hub import read_json

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("pretrained", "scratch")
DEFAULT_CONFIG = ROOT / "configs" / "robot" / "finetune.yaml"
# what a curve point keeps of evaluate_world's report
POINT_KEYS = (
    "psnr_mean",
    "ssim_mean",
    "delta_psnr_t4",
    "teacher_forced_token_accuracy",
    "copy_psnr_mean",
    "adapter_accuracy",
    "adapter_majority_baseline",
)


class TransferError(RuntimeError):
    """An arm of the transfer experiment failed (its own error was printed above)."""


def curve_point(report: dict[str, Any]) -> dict[str, float]:
    """The numbers a curve keeps of one :func:`genie.eval.world.evaluate_world` report."""
    point = {k: float(report[k]) for k in POINT_KEYS if k in report}
    point["ssim_mean"] = float(np.mean(report["ssim_per_step"]))
    return point


class TransferCurve(L.Callback):
    """Evaluate the fine-tune stage's world every ``every`` steps on held-out clips; write the curve as JSON.

    Runs on global rank zero only. The time spent evaluating is not counted in the curve's training seconds.

    Args:
        shards: held-out robot shards.
        out: the curve's JSON file.
        every: evaluate every this many optimizer steps (and at step 0 and at the end).
        clips: held-out clips per evaluation.
        horizon: rollout steps from one prompt frame.
        unseen: shards of tasks never fine-tuned on, evaluated once at the end (None: none).
        seed: the evaluation's seed (the same clips, sampling and random actions at every point).
    """

    def __init__(
        self,
        shards: str,
        out: str,
        every: int = 100,
        clips: int = 32,
        horizon: int = 4,
        unseen: str | None = None,
        seed: int = 0,
    ):
        self.shards, self.out, self.every = shards, Path(out), max(1, every)
        self.clips, self.horizon, self.unseen, self.seed = clips, horizon, unseen, seed
        self.points: list[dict[str, Any]] = []
        self.final_unseen: dict[str, float] | None = None
        self._train_seconds = 0.0
        self._since = 0.0

    def _evaluate(self, pl_module: Any, shards: str) -> dict[str, float]:
        from genie.eval.world import evaluate_world
        from genie.world import World

        folder = self.out.parent / "_eval_world"
        with torch.no_grad():
            pl_module.export(folder)
            world = World.from_pretrained(folder, device=pl_module.device)
            report = evaluate_world(world, shards, horizon=self.horizon, max_clips=self.clips, seed=self.seed)
        shutil.rmtree(folder, ignore_errors=True)
        return curve_point(report)

    def _point(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or (self.points and self.points[-1]["step"] == step):
            return
        self._train_seconds += time.perf_counter() - self._since
        point = {"step": step, "train_seconds": round(self._train_seconds, 1), **self._evaluate(pl_module, self.shards)}
        self.points.append(point)
        print(
            f"[transfer] step {step}: PSNR {point['psnr_mean']:.2f} dB, ΔtPSNR {point['delta_psnr_t4']:+.2f}, "
            f"token acc {point['teacher_forced_token_accuracy']:.3f}"
            + (f", adapter acc {point['adapter_accuracy']:.3f}" if "adapter_accuracy" in point else ""),
            flush=True,
        )
        self._write()
        self._since = time.perf_counter()

    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"points": self.points, "unseen": self.final_unseen, "shards": self.shards, "unseen_shards": self.unseen}
        self.out.write_text(json.dumps(data, indent=2) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._since = time.perf_counter()
        self._point(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._point(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._point(trainer, pl_module)
        if self.unseen and trainer.is_global_zero:
            self.final_unseen = self._evaluate(pl_module, self.unseen)
            self._write()


def steps_to_reach(points: list[dict[str, Any]], target: float, key: str = "psnr_mean") -> int | None:
    """The first evaluated step whose ``key`` is at least ``target`` (None: never within the run)."""
    return next((int(p["step"]) for p in points if p[key] >= target), None)


def arm_argv(args: argparse.Namespace, arm: str) -> list[str]:
    """The ``genie fit`` command line of one arm."""
    root = args.out / arm
    curve = {
        "class_path": "genie.transfer.TransferCurve",
        "init_args": {
            "shards": str(args.robot / "val"),
            "out": str(root / "curve.json"),
            "every": args.eval_every,
            "clips": args.clips,
            "horizon": args.horizon,
            "unseen": str(args.unseen) if args.unseen else None,
            "seed": args.seed,
        },
    }
    argv = ["fit", "--config", str(args.config), f"--model.init_args.world={args.pretrained}"]
    argv += [f"--model.init_args.init={arm}", f"--data.train_shards={args.robot / 'train'}"]
    argv += [f"--data.val_shards={args.robot / 'val'}", "--trainer.limit_val_batches=0"]  # the curve evaluates
    argv += [f"--trainer.max_steps={args.steps}", f"--checkpoint_every={args.steps}"]
    argv += [f"--trainer.default_root_dir={root}", "--trainer.logger=false", f"--seed_everything={args.seed}"]
    window = read_json(args.pretrained / "dynamics" / "config.json")["num_frames"]  # (a damaged one: one line)
    argv += [f"--data.num_frames={window}"]  # the world's window (--fit may say otherwise)
    argv += [f"--trainer.callbacks+={json.dumps(curve)}", *args.fit]
    return argv


def check_inputs(args: argparse.Namespace) -> None:
    """Every input problem as one line, before any training."""
    from genie.world import PARTS

    if args.steps < 1 or args.eval_every < 1 or args.clips < 1 or args.horizon < 1:
        raise ValueError("--steps, --eval-every, --clips and --horizon must all be >= 1")
    if args.tolerance < 0:
        raise ValueError("--tolerance must be >= 0 (dB below the scratch arm's final PSNR)")
    missing = [p for p in PARTS if not (args.pretrained / p / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"--pretrained {args.pretrained} is not a world bundle (no {', '.join(missing)}): make one with "
            "`genie export world` or a pretraining run"
        )
    if not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config} does not exist")
    size = read_json(args.pretrained / "tokenizer" / "config.json")["image_size"]
    sets = {"--robot train": args.robot / "train", "--robot val": args.robot / "val"}
    if args.unseen:
        sets["--unseen"] = args.unseen
    for what, folder in sets.items():
        if not Path(folder).exists():
            raise DataError(f"{what} shards {folder} do not exist: make them with `genie prep robot --out ...`")
        expand_shards(str(folder))
        meta = probe_meta(str(folder))
        if (meta.width, meta.height) != (size, size):
            raise DataError(
                f"{what} shards {folder} hold {meta.width}x{meta.height} clips but the world {args.pretrained} is "
                f"{size}x{size}: re-run `genie prep robot ... --size {size}`"
            )
    done = [a for a in ARMS if (args.out / a).exists()]
    if done and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds a transfer run ({', '.join(done)}): pass --overwrite or --out")


def summarize(args: argparse.Namespace, curves: dict[str, dict[str, Any]], seconds: dict[str, float]) -> dict:
    """The report: both curves and finals, the target and the steps each arm needed to reach it."""
    finals = {arm: c["points"][-1] for arm, c in curves.items()}
    given = args.target_psnr is not None
    target = args.target_psnr if given else finals["scratch"]["psnr_mean"] - args.tolerance
    return {
        "target_psnr": target,
        "target_from": "--target-psnr" if given else f"the scratch arm's final PSNR - {args.tolerance:g} dB",
        "steps_to_target": {arm: steps_to_reach(c["points"], target) for arm, c in curves.items()},
        "final": finals,
        "unseen": {arm: c.get("unseen") for arm, c in curves.items()},
        "curves": {arm: c["points"] for arm, c in curves.items()},
        "wall_seconds": seconds,
        "settings": {
            "pretrained": str(args.pretrained),
            "robot": str(args.robot),
            "unseen": str(args.unseen) if args.unseen else None,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "clips": args.clips,
            "horizon": args.horizon,
            "tolerance": args.tolerance,
            "seed": args.seed,
            "config": str(args.config),
            "fit": list(args.fit),
        },
    }


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what the README shows)."""
    rows = ["| | pretrained | scratch |", "|---|---|---|"]
    f, u, s = report["final"], report["unseen"], report["steps_to_target"]

    def row(name: str, values: dict[str, Any], key: str, fmt: str) -> None:
        if all(v is not None and key in v for v in values.values()):
            rows.append(f"| {name} | " + " | ".join(format(values[a][key], fmt) for a in ARMS) + " |")

    row("held-out PSNR (dB)", f, "psnr_mean", ".2f")
    row("held-out SSIM", f, "ssim_mean", ".3f")
    row("ΔtPSNR(4) (dB)", f, "delta_psnr_t4", "+.2f")
    row("teacher-forced token accuracy", f, "teacher_forced_token_accuracy", ".3f")
    row("adapter accuracy", f, "adapter_accuracy", ".3f")
    row("unseen tasks: PSNR (dB)", u, "psnr_mean", ".2f")
    row("unseen tasks: ΔtPSNR(4) (dB)", u, "delta_psnr_t4", "+.2f")
    reach = " | ".join("not reached" if s[a] is None else str(s[a]) for a in ARMS)
    rows.append(f"| steps to {report['target_psnr']:.2f} dB | {reach} |")
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> Path:
    from genie.eval.common import save_figure, subplots

    fig, axes = subplots(3, figsize=(14, 4))
    for arm, style in zip(ARMS, ("o-", "s--"), strict=True):
        pts = report["curves"][arm]
        steps = [p["step"] for p in pts]
        axes[0, 0].plot(steps, [p["psnr_mean"] for p in pts], style, label=arm)
        axes[0, 1].plot(steps, [p["delta_psnr_t4"] for p in pts], style, label=arm)
        axes[0, 2].plot(steps, [p["teacher_forced_token_accuracy"] for p in pts], style, label=arm)
    axes[0, 0].axhline(report["target_psnr"], color="gray", ls=":", label="target")
    axes[0, 0].axhline(report["final"]["scratch"]["copy_psnr_mean"], color="k", ls="-.", lw=0.8, label="copy frame")
    for ax, name in zip(
        axes[0], ("held-out PSNR (dB)", "ΔtPSNR(4) (dB)", "teacher-forced token accuracy"), strict=True
    ):
        ax.set_xlabel("fine-tune steps")
        ax.set_ylabel(name)
        ax.legend()
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--pretrained", type=Path, required=True, help="the pretrained world bundle (genie export world)")
    add("--robot", type=Path, required=True, help="robot shards folder with train/ and val/ (genie prep robot)")
    add("--unseen", type=Path, default=None, help="held-out shards of tasks not fine-tuned on (generalisation)")
    add("--steps", type=int, default=600, help="fine-tune steps of each arm (default 600)")
    add("--eval-every", type=int, default=100, help="evaluate every this many steps (default 100)")
    add("--clips", type=int, default=32, help="held-out clips per evaluation (default 32)")
    add("--horizon", type=int, default=4, help="rollout steps from one prompt frame (default 4: ΔtPSNR at t=4)")
    add(
        "--target-psnr",
        type=float,
        default=None,
        help="the PSNR to reach (default: the scratch arm's final - tolerance)",
    )
    add("--tolerance", type=float, default=0.1, help="dB below the scratch arm's final PSNR that counts (default 0.1)")
    add("--config", type=Path, default=DEFAULT_CONFIG, help="the fine-tune stage config (default robot/finetune)")
    add("--out", type=Path, default=Path("runs/transfer"), help="output folder (default runs/transfer)")
    add("--seed", type=int, default=0, help="seed of both arms' training and of the evaluation")
    add("--overwrite", action="store_true", help="replace an earlier run in --out")
    add(
        "--fit",
        nargs=argparse.REMAINDER,
        default=[],
        help="the rest of the command line goes to both arms' `genie fit` (e.g. --fit --data.batch_size=8)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.cli import main

    check_inputs(args)
    for arm in ARMS:
        shutil.rmtree(args.out / arm, ignore_errors=True)
    curves: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for i, arm in enumerate(ARMS, 1):
        argv = arm_argv(args, arm)
        print(f"\n[{i}/2] {arm}: genie {' '.join(argv)}", flush=True)
        t0 = time.time()
        code = main(argv)
        if code != 0:
            raise TransferError(f"the {arm} arm failed (exit {code}); rerun it alone with the command above")
        seconds[arm] = round(time.time() - t0, 1)
        curves[arm] = json.loads((args.out / arm / "curve.json").read_text())
    report = summarize(args, curves, seconds)
    (args.out / "transfer.json").write_text(json.dumps(report, indent=2) + "\n")
    png = plot(report, args.out / "transfer.png")
    print(f"\n{table(report)}\n\nreport: {args.out / 'transfer.json'}\ncurves: {png}")
    return report

"""Runs that die or diverge: a `genie fit` killed with SIGKILL resumes with `--ckpt_path last` and ends at max_steps
with a finite loss; a non-finite loss or gradient is never written into the weights (skipped and counted, or the
run stops with one line), on one process and on two."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from genie.cli import main
from genie.data.datamodule import VideoDataModule
from genie.models.lam import LAMConfig
from genie.stages.base import NonFiniteError, OptimConfig
from genie.stages.lam import LAMStage

from .test_distributed import CONFIGS, ROOT, VQ_SMALL, fit_2_ranks

MAX_STEPS = 24
KILL_AFTER = 12  # the killed run's last checkpoint step (checkpoints every 4 steps)


def lam_fit_args(shards: Path, root: Path, *extra: str) -> list[str]:
    """`genie fit` of a small LAM on one CPU process."""
    args = ["fit", "--config", str(CONFIGS / "lam.yaml"), f"--data.train_shards={shards / 'train'}"]
    args += ["--data.val_shards=null", "--data.num_workers=0", "--data.batch_size=2", "--trainer.limit_val_batches=0"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *VQ_SMALL]
    return [*args, "--trainer.enable_model_summary=false", *extra]


def csv_logger(root: Path) -> list[str]:
    """A CSV logger writing every step to ``<root>/csv/version_<n>/metrics.csv`` (a new version per run)."""
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.name=csv",
        "--trainer.log_every_n_steps=1",
    ]


def train_losses(metrics_csv: Path) -> dict[int, float]:
    with metrics_csv.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_killed_run_resumes_to_max_steps_with_finite_loss(sprites_shards: Path, tmp_path: Path):
    root = tmp_path / "run"
    args = lam_fit_args(sprites_shards, root, f"--trainer.max_steps={MAX_STEPS}", "--checkpoint_every=4")
    args += csv_logger(root)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the run before the kill
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "genie.cli", *args], cwd=ROOT, env=env, stdout=out, stderr=out)
    ckpts = root / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts / f"step{KILL_AFTER:07d}.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: as in a preempted or crashed node
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    # maybe killed between writing stepN.ckpt and last.ckpt: `--ckpt_path last` takes the highest step either way
    killed_at = max(int(p.stem.removeprefix("step")) for p in ckpts.glob("step*.ckpt"))
    assert KILL_AFTER <= killed_at < MAX_STEPS and not (root / "export").exists()  # it really died mid-way

    assert main([*args, "--ckpt_path=last"]) == 0
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == MAX_STEPS
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    resumed = train_losses(root / "csv" / "version_1" / "metrics.csv")
    assert min(resumed) >= killed_at and max(resumed) == MAX_STEPS - 1  # it went on from the checkpoint
    assert math.isfinite(resumed[MAX_STEPS - 1])
    assert json.loads((root / "export" / "training.json").read_text())["global_step"] == MAX_STEPS


class InjectNonFinite(LAMStage):
    """The LAM stage with a NaN loss at ``nan_steps`` (on ``nan_rank`` only, when given) and an infinite gradient
    at ``inf_grad_steps``: what a bad batch or an overflow does to a real run."""

    def __init__(
        self,
        model: LAMConfig | None = None,
        optim: OptimConfig | None = None,
        media_every_n_val: int = 1,
        nan_steps: list[int] | None = None,
        inf_grad_steps: list[int] | None = None,
        nan_rank: int | None = None,
    ):
        super().__init__(model, optim, media_every_n_val)
        self.nan_steps, self.inf_grad_steps = set(nan_steps or []), set(inf_grad_steps or [])
        self.nan_rank = nan_rank

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        here = self.nan_rank is None or self.nan_rank == self.global_rank
        # a NaN added as a constant: the gradients stay finite, only the loss says that something went wrong
        return loss + float("nan") if self.global_step in self.nan_steps and here else loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_steps:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class StepWatch(Callback):
    """Records, per step, whether the weights and the optimizer state changed."""

    def __init__(self):
        self.changed: dict[int, tuple[bool, bool]] = {}
        self.before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @staticmethod
    def snapshot(trainer, pl_module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights = [p.detach().clone() for p in pl_module.parameters()]
        state = trainer.optimizers[0].state_dict()["state"]
        return weights, [t.clone() for s in state.values() for t in s.values() if torch.is_tensor(t)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = self.snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self.snapshot(trainer, pl_module)
        assert self.before is not None

        def differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
            return len(a) != len(b) or any(not torch.equal(x, y) for x, y in zip(a, b, strict=True))

        self.changed[trainer.global_step - 1] = (differ(self.before[0], after[0]), differ(self.before[1], after[1]))


def injected(shards: Path, steps: int, **stage_args) -> tuple[InjectNonFinite, StepWatch, Trainer, VideoDataModule]:
    """A small LAM stage with injected non-finite steps, its data and a trainer watching every step."""
    seed_everything(0)
    small = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, num_frames=4, image_size=24, patch_size=4)
    nonfinite = {k: stage_args.pop(k) for k in ("nonfinite", "max_nonfinite_skips") if k in stage_args}
    stage = InjectNonFinite(LAMConfig(num_actions=6, **small), OptimConfig(lr=1e-3, warmup_steps=1), **stage_args)
    for k, v in nonfinite.items():
        setattr(stage, k, v)  # what `genie fit --nonfinite ... --max_nonfinite_skips ...` does
    dm = VideoDataModule(str(shards / "train"), num_frames=4, batch_size=2, num_workers=0, pin_memory=False)
    watch = StepWatch()
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[watch],
        accelerator="cpu",
    )
    return stage, watch, trainer, dm


def test_nonfinite_steps_are_skipped_counted_and_reported(sprites_shards: Path, caplog):
    stage, watch, trainer, dm = injected(sprites_shards, 6, nan_steps=[2], inf_grad_steps=[4])
    with caplog.at_level(logging.WARNING, logger="genie.stages.base"):
        trainer.fit(stage, dm)
    assert trainer.global_step == 6  # the run went on
    for step, (weights, optimizer_state) in watch.changed.items():
        skipped = step in (2, 4)
        assert weights != skipped and optimizer_state != skipped, step
    assert stage.nonfinite_skipped == 2 and stage.nonfinite_steps == [2, 4]
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in stage.parameters())
    assert "2 training step(s) skipped for a non-finite loss or gradients (steps 2, 4)" in caplog.text


def test_nonfinite_stop_leaves_the_weights_of_the_step_before(sprites_shards: Path):
    stage, watch, trainer, dm = injected(sprites_shards, 6, nan_steps=[3], nonfinite="stop")
    with pytest.raises(NonFiniteError, match="non-finite loss or gradients at step 3 .*stopped before updating"):
        trainer.fit(stage, dm)
    assert sorted(watch.changed) == [0, 1, 2]  # step 3 never finished
    assert watch.before is not None
    now = watch.snapshot(trainer, stage)
    assert all(torch.equal(a, b) for a, b in zip(watch.before[0], now[0], strict=True))  # weights
    assert all(torch.equal(a, b) for a, b in zip(watch.before[1], now[1], strict=True))  # optimizer state


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(sprites_shards: Path):
    stage, _, trainer, dm = injected(sprites_shards, 8, nan_steps=[1, 2, 3, 4], max_nonfinite_skips=2)
    with pytest.raises(
        NonFiniteError, match=r"step 3 .*: 3 non-finite steps in a row, more than --max_nonfinite_skips=2"
    ):
        trainer.fit(stage, dm)
    assert stage.nonfinite_skipped == 3 and stage.nonfinite_steps == [1, 2, 3]


def test_genie_fit_nonfinite_stop_is_one_line(sprites_shards: Path, tmp_path: Path, capsys):
    """A learning rate of 1e30 blows the weights up after one step: the next loss is NaN and the run stops."""
    args = lam_fit_args(sprites_shards, tmp_path, "--trainer.max_steps=5", "--trainer.logger=false")
    args += ["--model.init_args.optim.lr=1e30", "--model.init_args.optim.warmup_steps=0", "--nonfinite=stop"]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss or gradients at step 1" in err[0], err


@pytest.mark.slow  # ~16 s of DDP start-up (2026-12-06: the default suite's 12-minute limit)
def test_ddp_ranks_skip_together_when_only_one_sees_a_nan(sprites_shards: Path, tmp_path: Path):
    """Rank 1's loss alone is NaN at step 1 (its gradients, and so the averaged ones, stay finite): both ranks must
    skip the step, or the replicas would diverge."""
    extra = [f"--model.class_path={__name__}.InjectNonFinite", "--model.init_args.nan_steps=[1]"]
    extra += ["--model.init_args.nan_rank=1", *VQ_SMALL]
    ranks = fit_2_ranks(CONFIGS / "lam.yaml", sprites_shards, tmp_path / "run", *extra)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert all(math.isfinite(g) for g in ranks[0]["grad_norms"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["nonfinite"] == {"skipped": 1, "steps": [1]}


def test_ckpt_path_last_resumes_from_the_highest_step(tmp_path: Path):
    """A run killed between writing step10.ckpt and last.ckpt, or mid-write on a filesystem without atomic renames:
    `--ckpt_path last` still takes the newest complete checkpoint."""
    from genie.train import newest_checkpoint

    torch.save({"global_step": 5}, tmp_path / "last.ckpt")
    torch.save({"global_step": 10}, tmp_path / "step0000010.ckpt")
    (tmp_path / "step0000015.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert newest_checkpoint(sorted(tmp_path.glob("*.ckpt"))) == tmp_path / "step0000010.ckpt"
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")
    assert newest_checkpoint(sorted(tmp_path.glob("*.ckpt"))) == tmp_path / "last.ckpt"
    assert newest_checkpoint([]) is None

"""A run stopped at a checkpoint and resumed with `--ckpt_path last` ends bitwise equal to the uninterrupted run: the
data position travels with the checkpoint (same clips, same windows) and each step's random draws are seeded by
(seed, rank, step), so nothing depends on what the process did before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from genie.cli import main

from .test_distributed import CONFIGS, VQ_SMALL

STEPS, STOP = 12, 6


class StopAt(Callback):
    """Ends the run after ``step`` optimizer steps, right after that step's checkpoint is written (the kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(shards: Path, root: Path, workers: int, *extra: str) -> dict[str, torch.Tensor]:
    args = ["fit", "--config", str(CONFIGS / "sprites_tokenizer.yaml"), *VQ_SMALL]
    args += [f"--data.train_shards={shards / 'train'}", "--data.val_shards=null", f"--data.num_workers={workers}"]
    args += ["--data.batch_size=4", "--data.shuffle_buffer=16", "--trainer.limit_val_batches=0"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    args += [f"--trainer.max_steps={STEPS}", f"--checkpoint_every={STOP}", "--trainer.enable_model_summary=false"]
    args += ["--model.init_args.model.dead_code_threshold=2"]  # restarts (random draws) happen in these steps
    assert main([*args, *extra]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_ends_bitwise_equal_to_the_uninterrupted_run(
    sprites_shards: Path, tmp_path: Path, workers: int
):
    whole = fit(sprites_shards, tmp_path / "whole", workers)
    stop = [f"--trainer.callbacks+={__name__}.StopAt", f"--trainer.callbacks.step={STOP}"]
    with pytest.raises(AssertionError):  # the stopped run ends at STOP
        fit(sprites_shards, tmp_path / "cut", workers, *stop)
    assert (tmp_path / "cut" / "checkpoints" / f"step{STOP:07d}.ckpt").is_file()
    resumed = fit(sprites_shards, tmp_path / "cut", workers, "--ckpt_path=last")
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(whole)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow
def test_two_ranks_stopped_and_resumed_end_equal_to_the_uninterrupted_run(sprites_shards: Path, tmp_path: Path):
    """The same on 2 DDP ranks (each rank's data position is gathered into rank 0's checkpoint). ~1.5 min."""
    from .test_distributed import fit_2_ranks

    config = CONFIGS / "sprites_tokenizer.yaml"
    args = [*VQ_SMALL, f"--trainer.max_steps={STEPS}", f"--checkpoint_every={STOP}", "--data.num_workers=1"]
    args += ["--model.init_args.model.dead_code_threshold=2"]
    whole = fit_2_ranks(config, sprites_shards, tmp_path / "whole", *args)
    stop = [f"--trainer.callbacks+={__name__}.StopAt", f"--trainer.callbacks.step={STOP}"]
    fit_2_ranks(config, sprites_shards, tmp_path / "cut", *args, *stop)
    resumed = fit_2_ranks(config, sprites_shards, tmp_path / "cut", *args, "--ckpt_path=last")
    assert resumed[0]["keys"] == whole[0]["keys"][-len(resumed[0]["keys"]) :]  # the same clips on each rank
    assert resumed[1]["keys"] == whole[1]["keys"][-len(resumed[1]["keys"]) :]
    assert resumed[0]["weights"] == resumed[1]["weights"] == whole[0]["weights"]

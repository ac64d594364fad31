"""The fine-tune stage as a user runs it: `genie fit --config configs/robot/finetune.yaml` from a world bundle on
robot shards, checkpoints and resume, the exported world (with its action adapter), options, and bad input.
Plumbing on an untrained 16 px world; learning is tested in test_finetune_learning.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genie.cli import main
from genie.models.tokenizer import VideoTokenizer
from genie.world import World

from .conftest import cli_fit_args

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "robot" / "finetune.yaml")


def fit_args(world: Path, shards: Path, root: Path, *extra: str) -> list[str]:
    return cli_fit_args(
        CONFIG, shards, root, f"--model.init_args.world={world}", "--data.num_frames=4", "--trainer.max_steps=3",
        "--trainer.val_check_interval=3", "--checkpoint_every=3", *extra,
    )  # fmt: skip


def test_finetune_exports_a_world_with_an_adapter_and_resumes(tiny_world: Path, robot_shards_16: Path, tmp_path):
    root = tmp_path / "ft"
    assert main(fit_args(tiny_world, robot_shards_16, root)) == 0
    world = World.from_pretrained(root / "export", seed=0)
    assert world.adapter is not None and world.adapter.config.action_dim == 4
    assert (root / "checkpoints" / "last.ckpt").is_file()
    # only the dynamics model changed; the frozen tokenizer was copied as it was
    before, after = World.from_pretrained(tiny_world), world
    assert not torch.equal(before.dynamics.action_embed.weight, after.dynamics.action_embed.weight)
    for a, b in zip(before.tokenizer.state_dict().values(), after.tokenizer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the exported world steps with robot commands
    world.reset(np.zeros((16, 16, 3), np.uint8))
    assert world.step(robot_action=[0.5, -0.2, 0.0, 1.0]).shape == (16, 16, 3)
    # resume from the last checkpoint and go on to step 5
    assert main([*fit_args(tiny_world, robot_shards_16, root, "--trainer.max_steps=5"), "--ckpt_path", "last"]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5


def test_finetune_can_train_the_tokenizer_and_lam_too(tiny_world: Path, robot_shards_16: Path, tmp_path):
    root = tmp_path / "all"
    extra = ["--model.init_args.train_tokenizer=true", "--model.init_args.train_lam=true"]
    assert main(fit_args(tiny_world, robot_shards_16, root, *extra, "--model.init_args.adapter_action_dim=0")) == 0
    out = root / "export"
    assert not (out / "adapter").exists()
    before = VideoTokenizer.from_pretrained(tiny_world / "tokenizer")
    after = VideoTokenizer.from_pretrained(out / "tokenizer")
    assert not torch.equal(before.patch_embed.weight, after.patch_embed.weight)


def test_finetune_bad_input_is_one_line(tiny_world: Path, robot_shards_16: Path, tmp_path, capsys):
    cases = [
        (["--model.init_args.adapter_action_dim=3"], "adapter_action_dim=4"),  # the shards' actions are 4-D
        (
            [
                "--model.init_args.train_dynamics=false",
                "--model.init_args.train_lam=false",
                "--model.init_args.adapter_action_dim=0",
            ],
            "nothing to train",
        ),
        (["--model.init_args.restarts_until=1.5"], "restarts_until=1.5: choose a fraction in [0, 1]"),
    ]
    for extra, text in cases:
        assert main(fit_args(tiny_world, robot_shards_16, tmp_path / "bad", *extra)) != 0
        err = capsys.readouterr().err
        assert text in err, err[-2000:]
    assert main(fit_args(tmp_path / "nowhere", robot_shards_16, tmp_path / "bad")) != 0
    assert "genie export world" in capsys.readouterr().err


def test_dead_code_restarts_stop_part_way_so_the_last_steps_see_the_final_codes(tiny_world: Path, robot_shards_16):
    """A restart re-purposes a code: late in fine-tuning it would leave the adapter fitted to a code that is gone
    (seen: adapter accuracy 0.056, below chance). Restarts run for the first restarts_until of the steps."""
    from lightning.pytorch.callbacks import Callback

    seen: list[tuple[int, int]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append((trainer.global_step, pl_module.lam.quantizer.dead_code_threshold))

    from .conftest import train_from_config

    extra = dict(world=str(tiny_world), train_lam=True, restarts_until=0.5, callbacks=[Watch()])
    train_from_config("robot/finetune.yaml", str(robot_shards_16 / "train"), 4, **extra)
    assert [on > 0 for _, on in seen] == [True, True, False, False], seen

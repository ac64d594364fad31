"""Fixtures for stage tests: datasets big enough to learn from in well under a minute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import worker_threads


@pytest.fixture(autouse=True)
def _cpu_threads():
    """Restore torch's thread count after each test (a test, or :class:`FreedCores` under xdist, may change it;
    DataLoader workers set their own)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def coinrun_learning_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CoinRun clips for learning tests: 64 short training episodes (~256 clips), 8 held out on unseen levels.

    Many short episodes rather than a few long ones: level variety is what generalises to unseen levels.
    """
    from data_prep.coinrun import load_procgen
    from data_prep.common import PrepError

    try:
        load_procgen()
    except PrepError as e:
        pytest.skip(str(e))
    from genie.cli import main

    out = tmp_path_factory.mktemp("coinrun_learn") / "shards"
    args = [
        "prep",
        "coinrun",
        "--out",
        str(out),
        "--episodes",
        "64",
        "--val-episodes",
        "8",
        "--clip-frames",
        "16",
        "--max-episode-frames",
        "64",
        "--seed",
        "1",
        "--shard-size",
        "32",
        "--workers",
        "0",
    ]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def sprites_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic controllable sprites (K=4 actions, 2 distractors) at 24x24: 1500 training clips, 150 held out.

    The sprite and the distractors are 4x4 and move one 4-pixel step per frame, so with the tiny LAM's patch 4
    every move is exactly one patch (see configs/tiny/lam.yaml for why). ~3 s to build.
    """
    from genie.cli import main

    out = tmp_path_factory.mktemp("sprites") / "shards"
    args = [
        "prep",
        "sprites",
        "--out",
        str(out),
        "--size",
        "24",
        "--step",
        "4",
        "--sprite-size",
        "4",
        "--episodes",
        "1500",
        "--val-episodes",
        "150",
        "--seed",
        "0",
        "--workers",
        "0",
        "--shard-size",
        "250",
    ]
    assert main(args) == 0
    return out


ROOT = Path(__file__).resolve().parents[2]


def cli_fit_args(config: str, shards: Path, root: Path, *extra: str, batch_size: int = 4) -> list[str]:
    """`genie fit` arguments for a quick CPU run of ``config`` on ``shards/{train,val}`` into ``root``."""
    return [
        "fit",
        "--config",
        str(config),
        f"--data.train_shards={shards / 'train'}",
        f"--data.val_shards={shards / 'val'}",
        "--data.num_workers=0",
        f"--data.batch_size={batch_size}",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1",
        *extra,
    ]


class FreedCores(Callback):
    """Under xdist, take the cores of workers that have finished (tests/conftest.py: worker_threads) every 20 steps."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % 20 == 0 and (threads := worker_threads()) != torch.get_num_threads():
            torch.set_num_threads(threads)


def train_from_config(
    config: str,
    train_shards: str,
    max_steps: int | None = None,
    seed: int | None = None,
    frames: int | None = None,
    callbacks: list | None = None,
    **stage_overrides,
) -> tuple:
    """Build the stage of ``configs/<config>`` and train it on CPU, in-process, for ``max_steps`` (default: the
    config's) from ``seed`` (default: the config's), on windows of ``frames`` (default: the config's; the model's
    ``num_frames`` follows), with extra Lightning ``callbacks``. Returns ``(stage, untrained_net_copy)``. A fixed
    step budget: results do not depend on load.
    """
    import copy
    import importlib

    import yaml
    from lightning.pytorch import Trainer, seed_everything

    from genie.data.datamodule import VideoDataModule

    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    seed_everything(cfg.get("seed_everything", 0) if seed is None else seed)
    module_name, _, cls_name = cfg["model"]["class_path"].rpartition(".")
    init = {**cfg["model"]["init_args"], **stage_overrides}
    data = cfg["data"]
    if frames is not None:
        data["num_frames"] = frames
        init["model"] = {**init["model"], "num_frames": frames}
    stage = getattr(importlib.import_module(module_name), cls_name)(**init)
    untrained = copy.deepcopy(stage.net)
    dm = VideoDataModule(
        train_shards,
        num_frames=data["num_frames"],
        batch_size=data["batch_size"],
        num_workers=0,
        shuffle_buffer=data["shuffle_buffer"],
        pin_memory=False,
    )
    trainer = Trainer(
        callbacks=[FreedCores(), *(callbacks or [])],
        max_steps=max_steps or cfg["trainer"]["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    trainer.fit(stage, dm)
    stage.net.eval()
    return stage, untrained


@pytest.fixture(scope="session")
def sprites_lam(sprites_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny LAM (configs/tiny/lam.yaml) trained on the sprites: ``(export folder, trained, untrained)``."""
    stage, untrained = train_from_config("tiny/lam.yaml", str(sprites_shards / "train"))
    out = stage.export(tmp_path_factory.mktemp("sprites_lam") / "export")
    return out, stage.net, untrained


@pytest.fixture(scope="session")
def plain_sprites_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world's data: 24x24 sprites without distractors, 4 background colours (1500 + 150 clips).

    Why no distractors for the world: a tiny dynamics model spends its first thousands of steps on the
    distractors' bounces before it conditions on the action at all (measured: no action effect after 1500
    steps with them, a clear one after 600 without); the LAM learning test keeps them.
    """
    from genie.cli import main

    out = tmp_path_factory.mktemp("plain_sprites") / "shards"
    args = ["prep", "sprites", "--out", str(out), "--size", "24", "--step", "4", "--sprite-size", "4"]
    args += ["--distractors", "0", "--backgrounds", "4", "--episodes", "1500", "--val-episodes", "150"]
    assert main([*args, "--seed", "0", "--workers", "0", "--shard-size", "250"]) == 0
    return out


@pytest.fixture(scope="session")
def plain_sprites_lam(plain_sprites_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny LAM trained on the plain sprites, 300 steps (NMI 1.0 at 400): (export folder, model)."""
    stage, _ = train_from_config("tiny/lam.yaml", str(plain_sprites_shards / "train"), max_steps=300)
    return stage.export(tmp_path_factory.mktemp("plain_sprites_lam") / "export"), stage.net


@pytest.fixture(scope="session")
def plain_sprites_tokenizer(plain_sprites_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The tiny world's tokenizer (configs/tiny/sprites_tokenizer.yaml), its 400 steps on the plain sprites.

    Not fewer: at 200 steps its held-out PSNR is a coin toss between ~21 and ~33 dB across seeds and data orders
    (seeds 0-3: 23.7, 29.4, 27.2, 30.8 dB), and a 24 dB tokenizer sinks the world learning test; at 400 it is
    40-53 dB (seeds 0, 2, 3: 53.0, 45.2, 39.8). Measured 2026-12-06 on the plain sprites below.
    """
    stage, _ = train_from_config("tiny/sprites_tokenizer.yaml", str(plain_sprites_shards / "train"))
    return stage.export(tmp_path_factory.mktemp("plain_sprites_tokenizer") / "export"), stage.net


@pytest.fixture(scope="session")
def sprites_tokens(
    plain_sprites_shards: Path, plain_sprites_tokenizer: tuple, plain_sprites_lam: tuple, tmp_path_factory
) -> Path:
    """The plain sprites' training clips as token shards of the tiny world's tokenizer and LAM (genie prep tokenize)."""
    from genie.cli import main

    tokens = tmp_path_factory.mktemp("sprites_tokens") / "train"
    args = ["prep", "tokenize", "--data", str(plain_sprites_shards / "train"), "--out", str(tokens)]
    tok, lam = str(plain_sprites_tokenizer[0]), str(plain_sprites_lam[0])
    assert main([*args, "--tokenizer", tok, "--lam", lam, "--device", "cpu"]) == 0  # (no validation: no val tokens)
    return tokens


def train_world(config: str, steps: int, tokens: Path, tokenizer: tuple, lam: tuple, root: Path, **overrides) -> Path:
    """Train the dynamics stage of ``configs/<config>`` on the sprites' token shards and export a world bundle."""
    from genie.cli import main

    tok, la = str(tokenizer[0]), str(lam[0])
    stage, _ = train_from_config(config, str(tokens), max_steps=steps, tokenizer=tok, lam=la, **overrides)
    dyn = stage.export(root / "dynamics")
    world = root / "bundle"
    args = ["export", "world", "--tokenizer", tok, "--lam", la, "--dynamics", str(dyn), "--out", str(world)]
    assert main(args) == 0
    return world


@pytest.fixture(scope="session")
def sprites_world(
    sprites_tokens: Path, plain_sprites_tokenizer: tuple, plain_sprites_lam: tuple, tmp_path_factory
) -> Path:
    """The tiny world (configs/tiny/*, MaskGIT) trained on the plain sprites: a world bundle folder.

    700 of the config's 1000 dynamics steps: the world learning test passes with a wide margin.
    """
    root = tmp_path_factory.mktemp("world")
    return train_world("tiny/dynamics.yaml", 700, sprites_tokens, plain_sprites_tokenizer, plain_sprites_lam, root)


@pytest.fixture(scope="session")
def robot_shards_24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meta-World reach-v3 at the tiny world's 24 px (--action-repeat 6: one step moves the arm well under a pixel
    at 24 px), 24 training and 24 held-out episodes: the robot data of the fine-tune and transfer learning tests."""
    from tests.conftest import make_robot_shards

    out = tmp_path_factory.mktemp("robot24") / "shards"
    return make_robot_shards(out, 24, 24, 24, "--max-episode-frames", "48", "--action-repeat", "6")


@pytest.fixture(scope="session")
def causal_sprites_world(
    sprites_tokens: Path, plain_sprites_tokenizer: tuple, plain_sprites_lam: tuple, tmp_path_factory
) -> Path:
    """The tiny world with the causal dynamics kind (configs/tiny/dynamics_causal.yaml) on the same tokenizer, LAM
    and token shards as :func:`sprites_world`: a world bundle folder."""
    root = tmp_path_factory.mktemp("causal_world")
    config, tok, lam = "tiny/dynamics_causal.yaml", plain_sprites_tokenizer, plain_sprites_lam
    return train_world(config, CAUSAL_STEPS, sprites_tokens, tok, lam, root, frames=4)  # 4-frame windows: 0.6x


CAUSAL_STEPS = 600  # the causal world learning test's budget (test_world_learning.py says why not fewer)


@pytest.fixture(scope="session")
def diffusion_sprites_world(
    sprites_tokens: Path, plain_sprites_tokenizer: tuple, plain_sprites_lam: tuple, tmp_path_factory
) -> Path:
    """The tiny world with the diffusion dynamics kind (configs/tiny/dynamics_diffusion.yaml) on the same tokenizer,
    LAM and token shards as :func:`sprites_world`: a world bundle folder."""
    root = tmp_path_factory.mktemp("diffusion_world")
    config = "tiny/dynamics_diffusion.yaml"
    return train_world(config, DIFFUSION_STEPS, sprites_tokens, plain_sprites_tokenizer, plain_sprites_lam, root)


DIFFUSION_STEPS = 1000  # the diffusion world learning test's budget (test_world_learning.py says why)

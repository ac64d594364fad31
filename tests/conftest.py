"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

# A tiny CoinRun dataset: 4 training episodes of up to 96 frames -> ~24 clips of 16 frames at
# 64x64 in shards of 8 (several shards, so loaders can split them by rank and worker), and 2
# validation episodes on disjoint levels. Building it takes ~3 s on one core.
COINRUN_TINY_ARGS = [
    "--episodes", "4",
    "--val-episodes", "2",
    "--clip-frames", "16",
    "--max-episode-frames", "96",
    "--seed", "0",
    "--shard-size", "8",
    "--workers", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def coinrun_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``train/train-*.tar`` and ``val/val-*.tar`` of real CoinRun clips with actions.

    Skips the test when procgen (the ``coinrun`` extra) is not installed.
    """
    from data_prep.coinrun import load_procgen
    from data_prep.common import PrepError

    try:
        load_procgen()
    except PrepError as e:
        pytest.skip(str(e))
    from genie.cli import main

    out = tmp_path_factory.mktemp("coinrun") / "shards"
    assert main(["prep", "coinrun", "--out", str(out), *COINRUN_TINY_ARGS]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 16x16 world bundle (5 actions, 2 sampling steps): for API and front-end plumbing."""
    from tests.worlds import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny_world") / "world")


def make_robot_shards(out: Path, size: int, episodes: int, val_episodes: int, *extra: str) -> Path:
    """``genie prep robot`` (Meta-World reach-v3, 8-frame clips) into ``out``; skips the test without Meta-World."""
    from data_prep.common import PrepError
    from data_prep.robot import load_metaworld
    from genie.cli import main

    try:
        load_metaworld()
    except PrepError as e:
        pytest.skip(str(e))
    args = ["prep", "robot", "--out", str(out), "--task", "reach-v3", "--size", str(size), "--clip-frames", "8"]
    args += ["--episodes", str(episodes), "--val-episodes", str(val_episodes), "--workers", "0", *extra]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def robot_shards_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny 16 px robot-arm shards with real 4-D actions (train/ and val/): plumbing of the fine-tune stage."""
    out = tmp_path_factory.mktemp("robot16") / "shards"
    return make_robot_shards(out, 16, 4, 2, "--max-episode-frames", "16")

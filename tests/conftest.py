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

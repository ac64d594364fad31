"""Fixtures for stage tests: datasets big enough to learn from in well under a minute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _cpu_threads():
    """Both cores for the math; restore afterwards (DataLoader workers set their own)."""
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
    """Synthetic controllable sprites (K=4 actions, 2 distractors): 1500 training clips, 150 held out."""
    from genie.cli import main

    out = tmp_path_factory.mktemp("sprites") / "shards"
    args = [
        "prep",
        "sprites",
        "--out",
        str(out),
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

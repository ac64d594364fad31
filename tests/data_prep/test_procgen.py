"""`genie prep procgen`: any of the 16 Procgen games, one folder per game, CoinRun's contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.procgen import GAMES, parse_games
from genie.cli import main
from genie.data.contract import ClipMeta, npy_load

from .test_coinrun import TINY, digests, samples


@pytest.fixture(scope="module")
def two_games(tmp_path_factory) -> Path:
    from data_prep.coinrun import load_procgen

    try:
        load_procgen()
    except PrepError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("procgen") / "pg"
    argv = ["prep", "procgen", "--games", "bigfish,coinrun", "--out", str(out), *TINY]
    assert main([*argv, "--shard-size", "4", "--seed", "0", "--workers", "0", "--episodes-per-job", "2"]) == 0
    return out


def test_one_folder_per_game_with_true_actions_and_the_game_named(two_games):
    index = json.loads((two_games / "games.json").read_text())
    assert index["games"] == ["bigfish", "coinrun"]
    for game in index["games"]:
        for split in ("train", "val"):
            clips = samples(two_games / game / split)
            assert len(clips) == index["clips"][game][split] > 0
            key, members = clips[0]
            assert key.startswith(f"{game}-{split}-")
            meta = ClipMeta.from_dict(json.loads(members["json"]))
            assert meta.source == f"{game}:{split}"
            actions = npy_load(members["actions.npy"])
            assert actions.dtype == np.int64 and actions.shape == (meta.frames - 1,) and actions.max() < 15


def test_coinrun_is_exactly_prep_coinrun_and_other_games_play_their_own_episodes(two_games, tmp_path):
    ref = tmp_path / "coinrun"
    argv = ["prep", "coinrun", "--out", str(ref), *TINY, "--shard-size", "4", "--seed", "0", "--workers", "0"]
    assert main(argv) == 0
    assert digests(ref) == digests(two_games / "coinrun")  # same options, same bytes: folders interchangeable
    first = {g: npy_load(samples(two_games / g / "train")[0][1]["actions.npy"]) for g in ("bigfish", "coinrun")}
    assert not np.array_equal(first["bigfish"], first["coinrun"])  # each game has its own random stream


def test_unknown_games_are_one_line_errors(tmp_path, capsys):
    assert parse_games("all") == list(GAMES) and len(GAMES) == 16
    assert parse_games("Maze, coinrun,maze") == ["maze", "coinrun"]
    assert main(["prep", "procgen", "--games", "coinrun,pacman", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pacman" in err and "bigfish" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before any work
    with pytest.raises(PrepError, match="no games"):
        parse_games(" , ")

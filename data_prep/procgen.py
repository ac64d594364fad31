"""``genie prep procgen --games ... --out DIR``: episodes of any of the 16 Procgen games -> clip shards.

A broad offline corpus for pretraining: every game is prepared exactly as ``genie prep coinrun`` prepares
CoinRun (the same shard contract, true actions in ``actions.npy``, held-out levels for validation,
deterministic and resumable), one folder per game::

    DIR/<game>/train/train-000000.tar ...   levels [0, --levels)
    DIR/<game>/val/val-000000.tar ...       levels [--val-start-level, --val-start-level + --val-levels)
    DIR/games.json                          what was prepared: games, clips per split, the options

All 16 games share procgen's 15 key combos, so ``actions.npy`` means the same key presses in every game (what
each does differs per game: most ignore the extra buttons 9-14). Training episodes play the sticky-random
policy of ``prep coinrun`` (CoinRun's ``explore`` policy favours running right, which means nothing in most
games); validation plays uniform random actions.

Each game but CoinRun has its own random stream (levels, environment seeds, actions), so games do not replay
the same action sequences; CoinRun keeps ``prep coinrun``'s, and its folder is interchangeable with one made by
``genie prep coinrun`` with the same options (the settings are the same, so a cached folder is reused).

Train on the mixture with a weighted ``data.train_shards`` (see :mod:`genie.data.loader`), e.g. every game
equally plus your own footage::

    data:
      train_shards: {data/procgen/*/train: 16, data/my_videos: 4}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data_prep import coinrun
from data_prep.common import PrepError

# procgen 0.10's games, in the order of its documentation; a game's index + 1 is its random stream (CoinRun: none)
GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip


def parse_games(text: str) -> list[str]:
    """``all`` or a comma-separated list of game names -> the games, in the order given, without repeats.

    Raises:
        PrepError: an unknown game name (the message lists the known ones).
    """
    if text.strip() == "all":
        return list(GAMES)
    games = [g.strip().lower() for g in text.split(",") if g.strip()]
    unknown = [g for g in games if g not in GAMES]
    if unknown or not games:
        what = f"unknown procgen game(s) {', '.join(unknown)}" if unknown else "no games given"
        raise PrepError(f"--games: {what}; choose from {', '.join(GAMES)} (or 'all')")
    return list(dict.fromkeys(games))


def game_key(game: str) -> int | None:
    """The game's own episode stream (None for CoinRun, which keeps ``genie prep coinrun``'s episodes)."""
    return None if game == "coinrun" else GAMES.index(game) + 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    coinrun.add_arguments(parser)
    parser.description = (
        "Play any of the 16 Procgen games (--games) with a sticky-random policy and write clips with their true "
        "actions to DIR/<game>/train and DIR/<game>/val (disjoint levels), as `genie prep coinrun` does for CoinRun. "
        "Deterministic: the same arguments give byte-identical shards for any --workers."
    )
    parser.add_argument(
        "--games",
        default="all",
        help=f"comma-separated procgen games, or 'all' (default): {', '.join(GAMES)}",
    )
    parser.set_defaults(episodes=200)
    for action in parser._actions:
        if action.dest == "out":
            action.help = "output folder; gets <game>/train and <game>/val per game, and games.json"
        elif action.dest == "episodes":
            action.help = "training episodes per game (default 200)"
        elif action.dest == "val_episodes":
            action.help = "validation episodes per game (max(1, episodes // 10); 0: none)"
        elif action.dest == "policy":
            action.choices = ["sticky"]  # explore favours CoinRun's RIGHT: meaningless in most games
            action.help = "training episodes' policy: sticky-random (repeat with --sticky, else uniform)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    games = parse_games(args.games)
    val_episodes = coinrun.check_args(args)
    coinrun.load_procgen()  # one clear line before any work when procgen is missing
    results: dict[str, Any] = {}
    for i, game in enumerate(games, 1):
        print(f"[{i}/{len(games)}] {game}", flush=True)
        results[game] = coinrun.prep_game(args, game, args.out / game, val_episodes, game_key(game))
    index = {
        "games": games,
        "clips": {g: {split: s["clips"] for split, s in r.items()} for g, r in results.items()},
        "episodes": args.episodes,
        "val_episodes": val_episodes,
        "size": args.size,
        "clip_frames": args.clip_frames,
        "seed": args.seed,
    }
    written = _merge_index(args.out / "games.json", index)
    total = {split: sum(c.get(split, 0) for c in written["clips"].values()) for split in ("train", "val")}
    print(
        f"{len(written['games'])} game(s) in {args.out}: {total['train']} training and {total['val']} validation "
        f"clips.\n  train on all of them: data.train_shards: {args.out}/*/train  (or a weighted dict, one per game)"
    )
    return results


def _merge_index(path: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Add this run's games to ``games.json`` (a later run may prepare more games into the same folder)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if {k: old.get(k) for k in ("size", "clip_frames", "seed")} == {
            k: index[k] for k in ("size", "clip_frames", "seed")
        }:
            clips = {**old.get("clips", {}), **index["clips"]}
            index = {**index, "games": [g for g in GAMES if g in clips], "clips": clips}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=2) + "\n")
    return index

"""Which true actions act alike: each source's raw action ids grouped into the classes that differ in effect.

A latent action model can only tell actions apart by what they do to the frames, so scoring it against raw
action ids that do the same thing understates it. This module holds, per data source, a table from raw ids to
*effective* action classes, and is importable without the source's own packages (``genie eval lam`` reads it;
``data_prep/coinrun.py`` re-exports it next to the environment it describes).

**CoinRun** (Procgen, 15 discrete actions). From procgen's source (``src/basic-abstract-game.cpp``,
``src/games/coinrun.cpp``):

- Actions 0-8 are the 3 x 3 key combinations ``action = 3 * (vx + 1) + (vy + 1)`` with ``vx, vy`` in
  ``{-1, 0, 1}``: 0 LEFT+DOWN, 1 LEFT, 2 LEFT+UP, 3 DOWN, 4 NOOP, 5 UP, 6 RIGHT+DOWN, 7 RIGHT, 8 RIGHT+UP.
- Actions 9-14 (the D, A, W, S, Q, E keys) are "special actions": ``BasicAbstractGame::game_step`` sets the
  move to 4 ("stand still when taking a special action") and CoinRun never reads the special action, so all six
  are NOOP.
- UP is a jump and only acts with support under the agent (``set_action_xy`` drops ``vy = +1`` in the air).
- DOWN only acts with support too, and visibly only on a crate: it lets the agent drop through it
  (``is_blocked_ents``); on the ground it nudges the vertical speed, which the floor absorbs.

Checked on procgen-mirror 0.10.7 with ``data_prep.coinrun.measure_action_classes`` (every action taken from the
same saved state, ``get_state`` / ``set_state``, then NOOPs; frames compared): over 1000 states of 100 hard
levels along sticky-random walks, 8 frames each, actions 9-14 never differed from NOOP, LEFT from RIGHT always,
UP from NOOP in 37 % of the states (on the ground), and DOWN from NOOP in none (a random walk rarely stands on a
crate), so LEFT+DOWN looked like LEFT there too. The exact-equivalence classes are therefore the 9 of
:data:`COINRUN_EFFECTIVE`: DOWN stays a class of its own because procgen's rules let it act.

A coarser grouping, :data:`COINRUN_MOVEMENT`, keeps what is visible in nearly every state: horizontal direction
(left / none / right) x jump or not (6 classes); it folds DOWN into the same direction without DOWN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

COINRUN_ACTION_NAMES = (
    "LEFT+DOWN",
    "LEFT",
    "LEFT+UP",
    "DOWN",
    "NOOP",
    "UP",
    "RIGHT+DOWN",
    "RIGHT",
    "RIGHT+UP",
    "D",
    "A",
    "W",
    "S",
    "Q",
    "E",
)
"""Procgen's 15 CoinRun actions by id."""

COINRUN_EFFECTIVE: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4)
"""Raw action id -> effective class (named by its lowest raw id): 9 classes, {4, 9..14} being NOOP."""

COINRUN_MOVEMENT: tuple[int, ...] = (0, 0, 1, 2, 2, 3, 4, 4, 5, 2, 2, 2, 2, 2, 2)
"""Raw action id -> movement class: 0 left, 1 left+jump, 2 none, 3 jump, 4 right, 5 right+jump."""

COINRUN_MOVEMENT_NAMES = ("left", "left+jump", "none", "jump", "right", "right+jump")

# source name (the part of a clip's ``source`` before ":") -> grouping name -> table
GROUPINGS: dict[str, dict[str, tuple[int, ...]]] = {
    "coinrun": {"effective": COINRUN_EFFECTIVE, "movement": COINRUN_MOVEMENT},
}


def source_name(source: str) -> str:
    """The data source of a clip's metadata ``source`` field: ``"coinrun:val"`` -> ``"coinrun"``."""
    return source.split(":", 1)[0].strip().lower()


def has_effective_actions(name: str) -> bool:
    """Whether :func:`effective_actions` knows source ``name``."""
    return source_name(name) in GROUPINGS


def grouping_table(name: str, grouping: str = "effective") -> tuple[int, ...]:
    """The raw id -> class table of source ``name`` (``"coinrun"`` or a clip ``source`` such as ``"coinrun:val"``).

    Raises:
        KeyError: the source or the grouping is unknown.
    """
    tables = GROUPINGS.get(source_name(name))
    if tables is None:
        raise KeyError(f"no effective-action table for source {name!r} (known: {', '.join(sorted(GROUPINGS))})")
    if grouping not in tables:
        raise KeyError(f"source {name!r} has no {grouping!r} grouping (has: {', '.join(tables)})")
    return tables[grouping]


def effective_actions(name: str, actions: ArrayT, grouping: str = "effective") -> ArrayT:
    """Map raw action ids to their effective classes: integer array or tensor of any shape -> the same shape.

    Ids outside the table (e.g. -1 padding) are passed through unchanged.

    Args:
        name: the data source (``"coinrun"``, or a clip's ``source`` field such as ``"coinrun:train"``).
        actions: raw action ids.
        grouping: ``"effective"`` (the exact-equivalence classes) or ``"movement"`` (coarser, where defined).
    """
    table = grouping_table(name, grouping)
    if isinstance(actions, torch.Tensor):
        lut = torch.tensor(table, dtype=actions.dtype, device=actions.device)
        inside = (actions >= 0) & (actions < len(table))
        return torch.where(inside, lut[actions.clamp(0, len(table) - 1)], actions)
    arr = np.asarray(actions)
    lut_np = np.asarray(table, dtype=arr.dtype)
    inside_np = (arr >= 0) & (arr < len(table))
    return np.where(inside_np, lut_np[np.clip(arr, 0, len(table) - 1)], arr)


def classes(table: Sequence[int]) -> list[list[int]]:
    """The classes of a table as lists of raw ids, ordered by class id: ``[[0], [1], ..., [4, 9, 10, ...]]``."""
    out: dict[int, list[int]] = {}
    for raw, cls in enumerate(table):
        out.setdefault(cls, []).append(raw)
    return [out[c] for c in sorted(out)]

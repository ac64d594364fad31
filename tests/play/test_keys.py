"""Arrow-key mapping: picks distinct actions and assigns them by the direction they move things."""

from __future__ import annotations

import numpy as np
import pytest

from genie.play.keys import arrow_actions, drift, most_distinct, parse_arrows

S = 24


def square_at(x: int, y: int) -> np.ndarray:
    frame = np.zeros((S, S, 3), np.uint8)
    frame[y : y + 4, x : x + 4] = 255
    return frame


def rollout(dx: int, dy: int, steps: int = 2) -> np.ndarray:
    """A square starting mid-frame moved (dx, dy) per step: (steps + 1, S, S, 3)."""
    return np.stack([square_at(10 + k * dx, 10 + k * dy) for k in range(steps + 1)])


def test_drift_points_the_way_the_square_moves():
    assert np.allclose(drift(rollout(3, 0)), [1.5, 0])  # half the velocity per step (old + new position)
    assert np.allclose(drift(rollout(0, -3)), [0, -1.5])
    assert np.allclose(drift(rollout(0, 0)), [0, 0])  # nothing changes: no direction


def test_arrows_go_to_the_moving_actions_in_their_directions():
    # actions: 0 no-op, 1 down, 2 left, 3 no-op (same as 0), 4 right, 5 up
    moves = [(0, 0), (0, 3), (-3, 0), (0, 0), (3, 0), (0, -3)]
    mapping = arrow_actions(np.stack([rollout(dx, dy) for dx, dy in moves]))
    assert mapping == {"ArrowUp": 5, "ArrowDown": 1, "ArrowLeft": 2, "ArrowRight": 4}
    assert list(mapping) == ["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight"]


def test_most_distinct_skips_duplicates_and_static_worlds_keep_index_order():
    # three identical "no change" effects and one change: the duplicates can't all be chosen first
    effects = np.stack([square_at(10, 10)] * 3 + [square_at(2, 2), square_at(18, 18)])
    assert set(most_distinct(effects, 3)) >= {3, 4}
    # actions that change colour but move nothing: no drift, so the chosen ones keep index order
    flat = np.stack([np.stack([np.full((S, S, 3), 0, np.uint8), np.full((S, S, 3), 40 * a, np.uint8)] * 2)[:3]
                     for a in range(4)])  # fmt: skip
    assert arrow_actions(flat) == {"ArrowUp": 0, "ArrowDown": 1, "ArrowLeft": 2, "ArrowRight": 3}


def test_fewer_than_four_actions_map_fewer_arrows():
    mapping = arrow_actions(np.stack([rollout(3, 0), rollout(-3, 0)]))
    assert mapping == {"ArrowLeft": 1, "ArrowRight": 0}


def test_parse_arrows():
    assert parse_arrows("2,0,3,1", 4) == {"ArrowUp": 2, "ArrowDown": 0, "ArrowLeft": 3, "ArrowRight": 1}
    for bad in ("1,2,3", "a,b,c,d", "0,1,2,9"):
        with pytest.raises(ValueError, match="up,down,left,right"):
            parse_arrows(bad, 4)

"""The effective-action tables: CoinRun's 15 raw actions -> the classes that act differently (genie.eval.actions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genie.eval.actions import (
    COINRUN_ACTION_NAMES,
    COINRUN_EFFECTIVE,
    COINRUN_MOVEMENT,
    COINRUN_MOVEMENT_NAMES,
    classes,
    effective_actions,
    grouping_table,
    has_effective_actions,
    source_name,
)

NOOP = 4


def test_every_raw_action_maps_into_nine_exact_classes():
    assert len(COINRUN_EFFECTIVE) == len(COINRUN_ACTION_NAMES) == 15
    assert classes(COINRUN_EFFECTIVE) == [[0], [1], [2], [3], [4, 9, 10, 11, 12, 13, 14], [5], [6], [7], [8]]
    assert all(COINRUN_EFFECTIVE[a] == NOOP for a in range(9, 15))  # the extra buttons are NOOP in CoinRun
    assert COINRUN_ACTION_NAMES[NOOP] == "NOOP"


def test_movement_classes_are_direction_times_jump():
    assert len(COINRUN_MOVEMENT) == 15 and len(set(COINRUN_MOVEMENT)) == len(COINRUN_MOVEMENT_NAMES) == 6
    for raw, name in enumerate(COINRUN_ACTION_NAMES[:9]):
        movement = COINRUN_MOVEMENT_NAMES[COINRUN_MOVEMENT[raw]]
        direction = "left" if "LEFT" in name else "right" if "RIGHT" in name else None
        jump = "UP" in name
        expected = "+".join(p for p in (direction, "jump" if jump else None) if p) or "none"
        assert movement == expected, (name, movement)
    # the movement classes are unions of the exact ones
    assert all(COINRUN_MOVEMENT[a] == COINRUN_MOVEMENT[COINRUN_EFFECTIVE[a]] for a in range(15))


def test_effective_actions_maps_arrays_and_tensors_alike():
    raw = np.array([[0, 4, 9, 14], [5, 7, 12, -1]])
    want = np.array([[0, 4, 4, 4], [5, 7, 4, -1]])  # -1 (padding) passes through
    np.testing.assert_array_equal(effective_actions("coinrun", raw), want)
    out = effective_actions("coinrun:val", torch.from_numpy(raw))  # a clip's `source` field works too
    assert out.dtype == torch.int64 and torch.equal(out, torch.from_numpy(want))
    np.testing.assert_array_equal(effective_actions("coinrun", raw, "movement"), [[0, 2, 2, 2], [3, 4, 2, -1]])


def test_sources_without_a_table():
    assert source_name("coinrun:train") == "coinrun" and has_effective_actions("coinrun:val")
    assert not has_effective_actions("sprites:val")
    with pytest.raises(KeyError, match="no effective-action table"):
        grouping_table("sprites")
    with pytest.raises(KeyError, match="no 'nope' grouping"):
        grouping_table("coinrun", "nope")

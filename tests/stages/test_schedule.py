"""Learning-rate schedules: by steps (every stage) and by wall clock (`optim.budget_seconds`, genie speedrun)."""

from __future__ import annotations

import math

import pytest

from genie.stages import base
from genie.stages.base import TimeSchedule, lr_lambda


def test_step_schedule_warms_up_then_decays_to_the_floor():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)  # half way through the cosine
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_time_schedule_decays_over_seconds_not_steps(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    sched = TimeSchedule(warmup_steps=2, budget_seconds=60.0, min_ratio=0.1)
    assert sched(0) == pytest.approx(0.5)  # warmup is by steps; the clock starts at the first call
    assert sched(1) == pytest.approx(1.0)
    now[0] += 30  # half the budget, whatever the step count
    assert sched(2) == pytest.approx(0.55) and sched(500) == pytest.approx(0.55)
    now[0] += 15
    assert sched(3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    now[0] += 100  # past the budget: stays at the floor
    assert sched(4) == pytest.approx(0.1)

"""Learning-rate schedules: by steps (every stage) and by wall clock (`optim.budget_seconds`, genie speedrun)."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

from genie.stages import base
from genie.stages.base import TimeSchedule, cosine_ratio, lr_lambda


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


def _time_scheduler(lr: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over one parameter with the wall-clock schedule (lr 1: the LR is the multiplier)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return torch.optim.lr_scheduler.LambdaLR(opt, TimeSchedule(warmup_steps=2, budget_seconds=60.0, min_ratio=0.1))


def test_time_schedule_resumes_with_the_remaining_budget(monkeypatch):
    """A resumed run (`--ckpt_path last`) goes on from the seconds already spent, whatever the new clock reads."""
    now = [1000.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    sched = _time_scheduler()  # the clock starts here (LambdaLR calls the schedule once when built)
    for _ in range(3):
        now[0] += 10
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(cosine_ratio(30 / 60, 0.1))
    state = torch.load(_roundtrip(sched.state_dict()), weights_only=True)  # as a checkpoint stores it

    # a new process: its monotonic clock has nothing to do with the old one, and downtime does not count
    now[0] = 7.0
    resumed = _time_scheduler()
    resumed.load_state_dict(state)
    now[0] += 15
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(cosine_ratio(45 / 60, 0.1))
    now[0] += 30  # past the budget: the floor
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(0.1)


def test_time_schedule_pickles_without_its_clock(monkeypatch):
    """Pickled (a spawned worker, a deepcopy across processes), the schedule keeps its elapsed seconds only."""
    now = [50.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    sched = TimeSchedule(warmup_steps=0, budget_seconds=60.0, min_ratio=0.1)
    sched(0)
    now[0] += 30
    sched(1)
    copy = pickle.loads(pickle.dumps(sched))
    assert copy.elapsed == pytest.approx(30.0)
    now[0] = 1e6  # the copy's first call restarts its clock: no jump by the difference between clocks
    assert copy(2) == pytest.approx(cosine_ratio(30 / 60, 0.1))


def _roundtrip(state: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf

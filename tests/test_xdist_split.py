"""The suite's split over pytest-xdist workers (tests/conftest.py): the sprites chain is one unit of work, and a
worker's torch threads are the cores left by the workers still running."""

from __future__ import annotations

import os

from tests.conftest import SPRITES_CHAIN_MODULES, work_unit, worker_threads


def test_the_chain_modules_are_one_unit_and_other_tests_their_own():
    chain = [f"{m}::test_x" for m in sorted(SPRITES_CHAIN_MODULES)] + ["tests/stages/test_world_learning.py::t[a]"]
    assert {work_unit(n) for n in chain} == {"sprites_chain"}
    other = ["tests/test_demo.py::test_a", "tests/stages/test_dynamics_stage.py::test_b"]
    assert [work_unit(n) for n in other] == other


def test_worker_threads_take_the_cores_of_finished_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("GENIE_TESTS_SHARED", str(tmp_path))
    cores = os.cpu_count() or 1
    assert worker_threads() == max(1, cores // 2)
    (tmp_path / "gw1.done").touch()
    assert worker_threads() == cores

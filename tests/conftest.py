"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The sprites learning chain (tests/stages/conftest.py: tokenizer, LAM, token shards, worlds) is session-scoped and
# is most of the suite's time. Under pytest-xdist (pyproject's addopts: 2 workers) the modules that use it are one
# unit of work, sent first to one worker, so the chain is built once while the other worker takes the rest.
SPRITES_CHAIN = {
    "plain_sprites_shards",
    "plain_sprites_tokenizer",
    "plain_sprites_lam",
    "sprites_tokens",
    "sprites_world",
    "causal_sprites_world",
    "diffusion_sprites_world",
}
SPRITES_CHAIN_MODULES = {
    f"tests/stages/test_{name}.py"
    for name in ("tokenizer_learning", "lam_learning", "world_learning", "finetune_learning", "transfer_learning")
}


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """One unit of work for the sprites chain's modules, one per test elsewhere (:func:`work_unit`), the largest
    unit first.

    (Not ``--dist loadgroup``: under pytest 9.2 its ``xdist_group`` marks group nothing, because xdist tags a test
    by setting ``item._nodeid`` and pytest 9.2 reads ``item._id``.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class SpritesChainScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return SpritesChainScheduling(config, log)


def work_unit(nodeid: str) -> str:
    """The xdist unit of work a test belongs to: ``sprites_chain`` for the chain's modules, else the test itself."""
    return "sprites_chain" if _module(nodeid) in SPRITES_CHAIN_MODULES else nodeid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SPRITES_CHAIN & set(getattr(item, "fixturenames", ())) and _module(item.nodeid) not in SPRITES_CHAIN_MODULES:
            raise pytest.UsageError(
                f"{item.nodeid} uses the sprites chain's fixtures: add its module to SPRITES_CHAIN_MODULES in "
                "tests/conftest.py, so that xdist builds the chain once"
            )


def _xdist_shared_dir() -> Path | None:
    """A folder every xdist worker of this run sees: the run's pytest base folder (None outside xdist)."""
    shared = os.environ.get("GENIE_TESTS_SHARED")
    return Path(shared) if shared and os.environ.get("PYTEST_XDIST_WORKER") else None


def worker_threads() -> int:
    """torch threads for this xdist worker: the cores split among the workers still running (so the worker that
    builds the sprites chain gets every core once the others are done); outside xdist, what torch has."""
    shared = _xdist_shared_dir()
    if shared is None:
        import torch

        return torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    running = max(1, workers - len(list(shared.glob("*.done"))))
    return max(1, (os.cpu_count() or 1) // running)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist, note the run's shared folder: each worker's base folder (``--basetemp``, which xdist sets) is
    ``<the run's>/popen-gwN``. Here and not in a fixture: a worker that gets no tests must still say it is done."""
    basetemp = session.config.option.basetemp
    if os.environ.get("PYTEST_XDIST_WORKER") and basetemp:
        os.environ["GENIE_TESTS_SHARED"] = str(Path(basetemp).parent)


def pytest_sessionfinish(session: pytest.Session) -> None:
    shared = _xdist_shared_dir()
    if shared is not None:  # this worker is out of work: its cores are free for the others
        (shared / f"{os.environ['PYTEST_XDIST_WORKER']}.done").touch()  # (a file per worker, in this run's folder)


@pytest.fixture(scope="session", autouse=True)
def _threads_per_worker():
    """Under xdist each worker (and the processes its tests start) gets its share of the cores: two workers with
    two OpenMP threads each on two cores slow every parallel step several-fold (../shared/PITFALLS.md)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        threads = worker_threads()
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    yield


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


def make_robot_shards(out: Path, size: int, episodes: int, val_episodes: int, *extra: str) -> Path:
    """``genie prep robot`` (Meta-World reach-v3, 8-frame clips) into ``out``; skips the test without Meta-World."""
    from data_prep.common import PrepError
    from data_prep.robot import load_metaworld
    from genie.cli import main

    try:
        load_metaworld()
    except PrepError as e:
        pytest.skip(str(e))
    args = ["prep", "robot", "--out", str(out), "--task", "reach-v3", "--size", str(size), "--clip-frames", "8"]
    args += ["--episodes", str(episodes), "--val-episodes", str(val_episodes), "--workers", "0", *extra]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def robot_shards_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny 16 px robot-arm shards with real 4-D actions (train/ and val/): plumbing of the fine-tune stage."""
    out = tmp_path_factory.mktemp("robot16") / "shards"
    return make_robot_shards(out, 16, 4, 2, "--max-episode-frames", "16")

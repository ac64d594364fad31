"""`genie prep robot`: Meta-World arm clips with real continuous actions, exact and deterministic."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.common import PrepError
from genie.cli import main
from genie.data.contract import ClipMeta, npy_load, read_samples
from genie.data.video import decode_clip

CLIP, SIZE = 8, 32
TASKS = ["reach-v3", "push-v3"]
# 3 train episodes (2 of reach, 1 of push) of at most 16 frames -> 2 clips each; 1 validation episode
TINY = ["--task", *TASKS, "--episodes", "3", "--val-episodes", "1", "--size", str(SIZE), "--clip-frames", str(CLIP)]
TINY += ["--max-episode-frames", "16", "--shard-size", "4"]


@pytest.fixture(scope="module")
def sim_ok():
    from data_prep import robot

    try:
        robot.load_metaworld()
        robot.probe("reach-v3", SIZE, robot.DEFAULT_CAMERA)
    except PrepError as e:
        pytest.skip(f"Meta-World cannot run here: {e}")
    return robot


def prep(out: Path, *extra: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prep", "robot", "--out", str(out), *TINY, *extra]) == 0
    return out


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.tar")}


def samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(folder.glob("*.tar")) for s in read_samples(p)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sim_ok) -> Path:
    """The reference run: in-process, two episodes per job."""
    return prep(tmp_path_factory.mktemp("robot") / "a", "--workers", "0", "--episodes-per-job", "2")


def test_layout_shapes_and_metadata(tiny):
    for split, episodes in (("train", 3), ("val", 1)):
        summary = json.loads((tiny / split / "summary.json").read_text())
        got = samples(tiny / split)
        assert summary["clips"] == len(got) == 2 * episodes and summary["num_skipped"] == 0
        assert summary["action_dim"] == 4 and summary["tasks"] == TASKS
        for key, members in got:
            assert "." not in key and key.startswith(f"robot-{split}-s0-e")
            assert set(members) == {"mp4", "json", "actions.npy"}
            meta = ClipMeta.from_bytes(members["json"])
            assert (meta.fps, meta.frames, meta.width, meta.height, meta.lossless) == (40, CLIP, SIZE, SIZE, True)
            extra = meta.extra
            assert extra["task"] == TASKS[extra["episode"] % 2] and meta.source == f"metaworld:{extra['task']}"
            assert extra["action_dim"] == 4 and extra["action_names"] == ["dx", "dy", "dz", "gripper"]
            assert extra["start_frame"] == meta.clip_index * CLIP and key == f"{meta.video_id}_{meta.clip_index:06d}"
            actions = npy_load(members["actions.npy"])
            assert actions.dtype == np.float32 and actions.shape == (CLIP - 1, 4)
            assert np.all(np.abs(actions) <= 1)
            frames = decode_clip(members["mp4"], list(range(CLIP)))
            assert frames.shape == (CLIP, SIZE, SIZE, 3) and frames.mean() > 20  # rendered, not black
            assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.1  # the arm moves


def test_frames_are_what_the_simulator_shows_after_the_recorded_actions(tiny, sim_ok):
    """Replay each episode's first clip from its metadata alone (task, env seed, actions)."""
    firsts = [m for k, m in samples(tiny / "train") if k.endswith("_000000")]
    assert len(firsts) == 3
    for members in firsts:
        meta = ClipMeta.from_bytes(members["json"])
        actions = npy_load(members["actions.npy"])
        sim = sim_ok.RobotSim(meta.extra["task"], SIZE, meta.extra["camera"], max_steps=100)
        try:
            sim.reset(meta.extra["env_seed"])
            expected = [sim.render()]
            for a in actions:  # actions[t] is applied between frame t and t + 1
                sim.step(a, meta.extra["action_repeat"])
                expected.append(sim.render())
        finally:
            sim.close()
        np.testing.assert_array_equal(decode_clip(members["mp4"], list(range(CLIP))), np.stack(expected))


def test_actions_vary(tiny):
    clips = [npy_load(m["actions.npy"]) for _, m in samples(tiny / "train")]
    actions = np.concatenate(clips)
    assert np.all(actions.std(axis=0) > 0.03)  # every dimension moves
    assert len(np.unique(actions, axis=0)) == len(actions)  # noise: no two actions alike
    # the two reach episodes start from other positions: their actions differ
    firsts = sorted((k, m) for k, m in samples(tiny / "train") if k.endswith("_000000"))  # by episode
    reach = [npy_load(m["actions.npy"]) for _, m in firsts]
    assert not np.allclose(reach[0], reach[2], atol=0.05)


def test_same_arguments_are_byte_identical_for_any_workers_and_chunking(tiny, tmp_path):
    other = prep(tmp_path / "b", "--workers", "2", "--episodes-per-job", "1")
    assert digests(other) == digests(tiny) and len(digests(tiny)) >= 3


def test_other_seed_differs(tiny, tmp_path):
    other = prep(tmp_path / "c", "--workers", "0", "--seed", "1", "--val-episodes", "0")
    ours = {k: m["actions.npy"] for k, m in samples(tiny / "train")}
    theirs = {k.replace("-s1-", "-s0-"): m["actions.npy"] for k, m in samples(other / "train")}
    assert ours.keys() == theirs.keys() and all(ours[k] != theirs[k] for k in ours)


def test_bad_arguments_are_one_clear_line(tmp_path, capsys, sim_ok):
    rc = main(["prep", "robot", "--out", str(tmp_path / "x"), "--task", "fly-to-the-moon-v3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fly-to-the-moon-v3" in err and "reach-v3" in err
    rc = main(["prep", "robot", "--out", str(tmp_path / "y"), "--task", "reach-v3", "--camera", "nowhere"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nowhere" in err


def test_missing_metaworld_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # makes `import metaworld` raise ImportError
    rc = main(["prep", "robot", "--out", str(tmp_path / "x"), "--episodes", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "metaworld" in err.lower() and "genie[robot]" in err

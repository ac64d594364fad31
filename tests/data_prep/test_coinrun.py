"""`genie prep coinrun`: real CoinRun clips with true actions, exact and deterministic."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.coinrun import (
    EXPLORE_WEIGHTS,
    NUM_ACTIONS,
    RIGHT,
    RIGHT_UP,
    UP,
    Policy,
    load_procgen,
    measure_action_classes,
)
from data_prep.common import PrepError
from genie.cli import main
from genie.data.contract import ClipMeta, npy_load, read_samples
from genie.data.video import decode_clip

CLIP = 8
# 4 episodes of up to 40 frames -> up to 5 clips of 8 frames each; 2 validation episodes
TINY = ["--episodes", "4", "--val-episodes", "2", "--clip-frames", str(CLIP), "--max-episode-frames", "40"]


@pytest.fixture(scope="module")
def procgen_env():
    try:
        return load_procgen()
    except PrepError as e:
        pytest.skip(str(e))


def prep(out: Path, *extra: str) -> Path:
    assert main(["prep", "coinrun", "--out", str(out), *TINY, "--shard-size", "4", *extra]) == 0
    return out


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.tar")}


def samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(folder.glob("*.tar")) for s in read_samples(p)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, procgen_env) -> Path:
    """The reference run: in-process, two episodes per job."""
    return prep(tmp_path_factory.mktemp("coinrun") / "a", "--seed", "0", "--workers", "0", "--episodes-per-job", "2")


def test_layout_members_and_metadata(tiny):
    for split in ("train", "val"):
        shards = sorted((tiny / split).glob("*.tar"))
        assert shards and shards[0].name == f"{split}-000000.tar"
        summary = json.loads((tiny / split / "summary.json").read_text())
        got = samples(tiny / split)
        assert summary["clips"] == len(got) > 0 and summary["num_skipped"] == 0
        for key, members in got:
            assert "." not in key and key.startswith(f"coinrun-{split}-s0-e")
            assert set(members) == {"mp4", "json", "actions.npy"}
            meta = ClipMeta.from_bytes(members["json"])
            assert (meta.fps, meta.frames, meta.width, meta.height, meta.lossless) == (15, CLIP, 64, 64, True)
            assert meta.source == f"coinrun:{split}" and key == f"{meta.video_id}_{meta.clip_index:06d}"
            assert meta.extra["start_frame"] == meta.clip_index * CLIP
            assert meta.start_time == pytest.approx(meta.extra["start_frame"] / 15)
            assert meta.video_id.endswith(f"e{meta.extra['episode']:06d}")
            assert meta.extra["episode_frames"] <= 40
            actions = npy_load(members["actions.npy"])
            assert actions.dtype == np.int64 and actions.shape == (CLIP - 1,)
            assert actions.min() >= 0 and actions.max() < NUM_ACTIONS


def test_frames_are_exactly_what_the_env_shows_after_the_recorded_actions(tiny, procgen_env):
    """Replay each episode's first clip from its metadata alone (level, env seed, actions)."""
    firsts = [(k, m) for k, m in samples(tiny / "train") if k.endswith("_000000")]
    assert len(firsts) >= 2
    for _, members in firsts:
        meta = ClipMeta.from_bytes(members["json"])
        actions = npy_load(members["actions.npy"])
        env = procgen_env(
            num=1,
            env_name="coinrun",
            start_level=meta.extra["level"],
            num_levels=1,
            distribution_mode="hard",
            rand_seed=meta.extra["env_seed"],
        )
        expected = [env.observe()[1]["rgb"][0].copy()]
        for a in actions:  # actions[t] is taken between frame t and t + 1
            env.act(np.array([a]))
            expected.append(env.observe()[1]["rgb"][0].copy())
        decoded = decode_clip(members["mp4"], list(range(CLIP)))
        np.testing.assert_array_equal(decoded, np.stack(expected))


def test_same_seed_is_byte_identical_for_any_workers_and_chunking(tiny, tmp_path):
    other = prep(tmp_path / "b", "--seed", "0", "--workers", "2", "--episodes-per-job", "1")
    assert digests(other) == digests(tiny)
    assert len(digests(tiny)) >= 3  # several shards compared, train and val


def test_other_seed_differs_and_more_episodes_extend_the_same_ones(tiny, tmp_path):
    other = prep(tmp_path / "c", "--seed", "1", "--workers", "0")
    assert set(digests(other).values()).isdisjoint(digests(tiny).values())
    # episodes are seeded one by one: asking for fewer gives a subset of the same clips (in another order)
    fewer = prep(tmp_path / "d", "--seed", "0", "--workers", "0", "--episodes", "2", "--val-episodes", "2")
    head, full = dict(samples(fewer / "train")), dict(samples(tiny / "train"))
    assert head and len(head) < len(full) and all(full[k] == m for k, m in head.items())
    assert samples(fewer / "val") == samples(tiny / "val")


def test_shards_mix_the_episodes(procgen_env, tmp_path):
    """Consecutive clips come from many episodes, each episode's clips in their order."""
    args = ["--episodes", "24", "--val-episodes", "0", "--max-episode-frames", "64", "--shard-size", "64"]
    out = tmp_path / "mix"
    assert main(["prep", "coinrun", "--out", str(out), "--clip-frames", str(CLIP), *args, "--workers", "0"]) == 0
    metas = [ClipMeta.from_bytes(m["json"]) for _, m in samples(out / "train")]
    assert len(metas) > 100  # up to 8 clips in each of the 24 episodes
    # the first 32 clips of shard 0: 18 episodes here (18.6 expected of a random order), 4 in episode order
    assert len({m.video_id for m in metas[:32]}) >= 12
    seen: dict[str, int] = {}
    for m in metas:
        assert m.clip_index == seen.get(m.video_id, -1) + 1
        seen[m.video_id] = m.clip_index


def test_val_levels_are_disjoint_from_train_levels(tiny):
    levels = {}
    for split in ("train", "val"):
        settings = json.loads((tiny / split / "prep_settings.json").read_text())
        lo, hi = settings["start_level"], settings["start_level"] + settings["num_levels"]
        used = {ClipMeta.from_bytes(m["json"]).extra["level"] for _, m in samples(tiny / split)}
        assert all(lo <= lv < hi for lv in used)
        levels[split] = (lo, hi)
    (tlo, thi), (vlo, vhi) = levels["train"], levels["val"]
    assert thi <= vlo or vhi <= tlo


def test_overlapping_val_levels_are_refused(tmp_path, capsys):
    rc = main(["prep", "coinrun", "--out", str(tmp_path), "--levels", "100", "--val-start-level", "50"])
    assert rc == 2 and "overlaps" in capsys.readouterr().err


def clip_actions(folder: Path) -> list[np.ndarray]:
    return [npy_load(m["actions.npy"]) for _, m in samples(folder)]


def repeat_share(clips: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([a[1:] == a[:-1] for a in clips])))


def test_actions_cover_the_action_space(tiny):
    train = clip_actions(tiny / "train")
    assert len(np.unique(np.concatenate(train))) >= 12
    assert 0.3 < repeat_share(train) < 0.8  # sticky 0.5 (+1/15 chance redraws): held actions, not constant ones


def test_val_uses_the_val_policy_uniform_by_default(tiny):
    """Validation keeps GenieRedux's evaluation policy (i.i.d. uniform) whatever the training policy."""
    for split, policy, sticky in (("train", "sticky", 0.5), ("val", "uniform", 0.0)):
        settings = json.loads((tiny / split / "prep_settings.json").read_text())
        assert (settings["policy"], settings["sticky"], settings["action_weights"]) == (policy, sticky, None)
        assert {ClipMeta.from_bytes(m["json"]).extra["policy"] for _, m in samples(tiny / split)} == {policy}
    assert repeat_share(clip_actions(tiny / "val")) < 0.2  # i.i.d.: 1/15 expected (train: ~0.53)


def test_explore_policy_draws_its_distribution_and_keeps_every_action():
    """The policy alone, 40k steps: marginals are the weights (sticky repeats don't change them), held ~half."""
    policy = Policy.make("explore", 0.5)
    rng = np.random.default_rng(0)
    actions, a = [], -1
    for _ in range(40_000):
        a = policy.next_action(rng, a)
        actions.append(a)
    share = np.bincount(actions, minlength=NUM_ACTIONS) / len(actions)
    expected = np.asarray(EXPLORE_WEIGHTS) / sum(EXPLORE_WEIGHTS)
    np.testing.assert_allclose(share, expected, atol=0.012)
    assert share[[RIGHT, RIGHT_UP, UP]].sum() > 0.5 and share.min() > 0.025
    acts = np.asarray(actions)
    assert np.mean(acts[1:] == acts[:-1]) == pytest.approx(0.5 + 0.5 * (expected**2).sum(), abs=0.015)


def test_explore_prep_histogram_settings_and_refused_mismatch(tiny, tmp_path, capsys):
    """`--policy explore` on generated episodes: RIGHT / RIGHT+UP / UP dominate, every action still shows up,
    the policy is in the settings (val stays uniform), the shards are the same for any --workers, and a
    folder made with another policy is refused unless --overwrite."""
    more = ["--episodes", "12", "--max-episode-frames", "64", "--val-episodes", "1", "--policy", "explore"]
    out = prep(tmp_path / "x", *more, "--workers", "0")
    train = clip_actions(out / "train")
    acts = np.concatenate(train)
    share = np.bincount(acts, minlength=NUM_ACTIONS) / len(acts)
    assert len(acts) > 300 and len(np.unique(acts)) >= 13
    assert 0.3 < share[[RIGHT, RIGHT_UP]].sum() < 0.6  # 0.44 expected; uniform: 0.13
    assert share[UP] > 0.05 and 0.3 < repeat_share(train) < 0.8
    settings = json.loads((out / "train" / "prep_settings.json").read_text())
    assert settings["policy"] == "explore" and settings["action_weights"] == list(EXPLORE_WEIGHTS)
    assert json.loads((out / "val" / "prep_settings.json").read_text())["policy"] == "uniform"
    assert digests(prep(tmp_path / "y", *more, "--workers", "2", "--episodes-per-job", "5")) == digests(out)

    # a cached folder made with the sticky policy: refused for explore, replaced with --overwrite
    cached = tmp_path / "cached"
    for f in tiny.rglob("*"):
        if f.is_file():
            (cached / f.relative_to(tiny)).parent.mkdir(parents=True, exist_ok=True)
            (cached / f.relative_to(tiny)).write_bytes(f.read_bytes())
    capsys.readouterr()
    argv = ["prep", "coinrun", "--out", str(cached), *TINY, "--shard-size", "4", "--workers", "0"]
    argv += ["--seed", "0", "--episodes-per-job", "2"]  # the fixture's settings: a plain rerun reuses it
    assert main(argv) == 0 and digests(cached) == digests(tiny)
    capsys.readouterr()
    assert main([*argv, "--policy", "explore"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*argv, "--val-policy", "sticky"]) == 2  # the val split alone differs: refused too
    assert main([*argv, "--policy", "explore", "--overwrite"]) == 0
    assert json.loads((cached / "train" / "prep_settings.json").read_text())["policy"] == "explore"


def test_resized_lossy_option(tmp_path, procgen_env):
    out = prep(tmp_path / "e", "--episodes", "1", "--val-episodes", "0", "--size", "32", "--lossy", "--workers", "0")
    assert not (out / "val").exists()
    key, members = samples(out / "train")[0]
    meta = ClipMeta.from_bytes(members["json"])
    assert (meta.width, meta.height, meta.lossless) == (32, 32, False)
    assert decode_clip(members["mp4"], [0, CLIP - 1]).shape == (2, 32, 32, 3)


def test_missing_procgen_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "procgen", None)  # makes `import procgen` raise ImportError
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["prep", "coinrun", "--out", str(tmp_path / "x"), "--episodes", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "procgen-mirror" in err and "genie[coinrun]" in err


def test_effective_action_classes_hold_on_the_installed_procgen(procgen_env):
    """Actions of one class give the same frames from the same state; different movement classes do not.

    (DOWN rarely acts, only on a crate, so it is not expected to differ within a few states; see genie.eval.actions.)
    """
    from data_prep.coinrun import ACTION_NAMES, EFFECTIVE_ACTIONS, MOVEMENT_ACTIONS, effective_action
    from genie.eval.actions import COINRUN_ACTION_NAMES

    assert ACTION_NAMES == COINRUN_ACTION_NAMES
    differ = measure_action_classes(levels=3, states_per_level=5, horizon=4)
    same = np.equal.outer(np.array(EFFECTIVE_ACTIONS), np.array(EFFECTIVE_ACTIONS))
    assert differ[same].sum() == 0  # e.g. the 6 extra buttons act exactly as NOOP
    direction = np.array(MOVEMENT_ACTIONS) // 2  # left, none, right (the movement classes pair them with jumps)
    for a in range(NUM_ACTIONS):
        for b in range(NUM_ACTIONS):
            if direction[a] != direction[b]:  # walking left / standing / walking right show in (nearly) every state
                assert differ[a, b] > 0, (ACTION_NAMES[a], ACTION_NAMES[b])
    assert differ[UP, 4] > 0  # jumps need the ground: they show in some states
    np.testing.assert_array_equal(effective_action(np.arange(15)), EFFECTIVE_ACTIONS)


def test_shared_fixture(coinrun_shards):
    train = samples(coinrun_shards / "train")
    assert len(train) >= 12 and len(list((coinrun_shards / "train").glob("*.tar"))) >= 2
    meta = ClipMeta.from_bytes(train[0][1]["json"])
    assert (meta.frames, meta.width, meta.height) == (16, 64, 64)
    assert samples(coinrun_shards / "val")

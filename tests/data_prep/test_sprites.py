"""`genie prep sprites`: a synthetic source whose actions are known, visible and the only control."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.sprites import SPRITE_COLOR, action_deltas, episode_rng, render_episode
from genie.cli import main
from genie.data.contract import ClipMeta, npy_load, read_samples
from genie.data.video import decode_clip

CLIP = 16
# 24 + 6 episodes of 16 frames = 450 transitions: enough to check balance and independence
TINY = ["--episodes", "24", "--val-episodes", "6", "--clip-frames", str(CLIP), "--shard-size", "10", "--seed", "0"]
# the other corner: 32 px, K=5 (with "stay"), more distractors, sticky actions, a textured background
SMALL = [
    "--episodes", "12", "--val-episodes", "0", "--clip-frames", "12", "--size", "32", "--num-actions", "5",
    "--distractors", "3", "--sticky", "0.3", "--texture", "20", "--seed", "3", "--workers", "0",
]  # fmt: skip


def prep(out: Path, *args: str) -> Path:
    assert main(["prep", "sprites", "--out", str(out), *args]) == 0
    return out


def samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(folder.glob("*.tar")) for s in read_samples(p)]


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.tar")}


def decoded(folder: Path) -> list[tuple[ClipMeta, np.ndarray, np.ndarray]]:
    """Every clip of a split as (metadata, decoded frames [T, H, W, 3], actions [T-1])."""
    out = []
    for _, members in samples(folder):
        meta = ClipMeta.from_bytes(members["json"])
        frames = decode_clip(members["mp4"], list(range(meta.frames)))
        out.append((meta, frames, npy_load(members["actions.npy"])))
    return out


def rerender(meta: ClipMeta, settings: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render a stored clip again from its seed, split and episode alone."""
    x = meta.extra
    return render_episode(
        episode_rng(x["seed"], x["split"], x["episode"]),
        meta.frames,
        meta.width,
        x["num_actions"],
        len(x["distractors"]),
        step=x["step"],
        sprite_size=x["sprite_size"],
        sticky=settings["sticky"],
        texture=settings["texture"],
    )


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information (arithmetic-mean normalization) of two label arrays."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, axis=0, return_inverse=True) if b.ndim > 1 else np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi.reshape(-1)), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    return 2 * mi / (ha + hb) if ha + hb > 0 else 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The reference run: in-process, five episodes per job."""
    return prep(tmp_path_factory.mktemp("sprites") / "a", *TINY, "--workers", "0", "--episodes-per-job", "5")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return prep(tmp_path_factory.mktemp("sprites") / "s", *SMALL)


def test_layout_members_and_metadata(tiny):
    for split, count in (("train", 24), ("val", 6)):
        shards = sorted((tiny / split).glob("*.tar"))
        assert [p.name for p in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        summary = json.loads((tiny / split / "summary.json").read_text())
        got = samples(tiny / split)
        assert summary["clips"] == len(got) == count and summary["num_skipped"] == 0
        episodes = []
        for key, members in got:
            assert set(members) == {"mp4", "json", "actions.npy"}
            meta = ClipMeta.from_bytes(members["json"])
            assert "." not in key and key == f"{meta.video_id}_000000" and key.startswith(f"sprites-{split}-s0-e")
            assert (meta.fps, meta.frames, meta.width, meta.height, meta.lossless) == (10, CLIP, 64, 64, True)
            x = meta.extra
            assert meta.source == f"sprites:{split}" and x["split"] == split and x["seed"] == 0
            assert x["num_actions"] == 4 and x["action_names"] == ["up", "down", "left", "right"]
            assert (x["step"], x["sprite_size"]) == (4, 8) and len(x["distractors"]) == 2
            assert all(0 <= v < 64 and v % 4 == 0 for v in x["sprite_start"])
            actions = npy_load(members["actions.npy"])
            assert actions.dtype == np.int64 and actions.shape == (CLIP - 1,)
            assert actions.min() >= 0 and actions.max() < 4
            episodes.append(x["episode"])
        assert sorted(episodes) == list(range(count)) and episodes != sorted(episodes)  # mixed: a shuffled order


def test_actions_are_balanced_and_iid(tiny):
    actions = np.concatenate([npy_load(m["actions.npy"]) for _, m in samples(tiny / "train") + samples(tiny / "val")])
    freq = np.bincount(actions, minlength=4) / len(actions)
    assert freq.min() > 0.17 and freq.max() < 0.33, freq  # 450 draws: ~4 sigma from 0.25
    assert 0.15 < np.mean(actions[1:] == actions[:-1]) < 0.35  # i.i.d. (sticky 0): repeats ~1/4


def test_frames_are_exactly_render_episode_for_the_recorded_seed(tiny, small):
    for out, splits in ((tiny, ("train", "val")), (small, ("train",))):
        for split in splits:
            settings = json.loads((out / split / "prep_settings.json").read_text())
            for meta, frames, actions in decoded(out / split):
                want_frames, want_actions, info = rerender(meta, settings)
                np.testing.assert_array_equal(frames, want_frames)
                np.testing.assert_array_equal(actions, want_actions)
                assert info["sprite_start"] == meta.extra["sprite_start"]


def sprite_moves(frames: np.ndarray, num_actions: int, step: int, sprite_size: int) -> list[list[int]]:
    """For each transition, the actions whose displacement carries the white sprite from frame t to t+1."""
    masks = (frames == np.array(SPRITE_COLOR, dtype=np.uint8)).all(-1)
    # the sprite is always fully visible (drawn last) and the only white: exactly its pixels are white
    assert (masks.sum((1, 2)) == sprite_size**2).all()
    deltas = step * action_deltas(num_actions)
    moved = lambda t, dy, dx: np.array_equal(np.roll(masks[t], (dy, dx), axis=(0, 1)), masks[t + 1])
    return [[a for a, (dy, dx) in enumerate(deltas) if moved(t, dy, dx)] for t in range(len(frames) - 1)]


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_action_is_recoverable_from_the_frames(which, request):
    """The source is controllable: each transition's sprite displacement (found by colour in the decoded
    frames, wrap-around included) is the recorded action's, and no other action's."""
    out = request.getfixturevalue(which)
    clips = decoded(out / "train")
    split_frames = 0
    for meta, frames, actions in clips:
        x = meta.extra
        moves = sprite_moves(frames, x["num_actions"], x["step"], x["sprite_size"])
        assert moves == [[int(a)] for a in actions]
        # a sprite touching two opposite edges is split across them: the border wraps, never clamps
        white = (frames == np.array(SPRITE_COLOR, dtype=np.uint8)).all(-1)
        split_rows = white[:, 0, :].any(-1) & white[:, -1, :].any(-1)
        split_cols = white[:, :, 0].any(-1) & white[:, :, -1].any(-1)
        split_frames += int((split_rows | split_cols).sum())
    assert split_frames > 0
    if which == "small":  # K=5: "stay" occurs and leaves the sprite in place
        assert any(4 in a for _, _, a in clips)


def test_distractors_move_independently_of_the_action(tiny):
    """Distractors keep moving (motion no action explains), and their motion carries ~no information
    about the action, while the sprite's carries all of it."""
    settings = json.loads((tiny / "train" / "prep_settings.json").read_text())
    acts, sprite_d, distractor_d = [], [], []
    for meta, frames, actions in decoded(tiny / "train") + decoded(tiny / "val"):
        _, _, info = rerender(meta, settings)  # frames are exactly these (tested above): use the true positions
        sprite_d.append(np.diff(info["sprite_positions"], axis=0) % 64)
        distractor_d.append(np.diff(info["distractor_positions"], axis=0))  # [T-1, n, 2]
        acts.append(actions)
        # each distractor is visible in its own colour wherever it goes
        for i, dist in enumerate(meta.extra["distractors"]):
            assert (frames == np.array(dist["color"], dtype=np.uint8)).all(-1).any((1, 2)).mean() > 0.5, i
    a, s, dd = np.concatenate(acts), np.concatenate(sprite_d), np.concatenate(distractor_d)
    assert (np.abs(dd).sum(-1) > 0).all()  # distractors never stand still
    assert nmi(a, s) == pytest.approx(1.0)
    for i in range(dd.shape[1]):
        assert nmi(a, dd[:, i]) < 0.1
    assert nmi(a, dd.reshape(len(dd), -1)) < 0.2  # both together: still (near) nothing


def test_same_args_are_byte_identical_for_any_workers_and_chunking(tiny, tmp_path):
    other = prep(tmp_path / "b", *TINY, "--workers", "2", "--episodes-per-job", "7")
    assert digests(other) == digests(tiny)
    assert len(digests(tiny)) >= 4  # several shards compared, train and val


def test_val_episodes_are_new(tiny):
    train = {m["mp4"] for _, m in samples(tiny / "train")}
    val = samples(tiny / "val")
    assert val and all(m["mp4"] not in train for _, m in val)
    # the same episode index in the two splits is a different episode (disjoint seed streams)
    a, b = (render_episode(episode_rng(0, split, 0), 4)[0] for split in ("train", "val"))
    assert not np.array_equal(a, b)


def test_size_32_options(small):
    clips = decoded(small / "train")
    assert len(clips) == 12 and not (small / "val").exists()
    meta, frames, actions = clips[0]
    assert frames.shape == (12, 32, 32, 3) and actions.shape == (11,)
    x = meta.extra
    assert (x["step"], x["sprite_size"], x["num_actions"], len(x["distractors"])) == (2, 4, 5, 3)
    assert x["action_names"] == ["up", "down", "left", "right", "stay"]
    assert len({tuple(d["color"]) for d in x["distractors"]}) == 3  # distinct colours
    # texture: a background of more than one colour (an empty corner region has several values)
    assert len(np.unique(frames[0].reshape(-1, 3), axis=0)) > 2 + 3


def test_sticky_repeats_and_keeps_actions_uniform():
    rng = np.random.default_rng(0)
    acts = np.concatenate([render_episode(rng, 33, 32, 4, 0, sticky=0.5)[1] for _ in range(200)])
    assert 0.55 < np.mean(acts[1:] == acts[:-1]) < 0.70  # 0.5 + 0.5 / 4 = 0.625 within episodes
    assert np.bincount(acts, minlength=4).min() / len(acts) > 0.2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-actions", "1"], "--num-actions must be in 2..8"),
        (["--num-actions", "9"], "--num-actions must be in 2..8"),
        (["--size", "8"], "--size must be >= 16"),
        (["--distractors", "9"], "--distractors must be in 0..8"),
        (["--step", "20"], "--step must be in 1..16"),
        (["--clip-frames", "1"], "--clip-frames must be >= 2"),
    ],
)
def test_bad_args_fail_with_one_line(tmp_path, capsys, args, message):
    rc = main(["prep", "sprites", "--out", str(tmp_path / "x"), "--episodes", "1", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_render_episode_checks_its_arguments():
    with pytest.raises(ValueError, match="num-actions"):
        render_episode(np.random.default_rng(0), 4, 64, num_actions=9)
    with pytest.raises(ValueError, match="num_frames"):
        render_episode(np.random.default_rng(0), 1, 64)


def test_backgrounds_come_from_the_fixed_palette():
    from data_prep.sprites import background_palette

    palette = {tuple(int(v) for v in c) for c in background_palette(3)}
    seen = set()
    for seed in range(30):
        frames, _, info = render_episode(np.random.default_rng(seed), 2, 24, distractors=0, step=4, backgrounds=3)
        seen.add(tuple(info["background"]))
        assert tuple(int(v) for v in frames[0, 0, 0]) in palette | {tuple(SPRITE_COLOR)}
    assert seen == palette  # every colour of the palette, and no other
    with pytest.raises(ValueError, match="backgrounds must be in 0..16"):
        render_episode(np.random.default_rng(0), 2, 24, backgrounds=17)

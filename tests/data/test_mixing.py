"""Weighted mixtures of shard sets in one training stream: shares, exact resume, errors, glob, CLI parsing."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import DataLoader

from genie.data.contract import ClipMeta, ShardWriter, clip_key, npy_bytes
from genie.data.datamodule import VideoDataModule
from genie.data.loader import ClipStream, DataError, StreamState, expand_shards, source_shares
from genie.data.video import encode_clip

from .conftest import indexed_clip


def token_shards(out: Path, name: str, clips: int, shard_size: int = 4, frames: int = 6, size: int = 16) -> Path:
    """Pre-tokenized clips (nothing to decode: fast) keyed ``{name}{c}``; every token of clip c is c."""
    with ShardWriter(out, shard_size=shard_size) as w:
        for c in range(clips):
            meta = ClipMeta(source=name, fps=10.0, frames=frames, width=size, height=size, video_id=f"{name}{c}")
            members = {"json": meta.to_bytes(), "tokens.npy": npy_bytes(np.full((frames, 2, 2), c, np.uint16))}
            members["latent_actions.npy"] = npy_bytes(np.arange(frames - 1, dtype=np.int64))
            w.write(clip_key(f"{name}{c}", 0), members)
    return out


def video_shards(out: Path, name: str, clips: int, shard_size: int = 3, frames: int = 6, size: int = 8) -> Path:
    """Lossless indexed video clips (see conftest.indexed_clip) keyed ``{name}{c}``."""
    with ShardWriter(out, shard_size=shard_size) as w:
        for c in range(clips):
            meta = ClipMeta(source=name, fps=10.0, frames=frames, width=size, height=size, video_id=f"{name}{c}")
            mp4 = encode_clip(indexed_clip(c, frames, size), 10.0, lossless=True)
            w.write(clip_key(f"{name}{c}", 0), {"mp4": mp4, "json": meta.to_bytes()})
    return out


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def test_shares_follow_the_weights_and_tags_name_the_source(tmp_path: Path):
    a = token_shards(tmp_path / "a", "a", clips=16)
    b = token_shards(tmp_path / "b", "b", clips=16)
    off = token_shards(tmp_path / "off", "off", clips=4)
    mix = {str(a): 3.0, str(off): 0, str(b): 1.0}  # weight 0: never read
    ds = ClipStream(mix, num_frames=3, batch_size=8, shuffle_buffer=8, seed=11)
    batches = _take(iter(ds), 80)  # 640 samples
    tags = [int(t) for bt in batches for t in bt["sources"]]
    keys = [k for bt in batches for k in bt["keys"]]
    assert all(k.startswith({0: "a", 2: "b"}[t]) for t, k in zip(tags, keys, strict=True))  # index = mapping key
    share = tags.count(0) / len(tags)
    sd = (0.75 * 0.25 / len(tags)) ** 0.5  # binomial: 0.017
    assert abs(share - 0.75) < 4 * sd, share
    seen: dict[int, list[int]] = {}
    for bt in batches:
        shares = source_shares(seen, bt)
    assert shares == [tags.count(0) / 640, 0.0, tags.count(2) / 640]
    assert [len(bt["position"]) for bt in batches[:1]] == [1 + 2 * 2]  # slot, then (block, used) per read source
    # each source's stream is its own: every clip of both sources comes out, in well-mixed batches
    assert {k.split("_")[0] for k in keys} == {f"a{c}" for c in range(16)} | {f"b{c}" for c in range(16)}
    again = _take(iter(ClipStream(mix, num_frames=3, batch_size=8, shuffle_buffer=8, seed=11)), 3)
    assert [bt["keys"] for bt in again] == [bt["keys"] for bt in batches[:3]]  # seeded: reproducible


def _state_after(batches) -> StreamState:
    state = StreamState()
    for bt in batches:
        state.positions[int(bt["stream"])] = tuple(bt["position"])
        state.consumed += 1
    return state


def _same(x, y) -> bool:
    return (
        x["keys"] == y["keys"]
        and x["starts"].tolist() == y["starts"].tolist()
        and x["sources"].tolist() == y["sources"].tolist()
        and (x["frames"] == y["frames"]).all()
    )


@pytest.mark.parametrize("workers,cut", [(0, 3), (2, 5)])
def test_a_resumed_mixture_yields_exactly_the_uninterrupted_batches(tmp_path: Path, workers: int, cut: int):
    a = video_shards(tmp_path / "a", "a", clips=12)  # 4 shards: blocks of 4 shards (12 clips) with one consumer
    b = video_shards(tmp_path / "b", "b", clips=6)  # 2 shards
    mix = {str(a): 1.0, str(b): 1.0}

    def loader(resume=None):
        ds = ClipStream(mix, num_frames=3, batch_size=2, shuffle_buffer=4, seed=3, resume=resume)
        return DataLoader(ds, batch_size=None, num_workers=workers)

    total = 12
    whole = _take(iter(loader()), total)
    state = _state_after(whole[:cut])
    blocks = [min(4, 4 // max(1, workers)) * 3, min(2, 2 // max(1, workers)) * 3]  # clips per block of a, b
    assert all(0 < p[2] < blocks[0] and 0 < p[4] < blocks[1] for p in state.positions.values())  # mid-block
    resumed = _take(iter(loader(state)), total - cut)
    assert all(_same(x, y) for x, y in zip(whole[cut:], resumed, strict=True))
    fresh = _take(iter(loader()), total - cut)  # a run that forgot its position replays the start instead
    assert not all(_same(x, y) for x, y in zip(whole[cut:], fresh, strict=True))


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(training=True, global_rank=0, world_size=1, is_global_zero=True)


def test_datamodule_saves_and_resumes_a_mixture(tmp_path: Path, caplog):
    a = token_shards(tmp_path / "a", "a", clips=12, shard_size=3)
    b = token_shards(tmp_path / "b", "b", clips=8, shard_size=2)
    mix = {str(a): 2.0, str(b): 1.0}

    def dm(workers: int = 0, shards=mix) -> VideoDataModule:
        out = VideoDataModule(shards, num_frames=3, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=3)
        out.trainer = _fake_trainer()
        return out

    run = dm()
    it = iter(run.train_dataloader())
    for bt in _take(it, 4):
        run.on_after_batch_transfer(bt, 0)
    saved = run.state_dict()
    assert saved["sources"] == [str(a), str(b)] and len(saved["ranks"][0]["positions"]["0"]) == 5
    rest = _take(it, 4)
    again = dm()
    again.load_state_dict(saved)
    resumed = _take(iter(again.train_dataloader()), 4)
    assert [r["keys"] for r in resumed] == [r["keys"] for r in rest]
    assert [r["tokens"].tolist() for r in resumed] == [r["tokens"].tolist() for r in rest]
    # other workers: not exact, each source goes on past its own furthest block (with the existing warning)
    other = dm(workers=2)
    with caplog.at_level(logging.WARNING):
        state = other._resume_state(saved)
    assert "not batch-exact" in caplog.text
    furthest = saved["ranks"][0]["positions"]["0"]
    assert len(state.source_start) == 2 and state.source_start[0] > furthest[1] - 1 and state.source_start[1] >= 1
    # a position saved for other sources (or for one source) is not applied to these
    assert other._resume_state({**saved, "sources": [str(a)]}) == StreamState()
    single = dm(shards=str(a))
    old = {"version": 1, "num_workers": 1, "world_size": 1, "ranks": [{"consumed": 2, "positions": {"0": [1, 2]}}]}
    assert single._resume_state(old) == StreamState(2, {0: (1, 2)}, 0)  # old 2-int checkpoints still resume
    assert dm()._resume_state(old) == StreamState()


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize(
    "weights,words",
    [
        ({"A": "x"}, ["data.train_shards", "not a finite number"]),
        ({"A": None}, ["data.train_shards", "not a finite number"]),
        ({"A": True}, ["data.train_shards", "not a finite number"]),
        ({"A": float("nan")}, ["data.train_shards", "not a finite number"]),
        ({"A": -1.0, "B": 2.0}, ["data.train_shards", "-1", "0 or more"]),
        ({"A": 0, "B": 0.0}, ["data.train_shards", "sum to 0", "positive"]),
        ({}, ["data.train_shards", "empty"]),
    ],
)
def test_bad_weights_are_one_line_errors(tmp_path: Path, weights: dict, words: list[str]):
    a = token_shards(tmp_path / "a", "a", clips=2)
    shards = {str(a) if k == "A" else str(tmp_path / k): v for k, v in weights.items()}
    with pytest.raises(DataError) as e:
        ClipStream(shards, num_frames=3)
    _one_line(e, *words)
    with pytest.raises(DataError) as e:
        VideoDataModule(shards, num_workers=0).check()
    _one_line(e, *words)


def test_bad_sources_are_one_line_errors_naming_them(tmp_path: Path, caplog):
    a = token_shards(tmp_path / "a", "a", clips=2)
    missing = str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    for bad in (missing, str(tmp_path / "empty"), str(tmp_path / "x-*.tar")):
        with pytest.raises(DataError) as e:
            ClipStream({str(a): 1, bad: 1}, num_frames=3)
        _one_line(e, "data.train_shards", bad)
    # the CLI form with a weight jsonargparse cannot read arrives as a str: still the weight's error
    with pytest.raises(DataError) as e:
        VideoDataModule(f"{{{a}: 1, {missing}: lots}}", num_workers=0).check()
    _one_line(e, "data.train_shards", "not a finite number")
    # weight 0 is allowed (not even expanded), with one warning
    with caplog.at_level(logging.WARNING):
        ClipStream({str(a): 1, missing: 0}, num_frames=3)
        VideoDataModule({str(a): 1, missing: 0}, num_workers=0, num_frames=3).check()  # the check does not repeat it
    assert caplog.text.count("has weight 0") == 1


def test_check_refuses_sources_that_cannot_share_batches(tmp_path: Path):
    tokens = str(token_shards(tmp_path / "tok", "t", clips=2))
    small = str(video_shards(tmp_path / "v8", "s", clips=2, size=8))
    big = str(video_shards(tmp_path / "v16", "b", clips=2, size=16))
    with pytest.raises(DataError) as e:
        VideoDataModule({small: 1, tokens: 1}, num_frames=3, num_workers=0).check()
    _one_line(e, "data.train_shards", "video", "tokens", small, tokens)
    with pytest.raises(DataError) as e:
        VideoDataModule({small: 1, big: 1}, num_frames=3, num_workers=0).check()
    _one_line(e, "data.train_shards", "8x8", "16x16", small, big)
    # resized while loading: sizes need not agree, only the resolution
    assert VideoDataModule({small: 1, big: 1}, num_frames=3, num_workers=0, resize=True, resolution=8).check(8)
    assert VideoDataModule({small: 1, small + "/": 3}, num_frames=3, num_workers=0).check(8).width == 8
    with pytest.raises(DataError, match="expects 16x16"):  # every source is checked against the model
        VideoDataModule({small: 1, small + "/": 3}, num_frames=3, num_workers=0).check(16)


def test_validation_reads_the_union_of_a_mappings_keys(tmp_path: Path):
    a = token_shards(tmp_path / "a", "a", clips=3)
    b = token_shards(tmp_path / "b", "b", clips=2)
    keys = [k for bt in ClipStream({str(a): 5, str(b): 0}, num_frames=3, batch_size=4, train=False) for k in bt["keys"]]
    assert sorted(k.split("_")[0] for k in keys) == ["a0", "a1", "a2", "b0", "b1"]


def test_glob_patterns_expand_sorted_and_name_the_pattern_when_empty(tmp_path: Path):
    root = tmp_path / "procgen"
    token_shards(root / "maze" / "train", "m", clips=4, shard_size=2)
    token_shards(root / "coinrun" / "train", "c", clips=2, shard_size=2)
    token_shards(root / "coinrun" / "val", "v", clips=2, shard_size=2)
    urls = expand_shards(str(root / "*" / "train"))
    assert [Path(u).relative_to(root).as_posix() for u in urls] == [
        "coinrun/train/shard-000000.tar",
        "maze/train/shard-000000.tar",
        "maze/train/shard-000001.tar",
    ]
    assert expand_shards(str(root / "maze" / "train" / "shard-00000[01].tar")) == urls[1:]
    with pytest.raises(DataError) as e:
        expand_shards(str(root / "*" / "test"))
    _one_line(e, str(root / "*" / "test"))
    mixed = ClipStream({str(root / "*" / "train"): 1.0, str(root / "coinrun" / "val"): 1.0}, num_frames=3)
    assert len(mixed.sources[0].urls) == 3


def test_the_cli_parses_a_mixture():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(VideoDataModule, "data")
    args = parser.parse_args(["--data.train_shards={data/a: 1, data/b: 3}"])
    assert args.data.train_shards == {"data/a": 1.0, "data/b": 3.0}
    assert parser.parse_args(["--data.train_shards=data/a"]).data.train_shards == "data/a"
    assert parser.parse_args(["--data.train_shards=[data/a, data/b]"]).data.train_shards == ["data/a", "data/b"]
    yaml = "data:\n  train_shards:\n    data/procgen/coinrun/train: 1.0\n    data/robot/train: 3.0\n"
    assert parser.parse_string(yaml).data.train_shards == {"data/procgen/coinrun/train": 1.0, "data/robot/train": 3.0}
    args = parser.parse_args(["--data.train_shards=data/a", "--data.val_shards={data/a: 1}"])
    assert args.data.val_shards == {"data/a": 1.0}

import io
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import genie.data.loader as loader_mod
from genie.data.contract import ClipMeta, npy_bytes, write_sample
from genie.data.datamodule import VideoDataModule
from genie.data.loader import ClipStream, DataError, assign_shards, expand_shards, total_skipped
from genie.data.video import encode_clip


def _keys(stream):
    return [k for b in stream for k in b["keys"]]


def test_validation_yields_every_clip_once_with_exact_frames(indexed_shards, clip_pixels):
    folder, keys = indexed_shards
    ds = ClipStream(str(folder), num_frames=4, frame_stride=2, batch_size=3, train=False)
    batches = list(ds)
    assert sorted(_keys(batches)) == sorted(keys)
    assert [len(b["keys"]) for b in batches] == [3, 3, 2]  # last partial batch kept
    for b in batches:
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape[1:] == (4, 16, 16, 3)
        assert "actions" not in b  # one action per frame pair: none fits a step of 2 frames
        for key, start, frames in zip(b["keys"], b["starts"], b["frames"], strict=True):
            c = int(key[len("clip") :].split("_")[0])
            idx = int(start) + 2 * np.arange(4)
            assert np.array_equal(frames.numpy(), clip_pixels(c, 12, 16)[idx])  # decoded exactly those frames
    for b in ClipStream(str(folder), num_frames=4, batch_size=3, train=False):  # stride 1: the actions come along
        for key, start, acts in zip(b["keys"], b["starts"], b["actions"], strict=True):
            c = int(key[len("clip") :].split("_")[0])
            assert acts.tolist() == (int(start) + np.arange(3) + 100 * c).tolist()  # aligned with the window
    # the same windows on every pass
    again = list(ClipStream(str(folder), num_frames=4, frame_stride=2, batch_size=3, train=False))
    assert [b["starts"].tolist() for b in again] == [b["starts"].tolist() for b in batches]


def test_training_stream_is_endless_and_random(indexed_shards):
    folder, keys = indexed_shards
    ds = ClipStream(str(folder), num_frames=4, batch_size=4, train=True, shuffle_buffer=4, seed=1)
    it = iter(ds)
    batches = [next(it) for _ in range(12)]  # 48 clips from 8: several rounds
    seen = [k for b in batches for k in b["keys"]]
    assert set(seen) == set(keys)
    starts = {int(s) for b in batches for s in b["starts"]}
    assert len(starts) > 4  # random windows, not a fixed one
    # a fixed seed reproduces the stream
    it2 = iter(ClipStream(str(folder), num_frames=4, batch_size=4, train=True, shuffle_buffer=4, seed=1))
    assert [next(it2)["keys"] for _ in range(3)] == [b["keys"] for b in batches[:3]]


def test_assign_shards_two_ranks_two_workers_disjoint_and_covering():
    urls = [f"s{i}.tar" for i in range(10)]
    parts = [assign_shards(urls, r, 2, w, 2) for r in range(2) for w in range(2)]
    flat = [u for p in parts for u in p]
    assert len(flat) == len(set(flat)) == len(urls)
    assert all(p for p in parts)


def test_two_ranks_two_workers_read_disjoint_shards(shard_factory, monkeypatch):
    folder, keys = shard_factory("many", clips=16, shard_size=2)  # 8 shards
    seen: dict[tuple[int, int], set[str]] = {}
    first_blocks: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        for wid in range(2):
            monkeypatch.setattr(loader_mod, "get_worker_info", lambda w=wid: SimpleNamespace(id=w, num_workers=2))
            ds = ClipStream(str(folder), num_frames=2, batch_size=2, train=False, rank=rank, world_size=2)
            seen[(rank, wid)] = set(_keys(ds))
            # training: each consumer's first block is 2 shards of the epoch's permutation, 4 clips in 2 batches
            it = iter(ClipStream(str(folder), num_frames=2, batch_size=2, train=True, rank=rank, world_size=2))
            first_blocks[(rank, wid)] = {k for _ in range(2) for k in next(it)["keys"]}
    for split in (seen, first_blocks):
        all_keys = [k for s in split.values() for k in s]
        assert len(all_keys) == len(set(all_keys)) and set(all_keys) == set(keys)


def test_real_dataloader_workers_split_the_validation_set(shard_factory):
    folder, keys = shard_factory("dl", clips=8, shard_size=2)
    ds = ClipStream(str(folder), num_frames=2, batch_size=2, train=False)
    got = _keys(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(got) == sorted(keys)


def test_validation_with_fewer_shards_than_consumers_still_splits_exactly(shard_factory, monkeypatch):
    folder, keys = shard_factory("one", clips=6, shard_size=10)  # a single shard
    seen = []
    for rank in range(2):
        monkeypatch.setattr(loader_mod, "get_worker_info", lambda: None)
        seen.append(_keys(ClipStream(str(folder), num_frames=2, batch_size=2, train=False, rank=rank, world_size=2)))
    assert len(seen[0]) == len(seen[1]) == 3
    assert sorted(seen[0] + seen[1]) == sorted(keys)


def _append_bad_samples(path):
    """Append a truncated mp4 and a garbage-only sample to an existing shard."""
    good = path.read_bytes()
    tmp = path.with_suffix(".new")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as out:
        with tarfile.open(fileobj=io.BytesIO(good)) as src:
            for info in src:
                out.addfile(info, src.extractfile(info))
        frames = np.zeros((12, 16, 16, 3), np.uint8)
        mp4 = encode_clip(frames, 10.0, lossless=True)
        meta = ClipMeta(source="bad", fps=10.0, frames=12, width=16, height=16)
        write_sample(out, "truncated_000000", {"mp4": mp4[: len(mp4) // 3], "json": meta.to_bytes()})
        write_sample(out, "garbage_000000", {"bin": b"\x00\xff" * 50})
        write_sample(out, "noisejson_000000", {"mp4": b"junk" * 20, "json": b"{not json"})
    tmp.replace(path)


def test_corrupt_samples_are_skipped_and_counted(shard_factory):
    folder, keys = shard_factory("bad", clips=6, shard_size=3)
    _append_bad_samples(folder / "shard-000000.tar")
    batches = list(ClipStream(str(folder), num_frames=4, batch_size=2, train=False))
    assert sorted(_keys(batches)) == sorted(keys)  # every good clip still comes out
    seen: dict[int, int] = {}
    for b in batches:
        total = total_skipped(seen, b)
    assert total == 3
    # the training stream keeps going past them too
    it = iter(ClipStream(str(folder), num_frames=4, batch_size=2, train=True, shuffle_buffer=2))
    assert all(len(next(it)["keys"]) == 2 for _ in range(10))


def test_truncated_tar_is_counted_not_raised(shard_factory):
    folder, keys = shard_factory("trunc", clips=4, shard_size=2)
    p = folder / "shard-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100])
    batches = list(ClipStream(str(folder), num_frames=4, batch_size=2, train=False))
    got = _keys(batches)
    assert set(keys[:2]) <= set(got)
    assert batches[-1]["skipped"] >= 1


def test_shard_specs_brace_pipe_and_errors(shard_factory, tmp_path):
    folder, keys = shard_factory("spec", clips=4, shard_size=2)
    brace = str(folder / "shard-{000000..000001}.tar")
    assert len(expand_shards(brace)) == 2
    assert sorted(_keys(ClipStream(brace, num_frames=2, batch_size=4, train=False))) == sorted(keys)
    pipe = [f"pipe:cat {folder / 'shard-000000.tar'}", f"pipe:cat {folder / 'shard-000001.tar'}"]
    assert sorted(_keys(ClipStream(pipe, num_frames=2, batch_size=4, train=False))) == sorted(keys)
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(str(tmp_path / "nope-{000000..000003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar files"):
        expand_shards(str(tmp_path / "empty"))


def test_wrong_resolution_and_short_clips_fail_before_training(indexed_shards):
    folder, _ = indexed_shards
    dm = VideoDataModule(str(folder), num_frames=4, batch_size=2, num_workers=0)
    assert dm.check(resolution=16).width == 16
    with pytest.raises(DataError, match="expects 64x64"):
        dm.check(resolution=64)
    with pytest.raises(DataError, match="needs 20"):
        VideoDataModule(str(folder), num_frames=20, num_workers=0).check()


def test_datamodule_loaders(indexed_shards):
    folder, keys = indexed_shards
    dm = VideoDataModule(
        str(folder), val_shards=str(folder), num_frames=4, batch_size=2, num_workers=1, pin_memory=False
    )
    b = next(iter(dm.train_dataloader()))
    assert b["frames"].shape == (2, 4, 16, 16, 3)
    assert sorted(_keys(dm.val_dataloader())) == sorted(keys)


def test_continuous_actions_and_require_actions(tmp_path, shard_factory):
    folder, _ = shard_factory("noact", clips=2, actions=False)
    b = next(iter(ClipStream(str(folder), num_frames=3, batch_size=2, train=False)))
    assert "actions" not in b
    assert list(ClipStream(str(folder), num_frames=3, batch_size=2, train=False, require_actions=True)) == []
    # float actions [T-1, A] keep their shape
    from genie.data.contract import ShardWriter

    with ShardWriter(tmp_path / "cont") as w:
        meta = ClipMeta(source="robot", fps=10.0, frames=6, width=16, height=16)
        w.write(
            "r_000000",
            {
                "mp4": encode_clip(np.zeros((6, 16, 16, 3), np.uint8), 10.0, lossless=True),
                "json": meta.to_bytes(),
                "actions.npy": npy_bytes(np.ones((5, 7), np.float32)),
            },
        )
    b = next(iter(ClipStream(str(tmp_path / "cont"), num_frames=3, batch_size=1, train=False)))
    assert b["actions"].dtype == torch.float32 and b["actions"].shape == (1, 2, 7)


def _token_shard(out, frames: int = 8) -> None:
    from genie.data.contract import ShardWriter

    with ShardWriter(out) as w:
        for c in range(3):
            meta = ClipMeta(source="tok", fps=10.0, frames=frames, width=16, height=16, video_id=f"v{c}")
            members = {"json": meta.to_bytes(), "tokens.npy": npy_bytes(np.zeros((frames, 2, 2), np.uint16))}
            members["latent_actions.npy"] = npy_bytes(np.arange(frames - 1, dtype=np.int64))
            w.write(f"v{c}_000000", members)


def test_actions_at_a_frame_stride_are_refused_or_left_out(tmp_path, shard_factory):
    """One action per consecutive frame pair: at frame_stride 2 no action fits a step, so none is ever misaligned."""
    folder, _ = shard_factory("acts", clips=4)
    with pytest.raises(DataError, match="frame_stride=1"):
        next(iter(ClipStream(str(folder), num_frames=3, frame_stride=2, batch_size=2, require_actions=True)))
    b = next(iter(ClipStream(str(folder), num_frames=3, frame_stride=2, batch_size=2)))
    assert "actions" not in b and b["frames"].shape[1] == 3
    dm = VideoDataModule(str(folder), num_frames=3, frame_stride=2, require_actions=True)
    with pytest.raises(DataError, match="actions.npy holds one action per consecutive frame pair"):
        dm.check(resolution=16)
    VideoDataModule(str(folder), num_frames=3, frame_stride=2).check(resolution=16)  # not required: fine
    tokens = tmp_path / "tok"
    _token_shard(tokens)
    with pytest.raises(DataError, match="latent_actions.npy"):
        VideoDataModule(str(tokens), num_frames=3, frame_stride=2).check(resolution=16)
    with pytest.raises(DataError, match="latent_actions.npy"):
        next(iter(ClipStream(str(tokens), num_frames=3, frame_stride=2, batch_size=2)))
    b = next(iter(ClipStream(str(tokens), num_frames=3, batch_size=2)))  # stride 1: the actions of the window
    assert b["latent_actions"].tolist() == [[s, s + 1] for s in b["starts"].tolist()]

"""The training stream's order: even shard coverage, well-mixed batches, per-consumer randomness, exact resume."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader

import genie.data.loader as loader_mod
from genie.data.loader import ClipStream, ShardSchedule, StreamState


def _shard_of(key: str, shard_size: int) -> int:
    return int(key[len("clip") :].split("_")[0]) // shard_size


@pytest.mark.parametrize("shards,consumers", [(10, 8), (3, 8), (7, 2), (16, 4)])
def test_every_shard_is_read_equally_often(shards: int, consumers: int):
    schedule = ShardSchedule(shards, seed=5, consumers=consumers, interleave=4)
    blocks = 60
    reads = Counter(s for c in range(consumers) for b in range(blocks) for s in schedule.block(c, b))
    total = consumers * blocks * schedule.width
    assert set(reads) == set(range(shards))
    # every epoch of the sequence holds each shard once: counts differ by at most the one unfinished epoch
    assert max(reads.values()) - min(reads.values()) <= 1, (total, reads)


def test_ten_shards_over_eight_consumers_read_evenly_by_the_stream(shard_factory, monkeypatch):
    folder, keys = shard_factory("ten", clips=40, shard_size=4, frames=4, size=8)  # 10 shards of 4 clips
    reads: Counter[int] = Counter()
    for rank in range(2):
        for wid in range(4):
            monkeypatch.setattr(loader_mod, "get_worker_info", lambda w=wid: SimpleNamespace(id=w, num_workers=4))
            it = iter(ClipStream(str(folder), num_frames=2, batch_size=2, train=True, rank=rank, world_size=2, seed=3))
            reads.update(_shard_of(k, 4) for _ in range(20) for k in next(it)["keys"])  # 10 shards' worth each
    assert sorted(reads) == list(range(10))
    assert max(reads.values()) - min(reads.values()) <= 4  # one shard's clips of slack (an epoch boundary)


def test_batches_mix_several_shards(shard_factory):
    """Interleaving: a batch draws from several shards (videos), not from one shard's run of clips."""
    folder, _ = shard_factory("mix", clips=64, shard_size=8, frames=4, size=8)  # 8 shards, one "video" per clip
    it = iter(ClipStream(str(folder), num_frames=2, batch_size=8, train=True, shuffle_buffer=8, interleave=4))
    per_batch = [len({_shard_of(k, 8) for k in next(it)["keys"]}) for _ in range(16)]
    assert min(per_batch) >= 2 and sum(per_batch) / len(per_batch) >= 3
    # without interleaving, a batch comes from one or two shards
    it = iter(ClipStream(str(folder), num_frames=2, batch_size=8, train=True, shuffle_buffer=8, interleave=1))
    single = [len({_shard_of(k, 8) for k in next(it)["keys"]}) for _ in range(16)]
    assert sum(single) / len(single) < sum(per_batch) / len(per_batch)


def test_consumers_draw_their_own_windows(shard_factory, monkeypatch):
    folder, _ = shard_factory("one", clips=6, shard_size=10, frames=12, size=8)  # one shard: every consumer reads it
    starts = []
    for rank in range(2):
        monkeypatch.setattr(loader_mod, "get_worker_info", lambda: None)
        it = iter(ClipStream(str(folder), num_frames=2, batch_size=6, train=True, rank=rank, world_size=2, seed=1))
        b = next(it)
        starts.append(dict(zip(b["keys"], b["starts"].tolist(), strict=True)))
    assert starts[0] != starts[1]
    # and each is reproducible
    it = iter(ClipStream(str(folder), num_frames=2, batch_size=6, train=True, rank=1, world_size=2, seed=1))
    b = next(it)
    assert dict(zip(b["keys"], b["starts"].tolist(), strict=True)) == starts[1]


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _state_after(batches) -> StreamState:
    """What the data module records from the batches a run consumed (see VideoDataModule.on_after_batch_transfer)."""
    state = StreamState()
    for b in batches:
        state.positions[int(b["stream"])] = tuple(b["position"])
        state.consumed += 1
    return state


def _same(a, b) -> bool:
    return (
        a["keys"] == b["keys"] and a["starts"].tolist() == b["starts"].tolist() and (a["frames"] == b["frames"]).all()
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 7])
def test_a_resumed_stream_yields_exactly_the_uninterrupted_batches(shard_factory, workers: int, cut: int):
    folder, _ = shard_factory("res", clips=24, shard_size=3, frames=8, size=8)  # 8 shards, blocks of 3-6 clips

    def loader(resume=None):
        ds = ClipStream(str(folder), num_frames=3, batch_size=2, train=True, shuffle_buffer=4, seed=7, resume=resume)
        return DataLoader(ds, batch_size=None, num_workers=workers)

    whole = _batches(loader(), 16)
    resumed = _batches(loader(_state_after(whole[:cut])), 16 - cut)
    assert all(_same(a, b) for a, b in zip(whole[cut:], resumed, strict=True))
    fresh = _batches(loader(), 16 - cut)  # a run that forgot its position replays the start instead
    assert not all(_same(a, b) for a, b in zip(whole[cut:], fresh, strict=True))

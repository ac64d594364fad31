"""The shard order of every prep: clips mixed across videos, seeded, and the same for any --workers."""

from __future__ import annotations

import hashlib
from math import comb
from pathlib import Path

import numpy as np

from data_prep.common import shard_order
from genie.cli import main
from genie.data.contract import ClipMeta, read_samples
from genie.data.video import encode_clip

WINDOW = 32  # clips in a run of the stream, about what one batch of a small shuffle buffer holds


def distinct_per_window(video_ids: list[str], window: int = WINDOW) -> list[int]:
    """Distinct videos in each consecutive, non-overlapping run of ``window`` clips."""
    return [len(set(video_ids[i : i + window])) for i in range(0, len(video_ids) - window + 1, window)]


def expected_distinct(counts: list[int], window: int = WINDOW) -> float:
    """Mean distinct videos among ``window`` clips drawn without replacement (a full random permutation)."""
    total = sum(counts)
    return sum(1 - comb(total - c, window) / comb(total, window) for c in counts)


def test_order_interleaves_the_videos_and_is_seeded():
    counts = [5, 3, 0, 7, 1]
    order = shard_order(counts, seed=0)
    assert order.dtype == np.int32 and np.bincount(order, minlength=5).tolist() == counts
    assert not np.all(np.diff(order) >= 0)  # mixed, not video after video
    assert np.array_equal(order, shard_order(counts, seed=0))
    assert not np.array_equal(order, shard_order(counts, seed=1))
    assert not np.array_equal(order, shard_order(counts, seed=0, stream=1))  # parts of a split run
    assert shard_order(counts, seed=None).tolist() == [0] * 5 + [1] * 3 + [3] * 7 + [4]
    assert shard_order([], seed=0).size == 0


def test_order_mixes_as_well_as_a_full_permutation():
    counts = [int(c) for c in np.random.default_rng(0).integers(1, 40, 60)]  # uneven videos
    labels = shard_order(counts, seed=0).tolist()
    got = np.mean(distinct_per_window(labels))
    assert abs(got - expected_distinct(counts)) < 1.0, (got, expected_distinct(counts))
    assert np.mean(distinct_per_window(shard_order(counts, seed=None).tolist())) < 3  # the old order


# -- genie prep videos ---------------------------------------------------------------------------------

VIDEOS, FRAMES, CLIP = 24, 32, 4  # 24 videos of 8 clips each


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(VIDEOS):
        frames = rng.integers(0, 256, (FRAMES, 16, 16, 3), dtype=np.uint8)
        (src / f"v{i:02d}.mp4").write_bytes(encode_clip(frames, 10.0, lossless=True))
    return src


def _prep(src: Path, out: Path, *extra: str) -> Path:
    common = ["--size", "16", "--fps", "0", "--clip-frames", str(CLIP), "--lossless", "--shard-size", "64"]
    assert main(["prep", "videos", str(src), "--out", str(out), *common, *extra]) == 0
    return out


def _clips(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(out.glob("*.tar")) for s in read_samples(p)]


def _video_ids(out: Path) -> list[str]:
    return [ClipMeta.from_bytes(m["json"]).video_id for _, m in _clips(out)]


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_videos_are_mixed_in_every_shard_and_identical_for_any_workers(tmp_path):
    src = _source(tmp_path)
    mixed = _prep(src, tmp_path / "mixed", "--workers", "0")
    ids = _video_ids(mixed)
    assert len(ids) == VIDEOS * FRAMES // CLIP == 192 and len(set(ids)) == VIDEOS
    # the first 32 clips of shard 0: 18.6 distinct videos expected of a random order (20 here, 16-23 for seeds
    # 0-5), 4 in file order
    first = ids[:WINDOW]
    assert len(set(first)) >= 14, first
    assert min(distinct_per_window(ids)) >= 14
    # every video's clips stay in their order (each part is read front to back)
    seen: dict[str, int] = {}
    for key, members in _clips(mixed):
        meta = ClipMeta.from_bytes(members["json"])
        assert meta.clip_index == seen.get(meta.video_id, -1) + 1 and key.endswith(f"_{meta.clip_index:06d}")
        seen[meta.video_id] = meta.clip_index
    assert _digest(_prep(src, tmp_path / "parallel", "--workers", "2")) == _digest(mixed)

    # the same clips, byte for byte, whatever the order
    in_order = _prep(src, tmp_path / "in-order", "--workers", "0", "--shuffle-seed", "-1")
    assert max(distinct_per_window(_video_ids(in_order))) <= 5  # video after video
    assert sorted(_clips(in_order)) == sorted(_clips(mixed))
    other = _prep(src, tmp_path / "other", "--workers", "0", "--shuffle-seed", "1")
    assert sorted(_clips(other)) == sorted(_clips(mixed)) and _video_ids(other) != ids

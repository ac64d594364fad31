"""Fixtures for the data tests: small shard folders written by the test itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genie.data.contract import ClipMeta, ShardWriter, clip_key, npy_bytes
from genie.data.video import encode_clip


def indexed_clip(clip: int, frames: int, size: int) -> np.ndarray:
    """Frames whose pixels say which clip and frame they are: channel 0 = frame, 1 = clip."""
    out = np.zeros((frames, size, size, 3), np.uint8)
    out[..., 0] = (np.arange(frames) * 5 % 256)[:, None, None]
    out[..., 1] = clip * 3 % 256
    out[:, : size // 2, : size // 2, 2] = 200  # some structure
    return out


def write_indexed_shards(
    out: Path,
    clips: int,
    frames: int = 12,
    size: int = 16,
    shard_size: int = 2,
    actions: bool = True,
    prefix: str = "shard",
) -> list[str]:
    """Shards of lossless indexed clips; returns the keys in order."""
    keys = []
    with ShardWriter(out, prefix=prefix, shard_size=shard_size) as w:
        for c in range(clips):
            key = clip_key(f"clip{c}", 0)
            meta = ClipMeta(
                source=f"test{c}", fps=10.0, frames=frames, width=size, height=size, video_id=f"clip{c}", lossless=True
            )
            members = {"mp4": encode_clip(indexed_clip(c, frames, size), 10.0, lossless=True), "json": meta.to_bytes()}
            if actions:
                members["actions.npy"] = npy_bytes(np.arange(frames - 1, dtype=np.int64) + 100 * c)
            w.write(key, members)
            keys.append(key)
    return keys


@pytest.fixture
def indexed_shards(tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "shards"
    return out, write_indexed_shards(out, clips=8)


@pytest.fixture
def shard_factory(tmp_path: Path):
    """``make(name, clips, **kw) -> (folder, keys)`` writing indexed shards under tmp_path."""

    def make(name: str, clips: int, **kw) -> tuple[Path, list[str]]:
        out = tmp_path / name
        return out, write_indexed_shards(out, clips, **kw)

    return make


@pytest.fixture
def clip_pixels():
    """The generator of indexed clip pixels (to compare decoded frames against)."""
    return indexed_clip

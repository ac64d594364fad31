"""Choosing which frames of a clip to decode: pure functions, no I/O."""

from __future__ import annotations

import hashlib

import numpy as np


def window_span(num_frames: int, stride: int) -> int:
    """Number of source frames a window of ``num_frames`` frames at ``stride`` covers."""
    return (num_frames - 1) * stride + 1


def sample_window(
    clip_frames: int,
    num_frames: int,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    start: int | None = None,
) -> np.ndarray:
    """Frame indices of one window of ``num_frames`` frames, ``stride`` apart, inside a clip.

    Every valid start ``0 .. clip_frames - span`` is equally likely; a window never runs past
    the clip. Pass ``start`` to pick the window deterministically.

    Returns:
        int64 array ``[num_frames]`` of frame indices.

    Raises:
        ValueError: the clip is shorter than one window.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    span = window_span(num_frames, stride)
    last_start = clip_frames - span
    if last_start < 0:
        raise ValueError(
            f"clip has {clip_frames} frames, a window of {num_frames} frames at stride {stride} needs {span}"
        )
    if start is None:
        rng = rng if rng is not None else np.random.default_rng()
        start = int(rng.integers(0, last_start + 1))
    elif not 0 <= start <= last_start:
        raise ValueError(f"window start {start} outside 0..{last_start}")
    return start + stride * np.arange(num_frames, dtype=np.int64)


def fixed_start(key: str, clip_frames: int, num_frames: int, stride: int, seed: int = 0) -> int:
    """A deterministic window start for a clip key (the same on every run, rank and worker)."""
    last_start = clip_frames - window_span(num_frames, stride)
    if last_start <= 0:
        return 0
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (last_start + 1)

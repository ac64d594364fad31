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


def windows_per_video(video_frames: int, num_frames: int, stride: int, every: int | None, cap: int) -> int:
    """How many training windows one pass takes from a whole video: one per ``every`` frames, 1 to ``cap``.

    So an hour of footage yields samples in proportion to its length (up to ``cap``, which bounds how much of a
    batch one video can fill), while a clip shorter than ``every`` frames still yields one. ``every=None`` gives
    one window per video.
    """
    if every is None or every <= 0:
        return 1
    usable = video_frames - window_span(num_frames, stride) + 1
    return int(max(1, min(cap, usable // every)))


def stratified_start(
    clip_frames: int, num_frames: int, stride: int, part: int, parts: int, rng: np.random.Generator
) -> int:
    """A random window start in the ``part``-th of ``parts`` equal slices of the valid starts.

    The windows of one video, one per part, then cover it evenly instead of clumping by chance.
    """
    last_start = clip_frames - window_span(num_frames, stride)
    if last_start < 0:
        raise ValueError(
            f"clip has {clip_frames} frames, a window of {num_frames} frames at stride {stride} needs "
            f"{window_span(num_frames, stride)}"
        )
    lo = (last_start + 1) * part // parts
    hi = max(lo + 1, (last_start + 1) * (part + 1) // parts)
    return int(rng.integers(lo, hi))

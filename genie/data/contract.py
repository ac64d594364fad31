"""The shard contract: how one clip is stored in a webdataset tar, and how shards are named.

Every producer (``genie prep ...``) writes through :class:`ShardWriter` and every consumer
(the loader, ``genie prep inspect``) reads the members named here, so the format lives in
one place.

A sample is one clip with a dot-free key ``{video_id}_{clip:06d}`` and members:

- ``mp4``: the clip, H.264, already at the dataset's training resolution;
- ``json``: :class:`ClipMeta` (source, fps, frames, width, height, start time, ...);
- ``actions.npy`` (optional): int64 ``[T-1]`` or float32 ``[T-1, action_dim]`` ground-truth actions,
  ``actions[t]`` being the action taken between frame ``t`` and frame ``t+1``;
- ``tokens.npy`` / ``latent_actions.npy`` (optional): precomputed model inputs.

The loader also reads *whole videos* from shards other tools wrote, video2dataset's layout
being the usual one: a video member (``mp4``; ``webm``, ``mkv``, ``mov``, ``avi`` also work) and
a ``json`` that is not a :class:`ClipMeta` (video2dataset writes ``url``, ``key``, ``status``,
``caption``, ``video_metadata`` ...). :func:`is_clip_meta` tells the two apart: a json with all of
``fps``, ``frames``, ``width`` and ``height`` is ours, anything else is a whole video whose frame
count, size and rate are read from the video itself. Such a video is windowed, resized and
cropped while loading (see :mod:`genie.data.loader`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_MEMBER = "mp4"
META_MEMBER = "json"
ACTIONS_MEMBER = "actions.npy"
TOKENS_MEMBER = "tokens.npy"
LATENT_ACTIONS_MEMBER = "latent_actions.npy"

# members a whole video (not a ClipMeta clip) may be stored under, in order of preference
WHOLE_VIDEO_MEMBERS = (VIDEO_MEMBER, "webm", "mkv", "mov", "avi")
# ClipMeta.extra flag set on metadata made up from a whole video (probe_meta, inspect)
WHOLE_VIDEO = "whole_video"
CLIP_META_REQUIRED = ("fps", "frames", "width", "height")

SHARD_PATTERN = "{prefix}-{index:06d}.tar"
_KEY_SAFE = re.compile(r"[^A-Za-z0-9-]+")


@dataclass
class ClipMeta:
    """Metadata stored as the ``json`` member of every clip."""

    source: str  # where the clip came from (relative path, or e.g. "coinrun:level=12")
    fps: float  # frames per second of the stored clip
    frames: int  # number of frames in the stored clip
    width: int  # stored frame width in pixels
    height: int  # stored frame height in pixels
    start_time: float = 0.0  # seconds from the start of the source video / episode
    video_id: str = ""  # dot-free id shared by all clips of one source
    clip_index: int = 0  # index of this clip within its source
    lossless: bool = False  # True when encoded frame-exact (libx264rgb, crf 0)
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific fields

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClipMeta:
        """Parse and check the ``json`` member. Raises ValueError on anything malformed."""
        return cls.from_dict(load_meta_json(data))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClipMeta:
        """Check a parsed ``json`` member. Raises ValueError on anything malformed."""
        known = {f.name for f in dataclasses.fields(cls)}
        missing = set(CLIP_META_REQUIRED) - raw.keys()
        if missing:
            raise ValueError(f"clip metadata lacks field(s) {sorted(missing)}")
        meta = cls(**{k: v for k, v in raw.items() if k in known})
        for name in ("frames", "width", "height"):
            if not isinstance(getattr(meta, name), int) or getattr(meta, name) < 1:
                raise ValueError(f"clip metadata field {name!r} must be a positive integer")
        if not isinstance(meta.fps, int | float) or meta.fps <= 0:
            raise ValueError("clip metadata field 'fps' must be a positive number")
        return meta


def load_meta_json(data: bytes) -> dict[str, Any]:
    """The ``json`` member as a dict (ours or another tool's). Raises ValueError unless a JSON object."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"clip metadata is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"clip metadata must be a JSON object, got {type(raw).__name__}")
    return raw


def is_clip_meta(raw: dict[str, Any]) -> bool:
    """Whether a parsed ``json`` member is our :class:`ClipMeta` (else: a whole video's, e.g. video2dataset's)."""
    return all(k in raw for k in CLIP_META_REQUIRED)


def whole_video_member(sample: dict[str, Any]) -> str | None:
    """The member holding a sample's video (``mp4`` first), or None."""
    return next((m for m in WHOLE_VIDEO_MEMBERS if m in sample), None)


def shard_glob(prefix: str) -> str:
    """A glob matching exactly the shards ``{prefix}-000000.tar ...``: not another prefix's, nor a part's
    (``{prefix}-p0001-000000.tar``)."""
    return f"{glob.escape(prefix)}-{'[0-9]' * 6}.tar"


def make_video_id(name: str) -> str:
    """A readable, dot-free, collision-resistant id for a source (e.g. a relative path).

    >>> make_video_id("holidays/beach day.MP4")  # doctest: +ELLIPSIS
    'holidays-beach-day-MP4-...'
    """
    stem = _KEY_SAFE.sub("-", name).strip("-")[-48:] or "video"
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def clip_key(video_id: str, clip_index: int) -> str:
    """Sample key ``{video_id}_{clip:06d}``; webdataset treats everything after a dot as extension."""
    if "." in video_id:
        raise ValueError(f"video_id {video_id!r} contains a dot; webdataset keys must be dot-free")
    return f"{video_id}_{clip_index:06d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample to an open tar with fixed metadata, so equal input gives equal bytes."""
    for name in sorted(members):
        data = members[name]
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = "genie"
        tar.addfile(info, io.BytesIO(data))


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): like webdataset, split at the first dot of the
    file name (not of the folders)."""
    folder, _, base = name.rpartition("/")
    key, _, member = base.partition(".")
    return (f"{folder}/{key}" if folder else key), member


def read_samples(path: str | os.PathLike) -> list[tuple[str, dict[str, bytes]]]:
    """Read a whole (small) tar back as ``[(key, {member: bytes})]`` in file order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, member = split_member_name(info.name)
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if out and out[-1][0] == key:
                out[-1][1][member] = data
            else:
                out.append((key, {member: data}))
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardWriter:
    """Writes samples into ``{prefix}-000000.tar, ...`` with ``shard_size`` samples each.

    Each shard is written under a temporary name and renamed when complete, so a killed run
    never leaves a half-written shard under a final name.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", shard_size: int = 100):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            final = self.out_dir / SHARD_PATTERN.format(prefix=self.prefix, index=len(self.paths))
            self._tmp = final.with_name(final.name + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
            self.paths.append(final)
        write_sample(self._tar, key, members)
        self._count += 1
        self.samples += 1
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is not None and self._tmp is not None:
            self._tar.close()
            os.replace(self._tmp, self.paths[-1])
        self._tar, self._tmp, self._count = None, None, 0

    def close(self) -> list[Path]:
        self._finish()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

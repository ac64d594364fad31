"""Streaming clips out of webdataset shards: shard assignment, windows, decoding, batching.

Shapes: B batch, T frames per window, H W pixels, C = 3 channels.

Pipeline per DataLoader worker (all work happens inside the workers, the main process only
receives ready batches):

    urls -> this consumer's shards (split by rank and worker) -> tar samples (webdataset)
         -> shuffle buffer of *encoded* samples (cheap to hold) -> pick a window
         -> decode only its frames -> batch -> {"frames": uint8 [B, T, H, W, C], ...}

Training streams forever (a fresh shuffled pass over the consumer's shards each round), so
runs are measured in ``max_steps``; validation reads a fixed set of clips once, with a
deterministic window per clip, identical on every run. Corrupt samples are skipped, counted
and logged, never raised.

Two kinds of samples, told apart by their ``json`` (:func:`genie.data.contract.is_clip_meta`):

- **Our clips** (``genie prep ...``): short, already at the training resolution, with a
  :class:`ClipMeta` that gives the frame count. The window's frames are decoded and used as they
  are (the fast path); a clip of another size is skipped, or resized when ``resize=True``.
- **Whole videos** from other tools, video2dataset's ``mp4`` + ``json`` layout being the usual
  one: any length, size and aspect, and metadata we do not rely on. The frame count, size and
  rate come from the video's container header (:func:`genie.data.video.probe_video`, about a
  millisecond for an mp4, nothing decoded); a window is sampled over the whole video; only its
  frames are decoded, straight to the reduced size where decord allows it, then center-cropped
  to ``resolution`` (required for them). A video2dataset ``status`` other than ``success``, an
  undecodable or too-short video is skipped and counted like any bad clip. Each pass yields one
  window per video, so a long video is seen as often as a short one.

The shuffle buffer holds encoded samples: a few KB for our clips, but whole videos are MBs, so
the buffer is also capped in bytes (``shuffle_bytes``) and holds fewer of them.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from genie.data.contract import (
    ACTIONS_MEMBER,
    LATENT_ACTIONS_MEMBER,
    META_MEMBER,
    TOKENS_MEMBER,
    VIDEO_MEMBER,
    WHOLE_VIDEO,
    ClipMeta,
    is_clip_meta,
    load_meta_json,
    npy_load,
    whole_video_member,
)
from genie.data.video import Backend, DecodeError, VideoInfo, decode_clip, decode_resized, probe_video
from genie.data.windows import fixed_start, sample_window, window_span

log = logging.getLogger(__name__)

# Log the first few bad samples of each worker in full, then only count them.
_MAX_LOGGED_ERRORS = 5


class DataError(ValueError):
    """The data given to a run is unusable as a whole (no shards, wrong resolution, ...)."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def expand_shards(spec: str | Sequence[str], check_exists: bool = True) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    Accepts a folder (every ``*.tar`` beneath it, sorted, hidden folders such as an unfinished prep
    run's ``.parts/`` skipped; so parts written by a ``genie prep videos --parts`` job array are read
    together), a brace pattern
    (``data/shard-{000000..000009}.tar``), ``::``-separated lists, ``pipe:`` commands and other
    URLs (``s3://``, ``https://``, opened through webdataset), or a list of any of these.

    Raises:
        DataError: nothing matched, or a local path does not exist.
    """
    from webdataset.shardlists import expand_urls

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for url in expand_urls(str(s)):
            local = url[len("file://") :] if url.startswith("file://") else url
            if not _is_remote(url) and Path(local).is_dir():
                found = _tars_under(Path(local))
                if not found:
                    raise DataError(f"shard folder {local} holds no .tar files; run `genie prep ...` first")
                urls.extend(found)
            elif not _is_remote(url) and check_exists and not Path(local).exists():
                raise DataError(f"shard path {local} does not exist; check the data path in your config")
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"no shards match {spec!r}")
    return urls


def _tars_under(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if f.endswith(".tar")]
    return sorted(found)


def consumer_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker_id, num_workers)`` of the code running now.

    Rank comes from an initialized process group, else the RANK / WORLD_SIZE environment of
    torchrun, SLURM and Lightning launchers; explicit arguments override both (tests).
    """
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
            world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    info = get_worker_info()
    worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker_id, num_workers


def assign_shards(urls: Sequence[str], rank: int, world_size: int, worker_id: int, num_workers: int) -> list[str]:
    """This consumer's shards: every ``world_size * num_workers``-th shard, interleaved.

    Consumers get disjoint sets that together cover ``urls``; with fewer shards than consumers
    some consumers get none (the caller decides what to do about that).
    """
    consumers = world_size * num_workers
    me = rank * num_workers + worker_id
    return list(urls[me::consumers])


@dataclass
class StreamStats:
    """Per-worker counters; the cumulative values travel with every batch."""

    samples: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def bad(self, key: str, reason: str, where: str) -> None:
        self.skipped += 1
        kind = reason.split(":")[0][:80]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if self.skipped <= _MAX_LOGGED_ERRORS:
            log.warning("skipping bad sample %s (%s): %s", key, where, reason)


class ClipStream(IterableDataset):
    """An iterable of batches of clip windows read from webdataset shards.

    Args:
        shards: shard spec or list of URLs (see :func:`expand_shards`).
        num_frames: T, frames per window.
        frame_stride: take every ``frame_stride``-th frame of the clip.
        batch_size: clips per batch (batched inside the worker); the last batch of a
            validation pass may be smaller.
        train: True streams forever with random windows and shuffling; False reads every
            clip once with a deterministic window.
        shuffle_buffer: number of encoded samples to shuffle over (training only).
        shuffle_bytes: and at most this many bytes of them (whole videos are MBs each).
        seed: base seed; each rank/worker/round derives its own from it.
        backend: decode backend (``auto``: decord, PyAV fallback).
        require_actions: skip (and count) clips without ``actions.npy`` instead of yielding
            batches without actions.
        resolution: square frame size. Our clips of another size are skipped and counted (unless
            ``resize``); whole videos (video2dataset shards) are always resized and center-cropped
            to it, and are skipped when it is None.
        resize: also resize and center-crop our own clips of another size instead of skipping them.
        rank, world_size: override the distributed position (tests, custom launchers).
        max_clips: validation only: stop after this many clips per consumer.

    Yields:
        dicts with ``frames`` uint8 ``[B, T, H, W, C]`` (video shards) or ``tokens`` int64 ``[B, T, h, w]``
        and ``latent_actions`` int64 ``[B, T-1]`` (token shards from ``genie prep tokenize``), ``actions``
        (int64 ``[B, T-1]`` or float32 ``[B, T-1, A]``, only when every clip of the batch has them), ``keys``,
        ``starts`` int64 ``[B]`` (window start frame), ``worker`` (``rank * workers + worker``)
        and ``skipped`` (that worker's cumulative count of bad samples).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        num_frames: int = 16,
        frame_stride: int = 1,
        batch_size: int = 8,
        train: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        backend: Backend = "auto",
        require_actions: bool = False,
        resolution: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        max_clips: int | None = None,
        resize: bool = False,
        shuffle_bytes: int = 256 << 20,
    ):
        super().__init__()
        self.urls = expand_shards(shards)
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.batch_size = batch_size
        self.train = train
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.shuffle_bytes = shuffle_bytes
        self.resize = resize
        self.seed = seed
        self.backend: Backend = backend
        self.require_actions = require_actions
        self.resolution = resolution
        self.rank, self.world_size = rank, world_size
        self.max_clips = max_clips
        self.stats = StreamStats()
        if num_frames < 1 or frame_stride < 1 or batch_size < 1:
            raise DataError("num_frames, frame_stride and batch_size must all be >= 1")
        if resize and resolution is None:
            raise DataError("resize=True needs a resolution to resize to")

    # -- shards and raw samples -------------------------------------------------------------

    def my_shards(self) -> tuple[list[str], int, int]:
        """This consumer's shards, its index (rank * workers + worker) and the sample-split modulus.

        With at least as many shards as consumers, shards are split and the modulus is 1. With
        fewer, training consumers all read every shard (each in its own seeded order), and
        validation consumers read every shard but keep every ``consumers``-th clip, so the
        fixed validation set is still split exactly and no rank sits idle.
        """
        rank, world, wid, nw = consumer_info(self.rank, self.world_size)
        me, consumers = rank * nw + wid, world * nw
        if len(self.urls) >= consumers:
            return assign_shards(self.urls, rank, world, wid, nw), me, 1
        return list(self.urls), me, 1 if self.train else consumers

    def _raw_samples(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Tar samples ``{"__key__", "__url__", member: bytes}``; broken tars are counted, not raised."""
        from webdataset.tariterators import tarfile_samples

        def handler(exn: Exception) -> bool:
            self.stats.bad("<shard>", f"{type(exn).__name__}: {exn}", "tar")
            return True  # keep going with the next member / shard

        for url in urls:
            yield from tarfile_samples([{"url": url}], handler=handler)

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Shuffle through a buffer of ``shuffle_buffer`` samples and at most ``shuffle_bytes`` bytes."""
        buf: list[dict[str, Any]] = []
        held = 0
        for s in samples:
            n = _nbytes(s)
            if len(buf) < self.shuffle_buffer and (held + n <= self.shuffle_bytes or not buf):
                buf.append(s)
                held += n
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            held += n - _nbytes(s)
            yield s
            while held > self.shuffle_bytes and len(buf) > 1:  # a big sample came in: let more out
                s = buf.pop(rng.randrange(len(buf)))
                held -= _nbytes(s)
                yield s
        rng.shuffle(buf)
        yield from buf

    # -- one clip -----------------------------------------------------------------------------

    def load_clip(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        """Decode one window of one raw sample. Raises on any problem with the sample."""
        key = sample.get("__key__", "?")
        video = whole_video_member(sample)
        is_tokens = video is None and TOKENS_MEMBER in sample
        if not is_tokens and video is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise DecodeError(f"no {VIDEO_MEMBER} or {TOKENS_MEMBER} member (has {members})")
        if META_MEMBER not in sample:
            raise DecodeError(f"no {META_MEMBER} member")
        try:
            raw = load_meta_json(sample[META_MEMBER])
        except ValueError as e:
            raise DecodeError(f"bad json metadata: {e}") from e
        if video is not None and not is_clip_meta(raw):
            return self._load_whole_video(key, sample, video, raw, rng)
        try:
            meta = ClipMeta.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise DecodeError(f"bad json metadata: {e}") from e
        resized = False
        if self.resolution is not None and (meta.height, meta.width) != (self.resolution, self.resolution):
            if not self.resize or is_tokens:
                raise DecodeError(f"clip is {meta.width}x{meta.height}, expected {self.resolution}x{self.resolution}")
            resized = True
        idx = self._window(key, meta.frames, rng, "clip")
        out: dict[str, Any] = {"key": key, "start": int(idx[0])}
        if is_tokens:
            out.update(self._load_tokens(sample, meta, idx))
        elif resized:
            info = VideoInfo(frames=meta.frames, width=meta.width, height=meta.height, fps=meta.fps)
            out["frames"] = decode_resized(sample[video], idx.tolist(), self.resolution, self.backend, info)
        else:
            frames = decode_clip(sample[video], idx.tolist(), self.backend)
            if frames.shape[1:3] != (meta.height, meta.width):
                raise DecodeError(
                    f"decoded {frames.shape[2]}x{frames.shape[1]}, metadata says {meta.width}x{meta.height}"
                )
            out["frames"] = frames
        return self._add_actions(out, sample, meta.frames, idx, "clip")

    def _window(self, key: str, frames: int, rng: np.random.Generator | None, what: str) -> np.ndarray:
        """The window's frame indices: random (training) or fixed per key (validation)."""
        span = window_span(self.num_frames, self.frame_stride)
        if frames < span:
            raise DecodeError(f"{what} has {frames} frames, window needs {span}")
        if rng is None:
            start = fixed_start(key, frames, self.num_frames, self.frame_stride, self.seed)
            return sample_window(frames, self.num_frames, self.frame_stride, start=start)
        return sample_window(frames, self.num_frames, self.frame_stride, rng=rng)

    def _add_actions(
        self, out: dict[str, Any], sample: dict[str, Any], frames: int, idx: np.ndarray, what: str
    ) -> dict[str, Any]:
        if ACTIONS_MEMBER in sample:
            actions = npy_load(sample[ACTIONS_MEMBER])
            if actions.shape[0] != frames - 1:
                raise DecodeError(f"{ACTIONS_MEMBER} has {actions.shape[0]} rows, {what} has {frames} frames")
            # the action taken at each kept frame except the last (exact for stride 1)
            out["actions"] = actions[idx[:-1]]
        elif self.require_actions:
            raise DecodeError(f"no {ACTIONS_MEMBER} (this run requires actions)")
        return out

    def _load_whole_video(
        self, key: str, sample: dict[str, Any], member: str, raw: dict[str, Any], rng: np.random.Generator | None
    ) -> dict[str, Any]:
        """One window of a whole video without our clip metadata (e.g. video2dataset's ``mp4`` + ``json``)."""
        if self.resolution is None:
            raise DecodeError("whole video (no clip metadata, e.g. video2dataset) needs a resolution to resize to")
        status = raw.get("status")
        if status is not None and status != "success":
            raise DecodeError(f"video2dataset status {str(status)[:40]!r}")
        data = sample[member]
        info = probe_video(data)
        idx = self._window(key, info.frames, rng, "video")
        out = {"key": key, "start": int(idx[0])}
        out["frames"] = decode_resized(data, idx.tolist(), self.resolution, self.backend, info)
        return self._add_actions(out, sample, info.frames, idx, "video")

    @staticmethod
    def _load_tokens(sample: dict[str, Any], meta: ClipMeta, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The window of a pre-tokenized clip (``genie prep tokenize``): token ids and latent actions."""
        tokens = npy_load(sample[TOKENS_MEMBER])  # (T, h, w)
        if tokens.ndim != 3 or tokens.shape[0] != meta.frames:
            raise DecodeError(f"{TOKENS_MEMBER} has shape {tokens.shape}, expected ({meta.frames}, h, w)")
        if LATENT_ACTIONS_MEMBER not in sample:
            raise DecodeError(f"no {LATENT_ACTIONS_MEMBER} next to {TOKENS_MEMBER}")
        latent = npy_load(sample[LATENT_ACTIONS_MEMBER])  # (T-1,)
        if latent.shape != (meta.frames - 1,):
            raise DecodeError(f"{LATENT_ACTIONS_MEMBER} has shape {latent.shape}, expected ({meta.frames - 1},)")
        return {"tokens": tokens[idx].astype(np.int64), "latent_actions": latent[idx[:-1]].astype(np.int64)}

    # -- batches ------------------------------------------------------------------------------

    def _collate(self, clips: list[dict[str, Any]], me: int) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "keys": [c["key"] for c in clips],
            "starts": torch.tensor([c["start"] for c in clips], dtype=torch.int64),
            "worker": me,
            "skipped": self.stats.skipped,
        }
        for name in ("frames", "tokens", "latent_actions"):  # (B, T, H, W, C) uint8 | (B, T, h, w) | (B, T-1)
            if all(name in c for c in clips):
                batch[name] = torch.from_numpy(np.stack([c[name] for c in clips]))
        if all("actions" in c for c in clips):
            acts = np.stack([c["actions"] for c in clips])
            batch["actions"] = torch.from_numpy(acts.astype(np.int64 if acts.dtype.kind in "iu" else np.float32))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards, me, modulus = self.my_shards()
        self.stats = StreamStats()
        if not shards:
            return
        pending: list[dict[str, Any]] = []
        round_ = 0
        yielded = 0
        while True:
            if self.train:
                rng = random.Random(f"{self.seed}:{me}:{round_}")
                order = list(shards)
                rng.shuffle(order)
                samples = self._shuffled(self._raw_samples(order), rng)
                np_rng: np.random.Generator | None = np.random.default_rng([self.seed, me, round_])
            else:
                samples, np_rng = self._raw_samples(shards), None
            for i, sample in enumerate(samples):
                if modulus > 1 and i % modulus != me:
                    continue
                try:
                    clip = self.load_clip(sample, np_rng)
                except (DecodeError, ValueError, KeyError, OSError) as e:
                    self.stats.bad(sample.get("__key__", "?"), str(e), sample.get("__url__", "?"))
                    continue
                self.stats.samples += 1
                pending.append(clip)
                yielded += 1
                if len(pending) == self.batch_size:
                    yield self._collate(pending, me)
                    pending = []
                if not self.train and self.max_clips is not None and yielded >= self.max_clips:
                    break
            round_ += 1
            if not self.train:
                break
            if self.stats.samples == 0:
                raise DataError(f"no readable clips in {len(shards)} shard(s) (e.g. {shards[0]}); see warnings above")
        if pending:
            yield self._collate(pending, me)
        if self.stats.skipped:
            log.warning("validation reader %d skipped %d bad sample(s): %s", me, self.stats.skipped, self.stats.reasons)


def _nbytes(sample: dict[str, Any]) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray))


def total_skipped(seen: dict[int, int], batch: dict[str, Any]) -> int:
    """Fold one batch's per-worker cumulative skip count into ``seen``; return the total so far."""
    seen[batch["worker"]] = max(seen.get(batch["worker"], 0), int(batch["skipped"]))
    return sum(seen.values())


def whole_video_meta(key: str, raw: dict[str, Any], info: VideoInfo) -> ClipMeta:
    """ClipMeta describing a whole video (``extra[WHOLE_VIDEO]`` set): what the checks before training need."""
    return ClipMeta(
        source=str(raw.get("url") or key),
        fps=info.fps,
        frames=info.frames,
        width=info.width,
        height=info.height,
        video_id=key,
        extra={WHOLE_VIDEO: True},
    )


def probe_meta(shards: str | Sequence[str]) -> ClipMeta:
    """Metadata of the first readable clip of the first shard (to check resolution before training).

    For a shard of whole videos (video2dataset) it describes the first readable video, with
    ``extra[WHOLE_VIDEO]`` set.
    """
    from webdataset.tariterators import tarfile_samples

    urls = expand_shards(shards)
    for sample in tarfile_samples([{"url": urls[0]}], handler=lambda e: True):
        if META_MEMBER in sample:
            try:
                raw = load_meta_json(sample[META_MEMBER])
                video = whole_video_member(sample)
                if video is not None and not is_clip_meta(raw):
                    return whole_video_meta(sample["__key__"], raw, probe_video(sample[video]))
                return ClipMeta.from_dict(raw)
            except (ValueError, DecodeError):
                continue
    raise DataError(f"no readable clip metadata in {urls[0]}; is it a genie shard?")

"""Streaming clips out of webdataset shards: shard schedule, windows, decoding, batching, exact resume.

Shapes: B batch, T frames per window, H W pixels, C = 3 channels.

Pipeline per DataLoader worker (all work happens inside the workers, the main process only
receives ready batches):

    urls -> this consumer's blocks of shards (ShardSchedule) -> tar samples, interleaved across the
         block's shards -> windows per sample (several for a long whole video) -> shuffle buffer of
         *encoded* samples (cheap to hold) -> pick a window -> decode only its frames -> batch
         -> {"frames": uint8 [B, T, H, W, C], ...}

**Training** streams forever, so runs are measured in ``max_steps``. A *consumer* is one DataLoader
worker of one rank. All consumers walk one endless sequence of shards, a fresh seeded permutation of
every shard per epoch, consumer ``c`` of ``C`` taking every ``C``-th entry: every shard is read equally
often whatever the numbers of shards and consumers. A consumer reads its entries in *blocks* of a few
shards (``interleave``), alternating samples between them and shuffling through a buffer, so a batch
draws clips from several shards and many videos. Every random draw of a block is seeded by
``(seed, consumer, block)`` and every window by ``(seed, consumer, block, sample)``, so each run is
reproducible from its seed, ranks and workers draw differently, and nothing depends on what came
before the block. That is what makes resuming exact: each batch carries its consumer's position (block,
samples of the block used so far); :class:`genie.data.datamodule.VideoDataModule` keeps the position of
the last batch it handed to training from each stream and saves them with the checkpoint; a resumed
stream re-reads only the current block's tar bytes (no decoding) to get back to where it stopped.
DataLoader workers hand out batches in turn (batch ``i`` from worker ``i mod workers``), so after ``N``
batches worker ``w`` resumes the *logical stream* ``(w + N) mod workers``: the batch order is the
uninterrupted run's.

**Mixing sources.** ``shards`` may be a mapping ``{spec: weight}``: several shard sets (a game, a robot, ...)
in one training stream, each giving about ``weight / sum(weights)`` of the samples (clip windows). Each
source is a stream of its own as above, with its own :class:`ShardSchedule`, blocks, interleave and shuffle
buffer, every draw seeded with the source's index as well (sources draw independently; a source's draws
do not change when another's weight does), and the sources share the ``shuffle_bytes`` budget. Output
sample ``j`` of a consumer comes from the source drawn for slot ``j`` (chunks of 1024 draws seeded by
``(seed, consumer, chunk)``); that source's stream gives its next clip and goes on to its next block
when one ends. A mixed stream's position is ``(slot, block and samples used of each source)``, flattened
into ``[slot, block_0, used_0, block_1, used_1, ...]``; resuming re-reads each source's current block.
Batches of a mixed stream also carry ``sources`` (int64 ``[B]``, each clip's index among the mapping's
keys) and ``source_counts`` (the worker's cumulative clips per source, see :func:`source_shares`). A str
or list is one source read exactly as before (position ``[block, used]``).

**Validation** reads a fixed set of clips once, split by rank and worker, with a deterministic window
per clip, identical on every run. Corrupt samples are skipped, counted and logged, never raised.

Two kinds of samples, told apart by their ``json`` (:func:`genie.data.contract.is_clip_meta`):

- **Our clips** (``genie prep ...``): short, already at the training resolution, with a
  :class:`ClipMeta` that gives the frame count. The window's frames are decoded and used as they
  are (the fast path); a clip of another size is skipped, or resized when ``resize=True``.
- **Whole videos** from other tools, video2dataset's ``mp4`` + ``json`` layout being the usual
  one: any length, size and aspect, and metadata we do not rely on. The frame count, size and
  rate come from the video's container header (:func:`genie.data.video.probe_video`, about a
  millisecond for an mp4, nothing decoded); only a window's frames are decoded, straight to the
  reduced size where decord allows it, then center-cropped to ``resolution`` (required for them).
  A training pass takes one window per ``video_window_every`` frames of a video (at most
  ``max_video_windows``, stratified over its length), so long footage yields samples in proportion
  to its length from one read of its bytes. A video2dataset ``status`` other than ``success``, an
  undecodable or too-short video is skipped and counted like any bad clip.

The shuffle buffer holds encoded samples: a few KB for our clips, but whole videos are MBs, so
the buffer is also capped in bytes (``shuffle_bytes``) and holds fewer of them.

Frame strides: ``actions.npy`` and pre-computed latent actions hold one action per consecutive
transition, and a window at ``frame_stride > 1`` has no such action per step (discrete actions do not
compose). Token shards at a stride, and runs that require actions at a stride, are refused with a
one-line error; otherwise the actions are left out of the batch (with a warning), never misaligned.
"""

from __future__ import annotations

import glob
import logging
import math
import numbers
import os
import random
from collections.abc import Iterator, Mapping, Sequence
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
from genie.data.windows import fixed_start, sample_window, stratified_start, window_span, windows_per_video

log = logging.getLogger(__name__)

# Log the first few bad samples of each worker in full, then only count them.
_MAX_LOGGED_ERRORS = 5


class DataError(ValueError):
    """The data given to a run is unusable as a whole (no shards, wrong resolution, ...)."""


# The seed-sequence word that keeps the shard permutations apart from other draws of the same seed.
_SHARD_ORDER = 0x5A4D
# The seed-sequence word of a mixture's draws (which source fills each slot; each source's own draws).
_MIX_WORD = 0x4D49
# Slots whose sources one seeded draw decides at once.
_MIX_CHUNK = 1024

# A shard spec: a folder, pattern, URL or `::` list; a list of them (one source); or {spec: weight} (a mixture).
ShardSpec = str | Sequence[str] | Mapping[str, float]


def _seed_word(seed: int) -> int:
    """A run seed as a non-negative word (numpy's seed sequences refuse negative entries)."""
    return seed & 0xFFFFFFFFFFFFFFFF


class ShardSchedule:
    """Which shards each training consumer reads, block by block, forever.

    The schedule is one endless sequence of shard indices: epoch ``e`` is a permutation of all shards seeded
    by ``(seed, e)``, and the epochs follow each other. Consumer ``c`` of ``consumers`` takes the entries
    ``c, c + consumers, c + 2 * consumers, ...``, ``width`` of them per block. Every consumer reads at the
    same rate, so every shard is read equally often (once per epoch of the sequence) whatever the numbers of
    shards and consumers; striding over a fixed list instead reads some shards twice as often as others
    when the counts do not divide. Block ``j`` of any consumer is computed directly, without replaying the
    blocks before it.

    Args:
        num_shards: shards in the dataset.
        seed: the run's data seed.
        consumers: ranks x DataLoader workers.
        interleave: shards a block reads at once (fewer when there are too few shards to give every
            consumer distinct ones).
        salt: extra seed words (a mixture's source index), so schedules of one seed differ.
    """

    def __init__(self, num_shards: int, seed: int, consumers: int, interleave: int = 4, salt: Sequence[int] = ()):
        if num_shards < 1 or consumers < 1:
            raise ValueError("a shard schedule needs at least one shard and one consumer")
        self.num_shards, self.seed, self.consumers = num_shards, seed, consumers
        self.salt = tuple(salt)
        self.width = max(1, min(interleave, num_shards // consumers))
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (the few in use)

    def shard_at(self, index: int) -> int:
        """The shard at position ``index`` of the endless sequence."""
        epoch, i = divmod(index, self.num_shards)
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([_seed_word(self.seed), _SHARD_ORDER, *self.salt, epoch])
            perm = self._perms[epoch] = rng.permutation(self.num_shards)
        return int(perm[i])

    def block(self, consumer: int, block: int) -> list[int]:
        """The shard indices consumer ``consumer`` reads in its block ``block``."""
        first = block * self.width
        return [self.shard_at((first + i) * self.consumers + consumer) for i in range(self.width)]


@dataclass
class StreamState:
    """Where one rank's training streams stand: what a resumed run needs to go on exactly.

    Attributes:
        consumed: training batches this rank has taken from its DataLoader so far.
        positions: logical stream (0 .. workers - 1) -> its position after the last batch taken from it:
            ``(block, samples of the block used)``, or for a mixture of ``n`` sources ``(slot, block_0, used_0,
            ..., block_n-1, used_n-1)`` (slot: samples the stream has given; sources in mapping order, weight 0
            left out).
        start_block: streams without a position start at this block (a run resumed with another number of
            ranks or workers goes on past the data it already saw instead of starting over).
        source_start: the same per source of a mixture (empty: every source starts at ``start_block``).
    """

    consumed: int = 0
    positions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    start_block: int = 0
    source_start: tuple[int, ...] = ()


@dataclass(frozen=True)
class Source:
    """One shard set of a training mixture.

    Attributes:
        index: its place among the mapping's keys (as written, weight-0 sources counted): ``batch["sources"]``.
        spec: the shard spec (the mapping's key).
        weight: its weight, normalised: the expected share of the samples.
        urls: its shards.
    """

    index: int
    spec: str
    weight: float
    urls: tuple[str, ...]


def mixture_weights(
    shards: Mapping[str, Any], field: str = "data.train_shards", warn: bool = False
) -> list[tuple[int, str, float]]:
    """``(index, spec, normalised weight)`` of a mixture's sources with a positive weight (nothing is read).

    ``warn``: log one warning per weight-0 source (the training stream does, once per run).

    Raises:
        DataError: an empty mapping, a key that is not a spec, a weight that is not a number or is negative,
            weights summing to zero (one line naming ``field``).
    """
    if not shards:
        raise DataError(f"{field} is an empty mapping: give {{shard spec: weight}}, e.g. {{data/a/train: 1.0}}")
    checked = []
    for i, (spec, weight) in enumerate(shards.items()):
        if not isinstance(spec, str) or not spec:
            raise DataError(f"{field}: key {spec!r} is not a shard spec: keys are folders, patterns or URLs")
        number = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
        if not number or not math.isfinite(float(weight)):
            raise DataError(
                f"{field}: the weight of {spec!r} is {weight!r}, not a finite number: give e.g. {{{spec}: 1.0}}"
            )
        if weight < 0:
            raise DataError(
                f"{field}: the weight of {spec!r} is {weight}: weights are shares of samples, use 0 or more"
            )
        checked.append((i, spec, float(weight)))
    total = sum(w for _, _, w in checked)
    if total <= 0:
        raise DataError(f"{field}: the weights sum to {total:g}: give at least one source a positive weight")
    for _, spec, w in checked:
        if w == 0 and warn:
            log.warning("%s: source %s has weight 0 and is not read", field, spec)
    return [(i, spec, w / total) for i, spec, w in checked if w > 0]


def parse_mixture(shards: Mapping[str, Any], field: str = "data.train_shards", warn: bool = False) -> list[Source]:
    """The sources of a mixture ``{spec: weight}`` with a positive weight, their shards expanded.

    Raises:
        DataError: bad weights (see :func:`mixture_weights`) or a source that expands to no shards (one line
            naming ``field`` and the source).
    """
    sources = []
    for i, spec, weight in mixture_weights(shards, field, warn):
        try:
            urls = expand_shards(spec)
        except DataError as e:
            raise DataError(f"{field} source {spec!r}: {e}") from None
        sources.append(Source(i, spec, weight, tuple(urls)))
    return sources


class StrideError(DataError):
    """A frame stride the data's actions cannot follow (raised, never counted as a bad sample)."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def _globbed(url: str) -> list[str]:
    """A local glob pattern (``*``, ``?``, ``[``) expanded, sorted; anything else as it is."""
    local = url[len("file://") :] if url.startswith("file://") else url
    if _is_remote(url) or not any(c in local for c in "*?["):
        return [url]
    found = sorted(glob.glob(local))
    if not found:
        raise DataError(f"no files or folders match the pattern {local}; check the data path in your config")
    return found


def expand_shards(spec: ShardSpec, check_exists: bool = True) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    Accepts a folder (every ``*.tar`` beneath it, sorted, hidden folders such as an unfinished prep
    run's ``.parts/`` skipped; so parts written by a ``genie prep videos --parts`` job array are read
    together), a brace pattern
    (``data/shard-{000000..000009}.tar``), a local glob pattern (``data/procgen/*/train``: the sorted
    matches, folders expanded as above), ``::``-separated lists, ``pipe:`` commands and other
    URLs (``s3://``, ``https://``, opened through webdataset), or a list of any of these. A mapping
    ``{spec: weight}`` gives the union of its keys (weights are for training mixtures, see :class:`ClipStream`).

    Raises:
        DataError: nothing matched, or a local path does not exist.
    """
    from webdataset.shardlists import expand_urls

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for url in (g for u in expand_urls(str(s)) for g in _globbed(u)):
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
        shards: shard spec or list of URLs (see :func:`expand_shards`): one source. Or, for training, a mapping
            ``{spec: weight}``: a mixture whose sources give about ``weight / sum(weights)`` of the samples each
            (weight 0: not read); validation reads the union of its keys (weights ignored).
        num_frames: T, frames per window.
        frame_stride: take every ``frame_stride``-th frame of the clip.
        batch_size: clips per batch (batched inside the worker); the last batch of a
            validation pass may be smaller.
        train: True streams forever with random windows and shuffling; False reads every
            clip once with a deterministic window.
        shuffle_buffer: number of encoded samples to shuffle over (training only).
        shuffle_bytes: and at most this many bytes of them (whole videos are MBs each); a mixture's sources
            share it equally (each holds up to ``shuffle_buffer`` samples).
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
        interleave: training only: shards each consumer reads at once, alternating samples between them.
        video_window_every: training only: one window per this many frames of a whole video (None: one per
            video), so long videos give samples in proportion to their length.
        max_video_windows: training only: at most this many windows per whole video and pass.
        resume: training only: where this rank's streams stand (see :class:`StreamState`); None starts fresh.

    Yields:
        dicts with ``frames`` uint8 ``[B, T, H, W, C]`` (video shards) or ``tokens`` int64 ``[B, T, h, w]``
        and ``latent_actions`` int64 ``[B, T-1]`` (token shards from ``genie prep tokenize``), ``actions``
        (int64 ``[B, T-1]`` or float32 ``[B, T-1, A]``, only when every clip of the batch has them), ``keys``,
        ``starts`` int64 ``[B]`` (window start frame), ``worker`` (``rank * workers + stream``), ``skipped``
        (that worker's cumulative count of bad samples) and, in training, ``stream`` (the logical stream) and
        ``position`` (``[block, samples used]`` of that stream after this batch; a mixture's ``[slot, block_0,
        used_0, ...]``, see :class:`StreamState`). A mixture's batches also carry ``sources`` int64 ``[B]`` (each
        clip's index among the mapping's keys) and ``source_counts`` (list: the worker's clips per source so far).

    Raises:
        DataError: no shards, bad mixture weights (see :func:`parse_mixture`), bad sizes.
    """

    def __init__(
        self,
        shards: ShardSpec,
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
        interleave: int = 4,
        video_window_every: int | None = 256,
        max_video_windows: int = 64,
        resume: StreamState | None = None,
    ):
        super().__init__()
        self.sources: list[Source] | None = None  # a training mixture's sources (None: one source)
        if isinstance(shards, Mapping) and train:
            self.sources = parse_mixture(shards, "data.train_shards", warn=True)
            self.urls = [u for src in self.sources for u in src.urls]
        elif isinstance(shards, Mapping):  # validation: the union of the keys, weights ignored
            if not shards:
                raise DataError("data.val_shards is an empty mapping: give a shard spec, a list or {spec: weight}")
            self.urls = expand_shards(list(shards))
        else:
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
        self.interleave = max(1, interleave)
        self.video_window_every, self.max_video_windows = video_window_every, max(1, max_video_windows)
        self.resume = resume
        self._warned_stride = False
        if num_frames < 1 or frame_stride < 1 or batch_size < 1:
            raise DataError("num_frames, frame_stride and batch_size must all be >= 1")
        if resize and resolution is None:
            raise DataError("resize=True needs a resolution to resize to")

    # -- shards and raw samples -------------------------------------------------------------

    def my_shards(self) -> tuple[list[str], int, int]:
        """This validation consumer's shards, its index (rank * workers + worker) and the sample-split modulus.

        With at least as many shards as consumers, shards are split and the modulus is 1. With
        fewer, consumers read every shard but keep every ``consumers``-th clip, so the fixed
        validation set is still split exactly and no rank sits idle. (Training consumers follow a
        :class:`ShardSchedule` instead.)
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

    def _interleaved(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The samples of several shards, one from each in turn (a shard that ends drops out)."""
        streams = [self._raw_samples([url]) for url in urls]
        while streams:
            alive = []
            for stream in streams:
                sample = next(stream, None)
                if sample is not None:
                    alive.append(stream)
                    yield sample
            streams = alive

    def _with_windows(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Each sample once, but a long whole video once per window it gives (sharing its bytes).

        The copies carry ``__window__`` = ``(part, parts)`` and the probed header; decoding happens later, per
        window, so the copies spread through the shuffle buffer like any other samples.
        """
        for sample in samples:
            parts, info = self._video_parts(sample)
            if parts == 1:
                yield sample
                continue
            for part in range(parts):
                yield {**sample, "__window__": (part, parts), "__info__": info}

    def _video_parts(self, sample: dict[str, Any]) -> tuple[int, VideoInfo | None]:
        """How many windows a sample gives per pass: 1, or more for a long whole video (header probe only)."""
        if self.video_window_every is None:
            return 1, None
        video = whole_video_member(sample)
        if video is None or META_MEMBER not in sample:
            return 1, None
        try:
            if is_clip_meta(load_meta_json(sample[META_MEMBER])):
                return 1, None
            info = probe_video(sample[video])
        except (ValueError, DecodeError, OSError):
            return 1, None  # the load proper reports what is wrong with it
        every, cap = self.video_window_every, self.max_video_windows
        return windows_per_video(info.frames, self.num_frames, self.frame_stride, every, cap), info

    def _shuffled(
        self, samples: Iterator[dict[str, Any]], rng: random.Random, max_bytes: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Shuffle through a buffer of ``shuffle_buffer`` samples and at most ``max_bytes`` (``shuffle_bytes``)."""
        cap = self.shuffle_bytes if max_bytes is None else max_bytes
        buf: list[dict[str, Any]] = []
        held = 0
        for s in samples:
            n = _nbytes(s)
            if len(buf) < self.shuffle_buffer and (held + n <= cap or not buf):
                buf.append(s)
                held += n
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            held += n - _nbytes(s)
            yield s
            while held > cap and len(buf) > 1:  # a big sample came in: let more out
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
            frames = decode_clip(sample[video], idx.tolist(), self.backend, width=meta.width)
            if frames.shape[1:3] != (meta.height, meta.width):
                raise DecodeError(
                    f"decoded {frames.shape[2]}x{frames.shape[1]}, metadata says {meta.width}x{meta.height}"
                )
            out["frames"] = frames
        return self._add_actions(out, sample, meta.frames, idx, "clip")

    def _window(
        self,
        key: str,
        frames: int,
        rng: np.random.Generator | None,
        what: str,
        part: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The window's frame indices: random (training; within slice ``part`` of the video when given) or
        fixed per key (validation)."""
        span = window_span(self.num_frames, self.frame_stride)
        if frames < span:
            raise DecodeError(f"{what} has {frames} frames, window needs {span}")
        if rng is None:
            start = fixed_start(key, frames, self.num_frames, self.frame_stride, self.seed)
            return sample_window(frames, self.num_frames, self.frame_stride, start=start)
        if part is not None:
            start = stratified_start(frames, self.num_frames, self.frame_stride, part[0], part[1], rng)
            return sample_window(frames, self.num_frames, self.frame_stride, start=start)
        return sample_window(frames, self.num_frames, self.frame_stride, rng=rng)

    def _add_actions(
        self, out: dict[str, Any], sample: dict[str, Any], frames: int, idx: np.ndarray, what: str
    ) -> dict[str, Any]:
        if ACTIONS_MEMBER in sample and self.frame_stride > 1:
            if self.require_actions:
                raise StrideError(stride_message(self.frame_stride, ACTIONS_MEMBER))
            if not self._warned_stride:  # never a misaligned action: none at all
                self._warned_stride = True
                log.warning("%s left out of the batches: %s", ACTIONS_MEMBER, stride_message(self.frame_stride))
            return out
        if ACTIONS_MEMBER in sample:
            actions = npy_load(sample[ACTIONS_MEMBER])
            if actions.shape[0] != frames - 1:
                raise DecodeError(f"{ACTIONS_MEMBER} has {actions.shape[0]} rows, {what} has {frames} frames")
            out["actions"] = actions[idx[:-1]]  # the action between each kept frame and the next (stride 1)
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
        info = sample.get("__info__") or probe_video(data)
        idx = self._window(key, info.frames, rng, "video", sample.get("__window__"))
        out = {"key": key, "start": int(idx[0])}
        out["frames"] = decode_resized(data, idx.tolist(), self.resolution, self.backend, info)
        return self._add_actions(out, sample, info.frames, idx, "video")

    def _load_tokens(self, sample: dict[str, Any], meta: ClipMeta, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The window of a pre-tokenized clip (``genie prep tokenize``): token ids and latent actions."""
        if self.frame_stride > 1:
            raise StrideError(stride_message(self.frame_stride, LATENT_ACTIONS_MEMBER))
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

    def _collate(self, clips: list[dict[str, Any]], me: int, **extra: Any) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "keys": [c["key"] for c in clips],
            "starts": torch.tensor([c["start"] for c in clips], dtype=torch.int64),
            "worker": me,
            "skipped": self.stats.skipped,
            **extra,
        }
        for name in ("frames", "tokens", "latent_actions"):  # (B, T, H, W, C) uint8 | (B, T, h, w) | (B, T-1)
            if all(name in c for c in clips):
                batch[name] = torch.from_numpy(np.stack([c[name] for c in clips]))
        if all("actions" in c for c in clips):
            acts = np.stack([c["actions"] for c in clips])
            batch["actions"] = torch.from_numpy(acts.astype(np.int64 if acts.dtype.kind in "iu" else np.float32))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats = StreamStats()
        if self.train:
            yield from self._train_batches()
        else:
            yield from self._val_batches()

    def _val_batches(self) -> Iterator[dict[str, Any]]:
        shards, me, modulus = self.my_shards()
        if not shards:
            return
        pending: list[dict[str, Any]] = []
        for i, sample in enumerate(self._raw_samples(shards)):
            if modulus > 1 and i % modulus != me:
                continue
            clip = self._load_or_count(sample, None)
            if clip is None:
                continue
            pending.append(clip)
            if len(pending) == self.batch_size:
                yield self._collate(pending, me)
                pending = []
            if self.max_clips is not None and self.stats.samples >= self.max_clips:
                break
        if pending:
            yield self._collate(pending, me)
        if self.stats.skipped:
            log.warning("validation reader %d skipped %d bad sample(s): %s", me, self.stats.skipped, self.stats.reasons)

    def _train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless training batches of this worker's logical stream, from where ``resume`` left it."""
        rank, world, wid, nw = consumer_info(self.rank, self.world_size)
        state = self.resume or StreamState()
        stream = (wid + state.consumed) % nw  # DataLoader hands out batch i from worker i mod nw
        me = rank * nw + stream
        if self.sources is not None:
            yield from self._mixed_batches(state, stream, me, world * nw)
            return
        schedule = ShardSchedule(len(self.urls), self.seed, world * nw, self.interleave)
        first, skip = state.positions.get(stream, (state.start_block, 0))
        pending: list[dict[str, Any]] = []
        for clip, block, used in self._source_clips(self.urls, schedule, me, first, skip):
            pending.append(clip)
            if len(pending) == self.batch_size:
                yield self._collate(pending, me, stream=stream, position=[block, used])
                pending = []

    def _source_clips(
        self,
        urls: Sequence[str],
        schedule: ShardSchedule,
        me: int,
        block: int,
        skip: int,
        source: Source | None = None,
        max_bytes: int | None = None,
    ) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Endless ``(clip, block, samples of the block used)`` of one source for consumer ``me``.

        Starts at ``block`` after its first ``skip`` samples (re-read, not decoded). ``source`` (a mixture's)
        is mixed into every seed; None keeps the single-source seeds.
        """
        seed = _seed_word(self.seed)
        good = shards_read = 0
        while True:
            block_urls = [urls[i] for i in schedule.block(me, block)]
            key = f"{seed}:{me}:{block}" if source is None else f"{seed}:{me}:{block}:{source.index}"
            samples = self._shuffled(self._with_windows(self._interleaved(block_urls)), random.Random(key), max_bytes)
            for i, sample in enumerate(samples):
                if i < skip:
                    continue  # used before the checkpoint this run resumed from: re-read, not decoded
                words = [seed, me, block, i] if source is None else [seed, _MIX_WORD, source.index, me, block, i]
                clip = self._load_or_count(sample, np.random.default_rng(words))
                if clip is None:
                    continue
                good += 1
                yield clip, block, i + 1
            block, skip = block + 1, 0
            shards_read += len(block_urls)
            if good == 0 and shards_read >= len(urls):
                where = "" if source is None else f" of data.train_shards source {source.spec!r}"
                raise DataError(
                    f"no readable clips in {shards_read} shard(s){where} (e.g. {block_urls[0]}); see warnings above"
                )

    def _mixed_batches(self, state: StreamState, stream: int, me: int, consumers: int) -> Iterator[dict[str, Any]]:
        """Endless batches of a mixture: slot ``j``'s source drawn by ``(seed, consumer, j // 1024)``."""
        sources = self.sources or []
        n = len(sources)
        saved = state.positions.get(stream)
        if saved is None:
            slot = 0
            starts = [state.source_start[k] if k < len(state.source_start) else state.start_block for k in range(n)]
            where = [[b, 0] for b in starts]
        elif len(saved) == 1 + 2 * n:
            slot, where = int(saved[0]), [[int(saved[1 + 2 * k]), int(saved[2 + 2 * k])] for k in range(n)]
        else:
            raise DataError(f"resume position {list(saved)} does not fit a mixture of {n} sources")
        max_bytes = max(1, self.shuffle_bytes // n)  # the sources share the byte budget
        streams = [
            self._source_clips(
                src.urls,
                ShardSchedule(len(src.urls), self.seed, consumers, self.interleave, salt=(_MIX_WORD, src.index)),
                me,
                where[k][0],
                where[k][1],
                src,
                max_bytes,
            )
            for k, src in enumerate(sources)
        ]
        probs = np.array([src.weight for src in sources])
        probs /= probs.sum()
        counts = [0] * (sources[-1].index + 1)  # clips per mapping key so far
        seed = _seed_word(self.seed)
        chunk, choices = -1, np.zeros(0, np.int64)
        pending: list[dict[str, Any]] = []
        picked: list[int] = []
        while True:
            c, r = divmod(slot, _MIX_CHUNK)
            if c != chunk:
                chunk, choices = c, np.random.default_rng([seed, _MIX_WORD, me, c]).choice(n, _MIX_CHUNK, p=probs)
            k = int(choices[r])
            clip, block, used = next(streams[k])
            where[k] = [block, used]
            slot += 1
            pending.append(clip)
            picked.append(sources[k].index)
            counts[sources[k].index] += 1
            if len(pending) == self.batch_size:
                position = [slot, *(x for w in where for x in w)]
                tags = torch.tensor(picked, dtype=torch.int64)  # (B,)
                yield self._collate(
                    pending, me, stream=stream, position=position, sources=tags, source_counts=list(counts)
                )
                pending, picked = [], []

    def _load_or_count(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any] | None:
        """One clip, or None after counting the sample as bad (a stride the data cannot follow is raised)."""
        try:
            clip = self.load_clip(sample, rng)
        except StrideError:
            raise
        except (DecodeError, ValueError, KeyError, OSError) as e:
            self.stats.bad(sample.get("__key__", "?"), str(e), sample.get("__url__", "?"))
            return None
        self.stats.samples += 1
        return clip


def stride_message(stride: int, member: str | None = None) -> str:
    """Why actions cannot follow a frame stride, and what to do (one line)."""
    what = f"{member} holds" if member else "actions hold"
    return (
        f"{what} one action per consecutive frame pair, and actions do not compose over frame_stride={stride}: "
        "use frame_stride=1 (prep the clips at a lower --fps to skip frames)"
    )


def _nbytes(sample: dict[str, Any]) -> int:
    """Bytes a buffered sample holds; the windows of one whole video share its bytes (each counts its part)."""
    held = sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray))
    window = sample.get("__window__")
    return held // window[1] if window else held


def total_skipped(seen: dict[int, int], batch: dict[str, Any]) -> int:
    """Fold one batch's per-worker cumulative skip count into ``seen``; return the total so far."""
    seen[batch["worker"]] = max(seen.get(batch["worker"], 0), int(batch["skipped"]))
    return sum(seen.values())


def source_shares(seen: dict[int, list[int]], batch: dict[str, Any]) -> list[float]:
    """Fold a mixture batch's per-worker cumulative ``source_counts`` into ``seen``; return each source's share.

    The counts are plain ints that stay on the host (no device sync, unlike ``batch["sources"]`` after transfer).
    Index ``k`` is the mapping's ``k``-th key.
    """
    counts = [int(c) for c in batch["source_counts"]]
    old = seen.get(batch["worker"], [])
    if sum(counts) >= sum(old):
        seen[batch["worker"]] = counts
    width = max(len(c) for c in seen.values())
    totals = [sum(c[k] for c in seen.values() if k < len(c)) for k in range(width)]
    whole = sum(totals) or 1
    return [t / whole for t in totals]


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


def first_members(shards: ShardSpec) -> set[str]:
    """The member names (``mp4``, ``json``, ``actions.npy``, ...) of the first sample of the first shard."""
    from webdataset.tariterators import tarfile_samples

    urls = expand_shards(shards)
    for sample in tarfile_samples([{"url": urls[0]}], handler=lambda e: True):
        return {k for k in sample if not k.startswith("__")}
    return set()


def probe_meta(shards: ShardSpec) -> ClipMeta:
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

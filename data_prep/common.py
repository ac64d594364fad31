"""Machinery every ``genie prep`` source shares: parallel, resumable jobs -> parts -> shards.

A prep run is a list of *jobs* (one video file, one batch of CoinRun episodes, ...). Each job
writes its clips into a *part* (``OUT/.parts/<job_id>.tar`` plus ``<job_id>.json`` with its
report), atomically. When every job is done the parts' clips are written into shards of
``shard_size`` clips in a seeded order mixed across videos (:func:`assemble_shards`), then
``summary.json`` is written and the parts are removed.

Why parts: jobs finish in any order when run in parallel, but shards must not depend on
timing. A killed run keeps its finished parts; the rerun only does the missing jobs and then
writes exactly the shards one clean run writes.

Why mixed: a streaming loader's shuffle buffer only mixes clips that are close in the stream, so
shards written video after video would make each batch a few videos' clips. The shard order is a
uniformly random interleaving of the videos' clip sequences, seeded by ``shuffle_seed`` (a video's
clips keep their order, so each part is read front to back): every window of the shards holds as
many distinct videos as a full random permutation of the clips would. It depends only on the videos'
clip counts in job order, never on workers, timing or how episodes are chunked into jobs. Memory:
4 bytes a clip for the order plus a few numbers a video; the clips themselves stay on disk.

Split runs (a job array over many machines): ``run_prep(..., part=(i, n))`` is run ``i`` of ``n``,
given only its share of the jobs (:func:`select_part`). Everything it writes carries the part's
tag ``p0003`` (:func:`part_tag`): shards ``{prefix}-p0003-000000.tar``, ``summary-p0003.json``,
``prep_settings-p0003.json`` and ``.parts-p0003/``, so the parts can share one output folder
without touching each other's files, and the loader reads all their shards together. Each part
checks that the other parts' settings in the folder match its own (except the part index, the
job list and the source path, which may be mounted elsewhere on another machine): mixing two
differently prepared runs in one folder is refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from genie.data.contract import (
    ClipMeta,
    ShardWriter,
    atomic_write_bytes,
    clip_key,
    npy_bytes,
    shard_glob,
    split_member_name,
    write_sample,
)

PARTS_DIR = ".parts"
SUMMARY = "summary.json"
SETTINGS = "prep_settings.json"


def tagged(name: str, tag: str = "") -> str:
    """A run's bookkeeping file name for part ``tag``: ``summary.json`` -> ``summary-p0003.json``."""
    if not tag:
        return name
    stem, dot, ext = name.rpartition(".") if not name.startswith(".") else (name, "", "")
    return f"{stem}-{tag}{dot}{ext}"


# settings that may differ between the parts of one split run (see _check_sibling_runs)
PER_PART_SETTINGS = ("part", "jobs_sha1", "src")


class PrepError(RuntimeError):
    """A problem with the prep run as a whole (bad arguments, a mismatched output folder)."""


@dataclass
class Job:
    """One unit of work. ``job_id`` must be unique, filesystem-safe and stable across runs."""

    job_id: str
    payload: dict[str, Any]
    label: str = ""  # what a person calls this input (e.g. the file's relative path)


@dataclass
class JobReport:
    """What one job did; stored beside its part so a resumed run can still report it."""

    job_id: str
    ok: bool
    clips: int = 0
    frames: int = 0
    reason: str = ""  # why the job was skipped (when not ok)
    info: dict[str, Any] = field(default_factory=dict)


class PartWriter:
    """Streams one job's clips into ``<parts>/<job_id>.tar.tmp``; ``commit`` makes it final."""

    def __init__(self, parts_dir: Path, job_id: str):
        self.final = parts_dir / f"{job_id}.tar"
        self.tmp = parts_dir / f"{job_id}.tar.tmp"
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.clips = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        write_sample(self._tar, key, members)
        self.clips += 1

    def commit(self, report: JobReport) -> None:
        self._tar.close()
        os.replace(self.tmp, self.final)
        # the report is written last: its presence marks the job as done
        atomic_write_bytes(self.final.with_suffix(".json"), json.dumps(report.__dict__).encode())

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


JobFn = Callable[[Job, PartWriter], JobReport]


def _run_one(fn: JobFn, job: Job, parts_dir: Path) -> JobReport:
    writer = PartWriter(parts_dir, job.job_id)
    try:
        report = fn(job, writer)
    except Exception as e:  # a bad input must never take the run down: report and move on
        writer.abort()
        writer = PartWriter(parts_dir, job.job_id)
        report = JobReport(job.job_id, ok=False, reason=f"{type(e).__name__}: {e}")
    report.info.setdefault("input", job.label or job.job_id)
    if not report.ok:
        # a skipped job keeps no clips: half a file's clips would make reruns differ
        writer.abort()
        writer = PartWriter(parts_dir, job.job_id)
        report.clips = report.frames = 0
    writer.commit(report)
    return report


def part_tag(part: int, parts: int) -> str:
    """``p0003``: the name of part ``part`` of ``parts`` (zero-padded to sort, at least 4 digits)."""
    return f"p{part:0{max(4, len(str(parts - 1)))}d}"


def part_of(name: str, parts: int) -> int:
    """Which of ``parts`` parts an input named ``name`` (e.g. a relative path) belongs to.

    A stable hash of the name, not the input's position in a listing: every machine of a job array
    puts a file in the same part even when their listings differ (a file still being copied, a
    listing in another order), so parts never overlap; adding files never moves the others.
    """
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % parts


def select_part(items: list[Any], names: list[str], part: int, parts: int) -> list[Any]:
    """The items of part ``part`` of ``parts`` (by :func:`part_of` their names), order kept.

    Raises:
        PrepError: ``parts`` < 1 or ``part`` outside ``0..parts-1``.
    """
    check_part(part, parts)
    return [it for it, name in zip(items, names, strict=True) if parts == 1 or part_of(name, parts) == part]


def check_part(part: int | None, parts: int) -> None:
    """One-line errors for bad ``--parts N --part i`` values."""
    if parts < 1:
        raise PrepError(f"--parts must be >= 1, got {parts}")
    if part is None:
        if parts > 1:
            raise PrepError(f"--parts {parts} needs --part i (0..{parts - 1}): which part this run prepares")
        return
    if parts == 1 and part != 0:
        raise PrepError(f"--part {part} needs --parts N, the number of parts the input is split into")
    if not 0 <= part < parts:
        raise PrepError(f"--part {part} is outside 0..{parts - 1} (--parts {parts})")


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in PER_PART_SETTINGS}


def _check_sibling_runs(out_dir: Path, own: Path, settings: dict[str, Any]) -> None:
    """Refuse to add a part to a folder holding another run's shards (other settings, other --parts)."""
    mine = _comparable(settings)
    for other in sorted(out_dir.glob(SETTINGS.replace(".json", "*.json"))):
        if other == own:
            continue
        try:
            theirs = _comparable(json.loads(other.read_text()))
        except (OSError, ValueError):
            continue  # being written right now, or not ours: nothing to compare
        if theirs != mine:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise PrepError(
                f"{out_dir} holds shards of a prep run with other settings ({other.name} differs in "
                f"{', '.join(diff)}); give every part the same settings, or pass --overwrite, or choose another --out"
            )


def _prepare_out(out_dir: Path, settings: dict[str, Any], overwrite: bool, tag: str = "") -> Path:
    """Create the output folder, or check that an existing one was made with the same settings.

    ``tag`` (a part's, e.g. ``p0003``) names this run's own bookkeeping files; see the module docstring.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = out_dir / tagged(PARTS_DIR, tag)
    settings_file = out_dir / tagged(SETTINGS, tag)
    wanted = json.dumps(settings, sort_keys=True, indent=1)
    if not overwrite:
        _check_sibling_runs(out_dir, settings_file, settings)
    if settings_file.exists() and settings_file.read_text() != wanted:
        if not overwrite:
            raise PrepError(
                f"{out_dir} holds shards prepared with other settings ({settings_file}); "
                "pass --overwrite to replace them or choose another --out"
            )
        shutil.rmtree(parts, ignore_errors=True)
        if tag:  # only this part's own files: the other parts' shards stay
            try:
                old_prefix = json.loads(settings_file.read_text()).get("prefix", settings["prefix"])
            except ValueError:
                old_prefix = settings["prefix"]
            stale = list(out_dir.glob(shard_glob(f"{old_prefix}-{tag}")))
        else:
            stale = list(out_dir.glob("*.tar"))
        for p in stale + [out_dir / tagged(SUMMARY, tag)]:
            p.unlink(missing_ok=True)
    parts.mkdir(exist_ok=True)
    atomic_write_bytes(settings_file, wanted.encode())
    return parts


def run_prep(
    *,
    out_dir: str | os.PathLike,
    jobs: list[Job],
    fn: JobFn,
    settings: dict[str, Any],
    shard_size: int,
    shuffle_seed: int | None,
    workers: int,
    prefix: str = "shard",
    desc: str = "prep",
    overwrite: bool = False,
    extra_summary: dict[str, Any] | None = None,
    fail_fast: bool = False,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``fn`` over ``jobs`` (in ``workers`` processes; 0 = in this process), then write shards.

    Args:
        out_dir: output folder; shards are ``{prefix}-000000.tar ...``.
        jobs: the work, in the order that (with ``shuffle_seed``) decides the shard order.
        fn: ``fn(job, part_writer) -> JobReport``; must be a picklable top-level function.
        settings: everything that determines the output; a rerun with other settings is refused.
        shard_size: clips per shard.
        shuffle_seed: seed of the shard order, mixed across videos (see :func:`assemble_shards`);
            None writes the clips in job order.
        workers: parallel processes.
        fail_fast: stop with PrepError when a job fails, instead of skipping it (for generated
            sources, where a failure is a bug, not a bad input file).
        part: ``(i, n)``: this is part ``i`` of a run split in ``n`` (``jobs`` holds only this part's
            share, see :func:`select_part`); its shards are ``{prefix}-p000i-000000.tar ...`` and its
            bookkeeping files carry the same tag. None (or ``n == 1``): an unsplit run.

    Returns:
        The summary dict, also written to ``out_dir/summary.json``.
    """
    t0 = time.time()
    out = Path(out_dir)
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise PrepError("internal error: duplicate job ids")
    jobs_digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()
    full_settings = {
        **settings,
        "shard_size": shard_size,
        "prefix": prefix,
        "shuffle_seed": shuffle_seed,
        "jobs_sha1": jobs_digest,
    }
    tag = ""
    part_index = 0
    if part is not None and part[1] > 1:
        check_part(part[0], part[1])
        tag = part_tag(*part)
        part_index = part[0]
        full_settings.update(parts=part[1], part=part[0])
    summary_path = out / tagged(SUMMARY, tag)
    shard_prefix = f"{prefix}-{tag}" if tag else prefix
    parts = _prepare_out(out, full_settings, overwrite, tag)
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        where = f"{out} ({tag})" if tag else str(out)
        tqdm.write(f"{where}: already complete ({summary.get('clips', '?')} clips), nothing to do")
        shutil.rmtree(parts, ignore_errors=True)
        return summary

    reports: dict[str, JobReport] = {}
    for job in jobs:  # resume: a job with a report is done
        rp = parts / f"{job.job_id}.json"
        if rp.exists() and (parts / f"{job.job_id}.tar").exists():
            reports[job.job_id] = JobReport(**json.loads(rp.read_text()))
    todo = [j for j in jobs if j.job_id not in reports]

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="job", dynamic_ncols=True)

    def done(rep: JobReport) -> None:
        reports[rep.job_id] = rep
        bar.update()
        if not rep.ok:
            if fail_fast:
                raise PrepError(f"{rep.info['input']} failed: {rep.reason}")
            bar.write(f"skipped {rep.info['input']}: {rep.reason}")

    if workers <= 0 or len(todo) <= 1:
        for job in todo:
            done(_run_one(fn, job, parts))
    else:
        # spawn: workers must not inherit codec or thread-pool state from the parent; recycled
        # every 64 jobs so a slow leak in a native library (procgen, codecs) cannot pile up
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=64
        ) as pool:
            futures = {pool.submit(_run_one, fn, job, parts): job for job in todo}
            try:
                for fut in as_completed(futures):
                    done(fut.result())
            except PrepError:
                for f in futures:
                    f.cancel()
                raise
    bar.close()

    shards = assemble_shards(
        out, parts, [j.job_id for j in jobs], shard_prefix, shard_size, shuffle_seed=shuffle_seed, stream=part_index
    )
    ordered = [reports[j.job_id] for j in jobs]
    summary = {
        "ok": sum(r.ok for r in ordered),
        "skipped": [{"job": r.job_id, "reason": r.reason, **r.info} for r in ordered if not r.ok],
        "clips": sum(r.clips for r in ordered),
        "frames": sum(r.frames for r in ordered),
        "shards": [p.name for p in shards],
        "shuffle_seed": shuffle_seed,
        "seconds": round(time.time() - t0, 2),
        **({"part": part[0], "parts": part[1]} if tag and part is not None else {}),
        **(extra_summary or {}),
    }
    summary["num_skipped"] = len(summary["skipped"])
    # numeric details the jobs reported (e.g. episodes too short for a clip), summed over all jobs
    totals: dict[str, float] = {}
    for r in ordered:
        for k, v in r.info.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    summary["totals"] = totals
    atomic_write_bytes(summary_path, json.dumps(summary, indent=1).encode())
    shutil.rmtree(parts)
    return summary


def _video_runs(part_file: Path) -> list[tuple[int, int]]:
    """``(offset of its first clip's first header, clips)`` of each video in a part, in the order written.

    A video is a run of consecutive clips whose keys share the ``{video_id}`` before the clip number
    (:func:`genie.data.contract.clip_key`); only tar headers are read, never the clips.
    """
    runs: list[tuple[int, int]] = []
    with tarfile.open(part_file, "r") as tar:
        last_key = last_video = None
        for info in tar:
            key, _ = split_member_name(info.name)
            if key == last_key:
                continue
            last_key = key
            video = key.rpartition("_")[0] or key
            if video == last_video:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((info.offset, 1))
                last_video = video
    return runs


def shard_order(clips_per_video: Sequence[int], seed: int | None, stream: int = 0) -> np.ndarray:
    """The video each clip of the shards comes from, in shard order (int32, one entry a clip).

    A uniformly random arrangement of the multiset of video labels (video ``v`` appearing
    ``clips_per_video[v]`` times), i.e. a random interleaving of the videos' clip sequences: the
    ``k``-th occurrence of ``v`` is ``v``'s ``k``-th clip. The labels of any window are distributed
    exactly as under a full random permutation of the clips. ``seed`` None: video after video.

    Args:
        clips_per_video: clip counts, in job (then writing) order.
        seed: the run's shuffle seed.
        stream: which part of a split run (so equal parts get unrelated orders); 0 when unsplit.
    """
    labels = np.repeat(np.arange(len(clips_per_video), dtype=np.int32), np.asarray(clips_per_video, dtype=np.int64))
    if seed is not None:
        seq = np.random.SeedSequence(entropy=seed, spawn_key=(SHUFFLE_STREAM, stream))
        np.random.default_rng(seq).shuffle(labels)
    return labels


class _PartReader:
    """Reads one clip at a time from the part files at a given offset, keeping a few files open."""

    def __init__(self, max_open: int = 64):
        self._files: OrderedDict[Path, BinaryIO] = OrderedDict()
        self._max_open = max_open

    def _open(self, path: Path) -> BinaryIO:
        f = self._files.pop(path, None)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - kept open across calls, closed in close()
            if len(self._files) >= self._max_open:
                self._files.popitem(last=False)[1].close()
        self._files[path] = f  # most recently used last
        return f

    def read_clip(self, path: Path, offset: int) -> tuple[str, dict[str, bytes], int]:
        """``(key, members, offset of the next clip)`` of the clip whose first header is at ``offset``."""
        f = self._open(path)
        f.seek(offset)
        key, members, next_offset = None, {}, -1
        with tarfile.open(fileobj=f, mode="r:") as tar:  # member offsets are positions in the file
            for info in tar:
                k, member = split_member_name(info.name)
                if key is None:
                    key = k
                elif k != key:
                    next_offset = info.offset
                    break
                data = tar.extractfile(info)
                members[member] = data.read() if data is not None else b""
        if key is None:
            raise PrepError(f"internal error: no clip at offset {offset} of {path}")
        return key, members, next_offset

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def assemble_shards(
    out: Path,
    parts: Path,
    job_ids: Sequence[str],
    prefix: str,
    shard_size: int,
    *,
    shuffle_seed: int | None = None,
    stream: int = 0,
) -> list[Path]:
    """Write the parts' clips into shards in :func:`shard_order`; remove stale shards of an earlier run.

    Every video's clips are read in the order its job wrote them, from where its previous clip ended,
    so only the order (4 bytes a clip) and each video's position are held in memory.

    Args:
        out: the output folder.
        parts: the folder of committed parts, one ``<job_id>.tar`` a job.
        job_ids: every job, in the run's job order.
        prefix: shard name prefix.
        shard_size: clips per shard.
        shuffle_seed: seed of the order (None: job order, video after video).
        stream: part index of a split run (see :func:`shard_order`).
    """
    for old in out.glob(shard_glob(prefix)):
        old.unlink()
    files: list[Path] = []
    file_of: list[int] = []
    offsets: list[int] = []
    counts: list[int] = []
    for job_id in job_ids:
        path = parts / f"{job_id}.tar"
        for offset, clips in _video_runs(path):
            file_of.append(len(files))
            offsets.append(offset)
            counts.append(clips)
        files.append(path)
    order = shard_order(counts, shuffle_seed, stream)
    reader = _PartReader()
    try:
        with ShardWriter(out, prefix=prefix, shard_size=shard_size) as writer:
            for v in order:
                key, members, offsets[v] = reader.read_clip(files[file_of[v]], offsets[v])
                writer.write(key, members)
    finally:
        reader.close()
    return writer.paths


def print_summary(summary: dict[str, Any], out_dir: str | os.PathLike) -> None:
    skipped = summary.get("skipped", [])
    print(
        f"{out_dir}: {summary['clips']} clips, {summary['frames']} frames in {len(summary['shards'])} shards "
        f"({summary['ok']} inputs ok, {len(skipped)} skipped) in {summary['seconds']:.1f}s"
    )
    for s in skipped:
        print(f"  skipped {s['input']}: {s['reason']}")


# Generated sources (CoinRun, sprites) seed every episode on its own, keyed by split and episode index,
# so output never depends on how episodes are chunked into jobs or spread over workers.
SPLIT_KEYS = {"train": 0, "val": 1}
# spawn key of the shard order (shard_order), beside the splits' episode streams: never the same stream
SHUFFLE_STREAM = 2


def episode_rng(seed: int, split: str, episode: int, stream: int | None = None) -> np.random.Generator:
    """The one RNG that decides everything random about one episode of a split.

    ``stream`` keeps sources that share a seed apart (e.g. each procgen game but CoinRun has its own).
    """
    key = (SPLIT_KEYS[split], episode) if stream is None else (SPLIT_KEYS[split], episode, stream)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def episode_jobs(split: str, episodes: int, per_job: int, payload: dict[str, Any]) -> list[Job]:
    """Chunks of ``per_job`` episodes. Episodes are seeded individually, so the chunking (like
    ``--workers``) only decides how work is spread, never what is written."""
    jobs = []
    for first in range(0, episodes, per_job):
        end = min(first + per_job, episodes)
        jobs.append(
            Job(
                f"{split}-{first:06d}",
                {"split": split, "first_episode": first, "end_episode": end, **payload},
                label=f"{split} episodes {first}-{end - 1}",
            )
        )
    return jobs


def add_episode_output_arguments(add: Callable[..., Any], episodes_per_job: int) -> None:
    """The encoding, sharding and parallelism options every generated (episode) source shares.

    Args:
        add: the parser's ``add_argument``.
        episodes_per_job: the source's default chunk of episodes per job (never changes the output).
    """
    from genie.data.video import DEFAULT_GOP

    add("--lossy", action="store_true", help="H.264 yuv420p at --crf instead of lossless (not frame-exact)")
    add("--crf", type=int, default=18, help="H.264 quality with --lossy (lower is better)")
    add("--gop", type=int, default=DEFAULT_GOP, help="keyframe interval (short = fast random access)")
    add("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    add("--episodes-per-job", type=int, default=episodes_per_job, help="episodes per job (never changes the output)")
    add("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (0: none)")
    add("--overwrite", action="store_true", help="replace shards made with other settings")


def check_episode_arguments(args: Any) -> tuple[int, list[str]]:
    """The checks every generated source shares: ``(val_episodes with its default resolved, problems)``."""
    val_episodes = max(1, args.episodes // 10) if args.val_episodes is None else args.val_episodes
    problems = []
    if args.episodes < 1 or val_episodes < 0:
        problems.append("--episodes must be >= 1 and --val-episodes >= 0")
    if args.seed < 0:
        problems.append("--seed must be >= 0")
    return val_episodes, problems


def write_clip(
    writer: PartWriter,
    report: JobReport,
    frames_THWC: np.ndarray,
    actions: np.ndarray,
    *,
    video_id: str,
    clip_index: int,
    start_frame: int,
    fps: float,
    source: str,
    encoding: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """Encode one clip with its true actions and metadata into ``writer`` and count it in ``report``.

    Every source whose clips carry actions (coinrun, sprites, robot, lerobot) writes through here, so the
    members and the :class:`ClipMeta` fields are the same everywhere.

    Args:
        frames_THWC: the clip, uint8 (T, H, W, 3).
        actions: the actions between its frames (T-1 of them).
        start_frame: index of the clip's first frame in its episode (``start_time`` = start_frame / fps).
        encoding: ``lossless``, ``crf`` and ``gop`` (a job payload holds them).
        extra: the source's own metadata fields.
    """
    from genie.data.video import encode_clip

    T, H, W = frames_THWC.shape[:3]
    meta = ClipMeta(
        source=source,
        fps=fps,
        frames=T,
        width=W,
        height=H,
        start_time=round(start_frame / fps, 6),
        video_id=video_id,
        clip_index=clip_index,
        lossless=encoding["lossless"],
        extra=extra,
    )
    lossless, crf, gop = encoding["lossless"], encoding["crf"], encoding["gop"]
    members = {
        "mp4": encode_clip(frames_THWC, fps, lossless=lossless, crf=crf, gop=gop),
        "json": meta.to_bytes(),
        "actions.npy": npy_bytes(actions),
    }
    writer.write(clip_key(video_id, clip_index), members)
    report.clips += 1
    report.frames += T


def write_episode_clips(
    writer: PartWriter,
    report: JobReport,
    frames_THWC: np.ndarray,
    actions: np.ndarray,
    clip_frames: int,
    *,
    video_id: str,
    fps: float,
    source: str,
    encoding: dict[str, Any],
    extra: dict[str, Any],
) -> int:
    """Cut a whole episode into consecutive clips of ``clip_frames`` (a shorter tail is dropped) and write each
    with :func:`write_clip`; each clip's metadata gets its ``start_frame`` beside the episode's ``extra``.

    Args:
        frames_THWC: the episode, uint8 (T, H, W, 3).
        actions: the actions between its frames (T-1 of them).

    Returns:
        Number of clips written.
    """
    num_clips = len(frames_THWC) // clip_frames
    for clip_index in range(num_clips):
        start = clip_index * clip_frames
        write_clip(
            writer,
            report,
            frames_THWC[start : start + clip_frames],
            actions[start : start + clip_frames - 1],
            video_id=video_id,
            clip_index=clip_index,
            start_frame=start,
            fps=fps,
            source=source,
            encoding=encoding,
            extra={**extra, "start_frame": start},
        )
    return num_clips

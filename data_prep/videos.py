"""``genie prep videos SRC --out DIR``: a folder of video files -> webdataset clip shards.

Each file is cut into consecutive, non-overlapping clips of ``--clip-frames`` frames at
``--fps`` (resampled by dropping/repeating frames), resized so the short side is ``--size``
and center-cropped square, and encoded as H.264 with a short GOP. Files are processed in
parallel; the run is resumable (see :mod:`data_prep.common`). The shards hold the clips in an order
mixed across videos, seeded by ``--shuffle-seed`` (:func:`data_prep.common.shard_order`).

``--parts N --part i`` (a job array over many machines): this run prepares only the files of
part ``i``, chosen by a stable hash of each file's path relative to ``SRC``
(:func:`data_prep.common.part_of`) rather than by striding over the sorted listing, because then
parts stay disjoint even when the machines' listings differ (files still arriving on a shared
filesystem); parts are equal in size only on average, which is all a large array needs. Part
``i`` writes ``PREFIX-p000i-000000.tar ...`` plus its own ``summary-p000i.json``,
``prep_settings-p000i.json`` and ``.parts-p000i/``, so all parts can write into the same ``--out``;
a file's clips are the same bytes whichever part prepares it, so the union of the parts is exactly
what one unsplit run writes, only spread over other shard files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from data_prep.common import (
    Job,
    JobReport,
    PartWriter,
    PrepError,
    check_part,
    part_tag,
    print_summary,
    run_prep,
    select_part,
)
from genie.data.contract import ClipMeta, clip_key, make_video_id
from genie.data.video import DEFAULT_GOP, encode_clip, read_video_resampled, resize_center_crop

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
MAX_LISTED_IGNORED = 100


def find_videos(src: Path) -> tuple[list[Path], list[Path]]:
    """All files under ``src`` (recursively), split into (videos by extension, other files), sorted."""
    if src.is_file():
        return ([src], []) if src.suffix.lower() in VIDEO_EXTENSIONS else ([], [src])
    if not src.is_dir():
        raise PrepError(f"source {src} does not exist; pass a folder of videos or a video file")
    videos, others = [], []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            (videos if p.suffix.lower() in VIDEO_EXTENSIONS else others).append(p)
    return sorted(videos), sorted(others)


def process_video(job: Job, writer: PartWriter) -> JobReport:
    """Cut one video file into clips and write them to ``writer``. Top-level for pickling."""
    p = job.payload
    path, rel = p["path"], p["rel"]
    clip_frames, size = p["clip_frames"], p["size"]
    report = JobReport(job.job_id, ok=True)
    if os.path.getsize(path) == 0:
        report.ok, report.reason = False, "empty file (0 bytes)"
        return report
    fps, frames = read_video_resampled(path, p["fps"])
    video_id = make_video_id(rel)
    buf: list[np.ndarray] = []
    clip_start = 0.0
    total = 0
    for t, frame in frames:
        if not buf:
            clip_start = t
        buf.append(resize_center_crop(frame, size))
        total += 1
        if len(buf) == clip_frames:
            clip_index = report.clips
            data = encode_clip(np.stack(buf), fps, lossless=p["lossless"], crf=p["crf"], gop=p["gop"])
            meta = ClipMeta(
                source=rel,
                fps=fps,
                frames=clip_frames,
                width=size,
                height=size,
                start_time=round(clip_start, 6),
                video_id=video_id,
                clip_index=clip_index,
                lossless=p["lossless"],
            )
            writer.write(clip_key(video_id, clip_index), {"mp4": data, "json": meta.to_bytes()})
            report.clips += 1
            report.frames += clip_frames
            buf = []
            if p["max_clips"] and report.clips >= p["max_clips"]:
                break
    if report.clips == 0:
        report.ok = False
        report.reason = (
            "no frames decoded (not a video, or corrupt)"
            if total == 0
            else f"too short: {total} frames at {fps:g} fps, a clip needs {clip_frames}"
        )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder searched recursively for mp4/webm/mkv/avi/mov (or one file)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and summary.json")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--fps", type=float, default=10.0, help="resample to this frame rate (0 keeps the source's)")
    parser.add_argument("--size", type=int, default=64, help="square output resolution in pixels (default 64)")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    parser.add_argument("--lossless", action="store_true", help="frame-exact encoding (libx264rgb crf 0; ~10x larger)")
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality for lossy encoding (lower is better)")
    parser.add_argument("--gop", type=int, default=DEFAULT_GOP, help="keyframe interval (short = fast random access)")
    parser.add_argument("--max-clips", type=int, default=0, help="at most this many clips per video (0: all)")
    parser.add_argument("--prefix", default="shard", help="shard name prefix: PREFIX-000000.tar")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the shard order, mixed across videos (default 0); -1 writes video after video",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    parser.add_argument(
        "--parts", type=int, default=1, help="split the files into N disjoint parts (a job array, one part a run)"
    )
    parser.add_argument(
        "--part", type=int, default=None, help="which part (0..N-1) this run prepares, e.g. $SLURM_ARRAY_TASK_ID"
    )


def run(args: argparse.Namespace) -> dict:
    if args.clip_frames < 1 or args.size < 2 or args.fps < 0:
        raise PrepError("--clip-frames must be >= 1, --size >= 2 and --fps >= 0")
    if not args.lossless and args.size % 2:
        raise PrepError(f"--size {args.size} is odd; H.264 yuv420p needs an even size (or pass --lossless)")
    parts = getattr(args, "parts", 1)
    part = getattr(args, "part", None)
    check_part(part, parts)
    split = parts > 1
    src = args.src.resolve()
    videos, others = find_videos(src)
    base = src if src.is_dir() else src.parent
    num_videos = len(videos)
    if split:
        videos = select_part(videos, [v.relative_to(base).as_posix() for v in videos], part, parts)
        others = select_part(others, [o.relative_to(base).as_posix() for o in others], part, parts)
    common = {
        "clip_frames": args.clip_frames,
        "fps": args.fps or None,
        "size": args.size,
        "lossless": args.lossless,
        "crf": args.crf,
        "gop": args.gop,
        "max_clips": args.max_clips,
    }
    jobs = []
    for v in videos:
        rel = v.relative_to(base).as_posix()
        jobs.append(Job(make_video_id(rel), {"path": str(v), "rel": rel, **common}, label=rel))
    ignored = [
        {"file": o.relative_to(base).as_posix(), "reason": "not a video file extension"}
        for o in others[:MAX_LISTED_IGNORED]
    ]
    summary = run_prep(
        out_dir=args.out,
        jobs=jobs,
        fn=process_video,
        settings={"source": "videos", "src": str(src), **common},
        shard_size=args.shard_size,
        shuffle_seed=args.shuffle_seed if args.shuffle_seed >= 0 else None,
        workers=args.workers,
        prefix=args.prefix,
        desc=f"videos {part_tag(part, parts)}" if split else "videos",
        overwrite=args.overwrite,
        extra_summary={"ignored": ignored, "num_ignored": len(others), **common},
        part=(part, parts) if split else None,
    )
    print_summary(summary, f"{args.out} (part {part} of {parts})" if split else args.out)
    for ig in summary.get("ignored", []):
        print(f"  ignored {ig['file']}: {ig['reason']}")
    if not jobs and num_videos:
        print(f"warning: part {part} of {parts} holds none of the {num_videos} video files under {src}")
    elif not jobs:
        print(f"warning: no video files ({', '.join(VIDEO_EXTENSIONS)}) found under {src}")
    return summary

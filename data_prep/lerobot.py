"""``genie prep lerobot DIR --out OUT``: a dataset in the LeRobot layout -> clip shards with its actions.

LeRobot (Hugging Face's robot-learning library) stores a dataset as a folder::

    DIR/meta/info.json        fps, features (the cameras are the features of dtype "video"),
                              path templates, chunks_size, codebase_version
    DIR/data/...parquet       one row per frame: action (a list of floats), episode_index,
                              frame_index, timestamp, index, task_index, ...
    DIR/videos/...mp4         one video per camera

Two layouts are read, told apart by ``codebase_version`` in ``meta/info.json``:

- **v2.0 / v2.1**: one file per episode: ``data_path`` like
  ``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet`` and ``video_path`` like
  ``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``, with
  ``episode_chunk = episode_index // chunks_size``; the episodes are listed in ``meta/episodes.jsonl``
  (``{"episode_index", "tasks", "length"}``; without it, ``total_episodes`` in info.json).
- **v3.0**: many episodes per file; ``meta/episodes/chunk-*/file-*.parquet`` says for each episode
  which data file holds its rows and which video file holds its frames, from which timestamp
  to which (``videos/<camera>/from_timestamp`` / ``to_timestamp``).

Output::

    OUT/train/train-000000.tar ...   every episode but the validation ones
    OUT/val/val-000000.tar ...       --val-episodes episodes, drawn with --seed (spread over the dataset)

Each split is its own resumable :func:`data_prep.common.run_prep` run with one job per episode
(parallel over ``--workers``); ``summary.json`` lists the skipped episodes with the reason. The shard
order mixes the episodes' clips, seeded by ``--seed`` (:func:`data_prep.common.shard_order`).

Alignment: frame ``t`` of an episode's video is the frame of parquet row ``t`` (rows ordered by
``frame_index``), and the action between frame ``t`` and ``t + 1`` is row ``t``'s ``action``: LeRobot
records, with each observation, the command sent after it. So a clip of frames ``[s, s + T)``
carries ``actions[s : s + T - 1]`` (float32 ``[T-1, action_dim]``). Frames are kept at the dataset's own
rate: resampling would need to merge several actions into one, which has no meaning that holds
for every robot (absolute joint targets vs. displacements). Each episode is cut into
consecutive, non-overlapping clips of ``--clip-frames``; the remainder is dropped.

Bad episodes are skipped, counted and named (``skipped episode 7: ...``), the others kept: no
action column, a video whose frame count differs from the parquet's row count, an unreadable
video, missing files, non-finite actions, gaps in ``frame_index``, fewer frames than one clip.
A dataset that cannot be read at all (no ``meta/info.json``, no camera) stops with one line
that names the file and what to do.

Frames are resized so the short side is ``--size`` and center-cropped square, then encoded as
H.264 (``--lossless`` for frame-exact); decoding uses PyAV, which reads LeRobot's default AV1
as well as H.264.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import Job, JobReport, PartWriter, PrepError, print_summary, run_prep, write_clip
from genie.data.video import DEFAULT_GOP

PYARROW_MISSING = "reading LeRobot parquet needs pyarrow (pip install 'genie[robot]' or pip install pyarrow)"
_ID_SAFE = re.compile(r"[^A-Za-z0-9-]+")


def load_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PrepError(PYARROW_MISSING) from e
    return pq


# ---------------------------------------------------------------------------------------------------------------------
# the dataset as a whole (main process): layout, cameras, episodes


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json``, checked enough that every problem left is an episode's own."""
    if not root.is_dir():
        raise PrepError(f"{root} is not a folder; pass the root folder of a LeRobot dataset (the one holding meta/)")
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise PrepError(
            f"{path} not found: {root} is not a LeRobot dataset; pass the dataset's root folder "
            "(the one holding meta/info.json, data/ and videos/)"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"{path} is not valid JSON ({e}); restore it from the dataset's source") from e
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise PrepError(f"{path} has no 'features' object; restore it from the dataset's source")
    version = str(info.get("codebase_version", "v2.1"))
    if not re.match(r"v?[23]\.", version):
        raise PrepError(
            f"{path}: codebase_version {version} is not supported (v2.0, v2.1 and v3.0 are); "
            "convert the dataset with lerobot's conversion script first"
        )
    for key in ("data_path", "video_path"):
        if not isinstance(info.get(key), str):
            raise PrepError(f"{path} has no '{key}' template; is this a LeRobot v2/v3 dataset with videos?")
    fps = info.get("fps")
    if not isinstance(fps, int | float) or fps <= 0:
        raise PrepError(f"{path} has no positive 'fps'; restore it from the dataset's source")
    return info


def is_v3(info: dict[str, Any]) -> bool:
    return str(info.get("codebase_version", "")).lstrip("v").startswith("3")


def pick_camera(info: dict[str, Any], wanted: str | None, info_path: Path) -> str:
    """The feature key of the camera to convert: ``wanted`` (full key or its last part) or the first video feature."""
    cameras = [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") == "video"]
    if not cameras:
        images = [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") == "image"]
        hint = f" (it has image features {', '.join(images)}, stored in the parquet, not supported)" if images else ""
        raise PrepError(
            f"{info_path} lists no camera (no feature of dtype 'video'){hint}; this converter needs episode videos"
        )
    if wanted is None:
        return cameras[0]
    for key in cameras:
        if wanted in (key, key.rsplit(".", 1)[-1]):
            return key
    raise PrepError(f"--camera {wanted}: no such camera in {info_path}; cameras: {', '.join(cameras)}")


def _format(template: str, what: str, **fields: Any) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise PrepError(f"meta/info.json: cannot fill the {what} template {template!r} ({e!r})") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepError(f"{path} line {n} is not JSON ({e}); restore it from the dataset's source") from e
        rows.append(row)
    return rows


def plan_v2(root: Path, info: dict[str, Any], camera: str) -> list[dict[str, Any]]:
    """One plan per episode: where its rows and its frames are (v2.x: a file each)."""
    episodes_path = root / "meta" / "episodes.jsonl"
    tasks: dict[int, list[str]] = {}
    lengths: dict[int, int] = {}
    if episodes_path.is_file():
        indices = []
        for row in _read_jsonl(episodes_path):
            if not isinstance(row.get("episode_index"), int):
                raise PrepError(f"{episodes_path}: a line has no integer episode_index; restore the file")
            idx = row["episode_index"]
            indices.append(idx)
            tasks[idx] = [str(t) for t in row.get("tasks", [])] if isinstance(row.get("tasks"), list) else []
            if isinstance(row.get("length"), int):
                lengths[idx] = row["length"]
    elif isinstance(info.get("total_episodes"), int):
        indices = list(range(info["total_episodes"]))
    else:
        raise PrepError(f"{episodes_path} not found and meta/info.json has no total_episodes; restore meta/")
    chunks = int(info.get("chunks_size") or 1000)
    plans = []
    for idx in sorted(set(indices)):
        fields = {"episode_chunk": idx // chunks, "episode_index": idx, "total_episodes": info.get("total_episodes")}
        plans.append(
            {
                "episode": idx,
                "data": _format(info["data_path"], "data_path", **fields),
                "video": _format(info["video_path"], "video_path", video_key=camera, **fields),
                "from_ts": None,
                "to_ts": None,
                "length": lengths.get(idx),
                "tasks": tasks.get(idx, []),
            }
        )
    return plans


def plan_v3(root: Path, info: dict[str, Any], camera: str) -> list[dict[str, Any]]:
    """One plan per episode from ``meta/episodes/*/*.parquet`` (v3.0: many episodes per file)."""
    pq = load_pyarrow()
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise PrepError(
            f"{root / 'meta' / 'episodes'} holds no parquet files; a v3.0 dataset needs them (restore meta/)"
        )
    prefix = f"videos/{camera}/"
    needed = ["episode_index", "data/chunk_index", "data/file_index"]
    needed += [prefix + c for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    plans = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:
            raise PrepError(f"{f} is not readable parquet ({e}); restore meta/episodes/") from e
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise PrepError(f"{f} lacks column(s) {', '.join(missing)}; restore meta/episodes/")
        for row in table.to_pylist():
            plans.append(
                {
                    "episode": int(row["episode_index"]),
                    "data": _format(
                        info["data_path"],
                        "data_path",
                        chunk_index=row["data/chunk_index"],
                        file_index=row["data/file_index"],
                    ),
                    "video": _format(
                        info["video_path"],
                        "video_path",
                        video_key=camera,
                        chunk_index=row[prefix + "chunk_index"],
                        file_index=row[prefix + "file_index"],
                    ),
                    "from_ts": float(row[prefix + "from_timestamp"]),
                    "to_ts": float(row[prefix + "to_timestamp"]),
                    "length": int(row["length"]) if row.get("length") is not None else None,
                    "tasks": [str(t) for t in row.get("tasks") or []],
                }
            )
    plans.sort(key=lambda p: p["episode"])
    return plans


def split_episodes(episodes: list[int], val_episodes: int, seed: int) -> tuple[list[int], list[int]]:
    """Train and val episode indices: val drawn at random with ``seed`` (spread over the dataset, which is often
    ordered by task or by recording session), both in episode order."""
    rng = np.random.default_rng(seed)
    val = set(rng.choice(len(episodes), size=val_episodes, replace=False).tolist()) if val_episodes else set()
    train_eps = [e for i, e in enumerate(episodes) if i not in val]
    val_eps = [e for i, e in enumerate(episodes) if i in val]
    return train_eps, val_eps


# ---------------------------------------------------------------------------------------------------------------------
# one episode (a job, in a worker)


class EpisodeError(Exception):
    """This episode cannot be used; the message says why (the episode is named by the caller)."""


def read_actions(path: Path, rel: str, episode: int, action_key: str, v3: bool) -> np.ndarray:
    """The episode's actions, float32 ``[rows, action_dim]``, rows in ``frame_index`` order."""
    pq = load_pyarrow()
    if not path.is_file():
        raise EpisodeError(f"missing {rel}")
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise EpisodeError(f"{rel} is not readable parquet ({str(e).splitlines()[0][:200]})") from e
    if action_key not in schema.names:
        raise EpisodeError(f"no '{action_key}' column in {rel} (columns: {', '.join(schema.names)})")
    columns = [c for c in (action_key, "frame_index", "episode_index") if c in schema.names]
    # v3: read only the row groups that can hold this episode (the file holds many)
    filters = [("episode_index", "=", episode)] if v3 and "episode_index" in schema.names else None
    try:
        table = pq.read_table(path, columns=columns, filters=filters)
    except Exception as e:
        raise EpisodeError(f"{rel} is not readable parquet ({str(e).splitlines()[0][:200]})") from e
    if "episode_index" in table.column_names:
        mine = np.asarray(table.column("episode_index").to_numpy(zero_copy_only=False)) == episode
        if v3:  # a v3 data file holds several episodes
            table = table.filter(mine)
        elif not mine.all():
            raise EpisodeError(f"{rel} holds rows of other episodes (episode_index is not {episode} throughout)")
    elif v3:
        raise EpisodeError(f"no 'episode_index' column in {rel}, which holds several episodes")
    if table.num_rows == 0:
        raise EpisodeError(f"{rel} has no rows of episode {episode}")
    if "frame_index" in table.column_names:
        frame_index = np.asarray(table.column("frame_index").to_numpy(zero_copy_only=False))
        order = np.argsort(frame_index, kind="stable")
        if not np.array_equal(frame_index[order], np.arange(len(order))):
            raise EpisodeError(f"frame_index in {rel} is not 0..{len(order) - 1} (gaps or repeats)")
        table = table.take(order)
    try:
        actions = np.asarray(table.column(action_key).to_pylist(), dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise EpisodeError(f"'{action_key}' in {rel} is not one list of numbers of one length per row ({e})") from e
    if actions.ndim == 1:
        actions = actions[:, None]  # one number per row: a 1-d action
    if actions.ndim != 2 or actions.shape[1] == 0:
        raise EpisodeError(f"'{action_key}' in {rel} has shape {actions.shape}, expected [rows, action_dim]")
    bad = np.flatnonzero(~np.isfinite(actions).all(axis=1))
    if len(bad):
        raise EpisodeError(f"'{action_key}' in {rel} is not finite at {len(bad)} row(s), first row {bad[0]}")
    return actions


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Width and height with the short side ``size`` (as :func:`genie.data.video.resize_center_crop` scales)."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def iter_frames(path: Path, rel: str, from_ts: float | None, to_ts: float | None, fps: float, size: int):
    """Frames of a video, or of its ``[from_ts, to_ts)`` part (v3), as uint8 ``[size, size, 3]``: short side
    scaled to ``size``, center-cropped.

    Scaling and colour conversion happen in one libswscale call with one reused context (area
    averaging when shrinking, like the PIL box filter elsewhere; bicubic when enlarging): 7x faster
    than converting the full frame to RGB and resizing it with PIL (916 against 135 frames/s for
    640x480 H.264 here), since a new context per frame costs more than the scaling itself.
    """
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    if not path.is_file():
        raise EpisodeError(f"missing {rel}")
    half = 0.5 / fps
    reformatter = VideoReformatter()
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise EpisodeError(f"{rel} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            if from_ts:
                # seek lands on a keyframe before from_ts; the frames before from_ts are skipped below
                container.seek(int(max(from_ts - 1.0, 0) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = frame.time
                if from_ts is not None and t is not None:
                    if t < from_ts - half:
                        continue
                    if to_ts is not None and t >= to_ts - half:
                        break
                w, h = scaled_size(frame.width, frame.height, size)
                shrink = h <= frame.height
                rgb = reformatter.reformat(
                    frame,
                    width=w,
                    height=h,
                    format="rgb24",
                    interpolation=Interpolation.AREA if shrink else Interpolation.BICUBIC,
                ).to_ndarray()
                top, left = (h - size) // 2, (w - size) // 2
                yield np.ascontiguousarray(rgb[top : top + size, left : left + size])
    except (av.FFmpegError, OSError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise EpisodeError(f"unreadable video {rel} ({why})") from e


def process_episode(job: Job, writer: PartWriter) -> JobReport:
    """Convert one episode into clips. Top-level for pickling."""
    p = job.payload
    root = Path(p["root"])
    episode, clip_frames, size, fps = p["episode"], p["clip_frames"], p["size"], p["fps"]
    report = JobReport(job.job_id, ok=True)
    frames = 0  # decoded from the source video
    try:
        actions = read_actions(root / p["data"], p["data"], episode, p["action_key"], p["v3"])
        rows = len(actions)
        if p["length"] is not None and p["length"] != rows:
            raise EpisodeError(f"meta says {p['length']} frames but {p['data']} has {rows} rows")
        video_id = f"{p['dataset_id']}-e{episode:06d}"
        buf: list[np.ndarray] = []
        for frame in iter_frames(root / p["video"], p["video"], p["from_ts"], p["to_ts"], fps, size):
            frames += 1
            if frames > rows:  # keep counting to report the mismatch; nothing more to encode
                continue
            buf.append(frame)
            if len(buf) < clip_frames:
                continue
            clip_index, start = report.clips, report.clips * clip_frames
            write_clip(
                writer,
                report,
                np.stack(buf),
                actions[start : start + clip_frames - 1],
                video_id=video_id,
                clip_index=clip_index,
                start_frame=start,
                fps=fps,
                source=f"lerobot:{p['dataset_name']}/episode_{episode:06d}",
                encoding=p,
                extra={
                    "episode": episode,
                    "start_frame": start,
                    "episode_frames": rows,
                    "camera": p["camera"],
                    "action_key": p["action_key"],
                    "action_dim": int(actions.shape[1]),
                    "tasks": p["tasks"],
                    "split": p["split"],
                },
            )
            buf = []
        if frames == 0:
            raise EpisodeError(f"unreadable video {p['video']} (no frames decoded)")
        if frames != rows:
            raise EpisodeError(f"video {p['video']} has {frames} frames but {p['data']} has {rows} rows")
        if report.clips == 0:
            raise EpisodeError(f"only {rows} frames, fewer than one clip (--clip-frames {clip_frames})")
    except EpisodeError as e:
        report.ok, report.reason = False, str(e)
    report.info.update(source_frames=frames)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert a dataset in the LeRobot layout (v2.0/v2.1/v3.0: meta/info.json, parquet rows with an 'action' "
        "column, one video per camera) into clips with their actions (float32 [T-1, action_dim], row t's action "
        "between frame t and t+1) in OUT/train/train-*.tar and OUT/val/val-*.tar. Bad episodes are skipped and named."
    )
    add = parser.add_argument
    add("src", type=Path, metavar="DIR", help="the dataset's root folder (holding meta/info.json, data/, videos/)")
    add("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    add("--camera", default=None, help="camera feature key, or its last part (default: the first video feature)")
    add("--action-key", default="action", help="parquet column holding the actions (default 'action')")
    add("--size", type=int, default=64, help="square frame size (default 64)")
    add("--clip-frames", type=int, default=16, help="frames per clip (default 16)")
    add("--val-episodes", type=int, default=None, help="episodes held out for val (max(1, episodes // 10); 0: none)")
    add("--seed", type=int, default=0, help="seed of the choice of val episodes and of the shard order (default 0)")
    add("--lossless", action="store_true", help="frame-exact encoding (libx264rgb crf 0; ~10x larger)")
    add("--crf", type=int, default=18, help="H.264 quality for lossy encoding (lower is better)")
    add("--gop", type=int, default=DEFAULT_GOP, help="keyframe interval (short = fast random access)")
    add("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    add("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (0: none)")
    add("--overwrite", action="store_true", help="replace shards made with other settings")


def run(args: argparse.Namespace) -> dict:
    if args.clip_frames < 2 or args.size < 2:
        raise PrepError("--clip-frames must be >= 2 (a clip needs a transition) and --size >= 2")
    if not args.lossless and args.size % 2:
        raise PrepError(f"--size {args.size} is odd; H.264 yuv420p needs an even size (or pass --lossless)")
    load_pyarrow()
    root = args.src.resolve()
    info = read_info(root)
    camera = pick_camera(info, args.camera, root / "meta" / "info.json")
    if args.action_key not in info["features"]:
        raise PrepError(
            f"{root / 'meta' / 'info.json'} has no '{args.action_key}' feature (features: "
            f"{', '.join(info['features'])}); pass --action-key"
        )
    v3 = is_v3(info)
    plans = plan_v3(root, info, camera) if v3 else plan_v2(root, info, camera)
    if not plans:
        raise PrepError(f"{root} lists no episodes in meta/; nothing to convert")
    n = len(plans)
    val_episodes = (max(1, n // 10) if n >= 2 else 0) if args.val_episodes is None else args.val_episodes
    if not 0 <= val_episodes < n:
        raise PrepError(f"--val-episodes must be in 0..{n - 1} (the dataset has {n} episodes)")
    train_eps, val_eps = split_episodes([p["episode"] for p in plans], val_episodes, args.seed)
    by_episode = {p["episode"]: p for p in plans}
    name = root.name
    common = {
        "root": str(root),
        "dataset_name": name,
        "dataset_id": _ID_SAFE.sub("-", name).strip("-")[-40:] or "lerobot",
        "camera": camera,
        "action_key": args.action_key,
        "v3": v3,
        "fps": float(info["fps"]),
        "size": args.size,
        "clip_frames": args.clip_frames,
        "lossless": args.lossless,
        "crf": args.crf,
        "gop": args.gop,
    }
    results: dict[str, Any] = {}
    for split, episodes in (("train", train_eps), ("val", val_eps)):
        if not episodes:
            continue
        jobs = [
            Job(f"{split}-e{e:06d}", {**by_episode[e], **common, "split": split}, label=f"episode {e}")
            for e in episodes
        ]
        out_dir = args.out / split
        summary = run_prep(
            out_dir=out_dir,
            jobs=jobs,
            fn=process_episode,
            settings={
                "source": "lerobot",
                "codebase_version": str(info.get("codebase_version", "")),
                "split": split,
                "val_episodes": val_episodes,
                "seed": args.seed,
                **common,
            },
            shard_size=args.shard_size,
            shuffle_seed=args.seed,
            workers=args.workers,
            prefix=split,
            desc=f"lerobot {split}",
            overwrite=args.overwrite,
            extra_summary={
                "split": split,
                "episodes": episodes,
                "dataset": str(root),
                "codebase_version": str(info.get("codebase_version", "")),
                "camera": camera,
                "action_key": args.action_key,
                "fps": float(info["fps"]),
                "size": args.size,
                "clip_frames": args.clip_frames,
            },
        )
        print_summary(summary, out_dir)
        decoded = summary["totals"].get("source_frames", 0)
        summary["frames_per_s"] = round(decoded / max(summary["seconds"], 1e-9), 1)
        print(
            f"  {split}: {len(episodes)} episodes, {summary['num_skipped']} skipped; "
            f"{summary['frames_per_s']:.1f} source frames/s decoded and converted"
        )
        results[split] = summary
    for split, summary in results.items():
        print(f"{split} shards: {args.out / split}/{split}-*.tar ({len(summary['shards'])} shards)")
    return results

"""``genie prep inspect DIR``: describe a set of clip shards and draw a contact sheet.

``DIR`` is a folder (searched recursively for ``*.tar``, so ``DIR`` with ``train/`` and ``val/``
works; hidden folders such as an interrupted run's ``.parts/`` are skipped), a brace pattern
(``shards/train-{000000..000009}.tar``), a glob, or one tar.

The scan reads every sample's small members (``json``, ``actions.npy``) and only the first
bytes of each video, so it is fast on large datasets. It never crashes on bad data: samples
that a loader could not use (missing or unreadable members, actions of the wrong length) and
shards that are truncated or not tars are counted and the first few reasons listed. Videos are
decoded only for the contact sheet (one row per clip, evenly spaced frames), or for every clip
with ``--decode-all``.

Shards of whole videos written by other tools (video2dataset: ``mp4`` + a ``json`` that is not
our clip metadata) are not broken: the loader windows, resizes and crops them. For them the
frame count, size and rate are read from the video's container header, straight from the tar
(only the header's bytes are read for an mp4), and the report counts them as ``whole_videos``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from data_prep.common import PrepError
from genie.data.contract import (
    ACTIONS_MEMBER,
    META_MEMBER,
    VIDEO_MEMBER,
    ClipMeta,
    is_clip_meta,
    load_meta_json,
    npy_load,
    whole_video_member,
)

MAX_REASONS = 5  # bad samples / shard errors listed by name; the rest are only counted
MAX_DISTINCT_ACTIONS = 4096  # stop collecting distinct discrete values past this (continuous-ish data)
SMALL_MEMBER_BYTES = 64 << 20  # members above this are not read during the scan (only videos are big)

# contact sheet layout, in pixels
GAP = 2
LABEL_HEIGHT = 12
BACKGROUND = (24, 24, 24)
LABEL_COLOR = (200, 200, 200)
ERROR_TILE = (96, 16, 16)


@dataclass
class ClipRef:
    """Where one readable clip's video lives, so the contact sheet can read just those bytes."""

    key: str
    shard: Path
    offset: int  # byte offset of the mp4 data in the shard
    size: int
    frames: int


@dataclass
class Scan:
    """Everything counted while reading the shards.

    Resolution, fps, frames and source count every sample whose metadata is readable; ``clips``
    holds only the samples a loader can use (no problem found).
    """

    shards: list[Path]
    base: Path
    bytes: int = 0
    samples: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    shard_errors: list[str] = field(default_factory=list)
    groups: Counter = field(default_factory=Counter)  # shard folder -> clips
    group_shards: Counter = field(default_factory=Counter)
    members: Counter = field(default_factory=Counter)
    resolutions: Counter = field(default_factory=Counter)
    fps: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    frames: list[int] = field(default_factory=list)
    lossless: int = 0
    whole_videos: int = 0  # samples without our clip metadata (video2dataset), resized by the loader
    video_ids: set[str] = field(default_factory=set)
    action_clips: int = 0
    action_dtypes: Counter = field(default_factory=Counter)
    action_kinds: Counter = field(default_factory=Counter)  # "discrete [T-1]" / "continuous [T-1, k]"
    action_values: set[int] = field(default_factory=set)
    action_values_capped: bool = False
    action_min: float = float("inf")
    action_max: float = float("-inf")
    clips: list[ClipRef] = field(default_factory=list)

    def add_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < MAX_REASONS:
            self.bad_examples.append(f"{where}: {reason}")


def find_shards(spec: str) -> tuple[list[Path], Path]:
    """Resolve ``spec`` to (shard paths in order, base folder for grouping and the default sheet).

    Raises:
        PrepError: nothing matches.
    """
    path = Path(spec)
    if path.is_dir():
        shards = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .parts of an unfinished run
            shards += [Path(root) / f for f in sorted(files) if f.endswith(".tar")]
        if not shards:
            raise PrepError(f"no .tar shards under {path}")
        return shards, path
    if "{" in spec:
        from braceexpand import braceexpand  # a webdataset dependency

        shards = [Path(p) for p in braceexpand(spec)]  # missing ones are reported as shard errors
    elif any(c in spec for c in "*?["):
        shards = sorted(Path(p) for p in glob.glob(spec))
    else:
        shards = [path] if path.exists() else []
    if not shards:
        raise PrepError(f"{spec} is not a folder, tar file, glob or brace pattern that matches any shard")
    return shards, shards[0].parent


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): webdataset's rule, the first dot of the
    base name starts the member name."""
    folder, _, base = name.rpartition("/")
    key, _, member = base.partition(".")
    return (f"{folder}/{key}" if folder else key), member


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int | None = None) -> bytes:
    f = tar.extractfile(info)
    if f is None:
        return b""
    data = f.read(limit) if limit is not None else f.read()
    if len(data) < (info.size if limit is None else min(limit, info.size)):
        raise tarfile.ReadError("unexpected end of data")
    return data


def check_sample(scan: Scan, tar: tarfile.TarFile, shard: Path, key: str, infos: dict[str, tarfile.TarInfo]) -> None:
    """Record one sample: its metadata and actions if readable, or why a loader could not use it."""
    scan.samples += 1
    scan.members.update(infos.keys())
    where = f"{shard.name}:{key}"
    whole = None  # the video member of a whole video (no clip metadata), else None
    try:
        if META_MEMBER not in infos:
            raise ValueError("no json member")
        raw = load_meta_json(_read(tar, infos[META_MEMBER], SMALL_MEMBER_BYTES))
        whole = None if is_clip_meta(raw) else whole_video_member(infos)
        meta = ClipMeta.from_dict(raw) if whole is None else whole_video_meta(tar, infos[whole], key, raw)
        frames, width, height = int(meta.frames), int(meta.width), int(meta.height)
    except Exception as e:  # any garbage in a member is a bad sample, never a crash
        what = "unreadable video" if whole is not None else "unreadable metadata"
        scan.add_bad(where, f"{what} ({type(e).__name__}: {str(e)[:120]})")
        return
    scan.resolutions[f"{width}x{height}"] += 1
    scan.fps[f"{float(meta.fps):g}"] += 1
    scan.sources[meta.source.split("/")[0]] += 1
    scan.frames.append(frames)
    scan.lossless += bool(meta.lossless)
    scan.whole_videos += whole is not None
    scan.video_ids.add(meta.video_id or key.rpartition("_")[0])
    problems = []
    video = infos.get(whole or VIDEO_MEMBER)
    if whole is not None:
        pass  # its header was read and parsed above
    elif video is None or video.size == 0:
        problems.append("no video" if video is None else "empty video member")
    else:
        try:
            head = _read(tar, video, 12)
            if head[4:8] != b"ftyp":
                problems.append("video member is not an mp4 (no ftyp box)")
        except (tarfile.TarError, OSError) as e:
            problems.append(f"video unreadable ({e})")
    if ACTIONS_MEMBER in infos:
        try:
            problems += check_actions(scan, npy_load(_read(tar, infos[ACTIONS_MEMBER], SMALL_MEMBER_BYTES)), frames)
        except Exception as e:  # as above: np.load raises many kinds of errors on garbage
            problems.append(f"actions.npy unreadable ({type(e).__name__}: {str(e)[:120]})")
    if problems:
        scan.add_bad(where, "; ".join(problems))
    else:
        scan.clips.append(ClipRef(key, shard, video.offset_data, video.size, frames))


def whole_video_meta(tar: tarfile.TarFile, video: tarfile.TarInfo, key: str, raw: dict[str, Any]) -> ClipMeta:
    """Describe a whole video (video2dataset layout) from its container header, read in place in the tar.

    Raises:
        DecodeError: not a readable video; ValueError: a video2dataset status other than success.
    """
    from genie.data.video import probe_video

    status = raw.get("status")
    if status is not None and status != "success":
        raise ValueError(f"video2dataset status {str(status)[:40]!r}")
    f = tar.extractfile(video)  # seekable: only the bytes the demuxer asks for are read
    if f is None:
        raise ValueError("video member is not a file")
    info = probe_video(f)
    source = urlparse(str(raw.get("url") or "")).netloc or "whole videos"
    return ClipMeta(source=source, fps=info.fps, frames=info.frames, width=info.width, height=info.height, video_id=key)


def check_actions(scan: Scan, actions: np.ndarray, frames: int) -> list[str]:
    """Count one clip's actions; return what is wrong with them (the contract: [T-1] or [T-1, k])."""
    if actions.shape[:1] != (frames - 1,) or actions.ndim not in (1, 2):
        return [f"actions shape {list(actions.shape)} does not fit a {frames}-frame clip ([T-1] or [T-1, k])"]
    scan.action_clips += 1
    scan.action_dtypes[str(actions.dtype)] += 1
    if np.issubdtype(actions.dtype, np.integer) and actions.ndim == 1:
        scan.action_kinds["discrete [T-1]"] += 1
        if len(scan.action_values) < MAX_DISTINCT_ACTIONS:
            scan.action_values.update(int(v) for v in np.unique(actions))
        else:
            scan.action_values_capped = True
    else:
        dim = actions.shape[1] if actions.ndim == 2 else 1
        scan.action_kinds[f"continuous [T-1, {dim}]"] += 1
    if actions.size:
        scan.action_min = min(scan.action_min, float(actions.min()))
        scan.action_max = max(scan.action_max, float(actions.max()))
    return []


def scan_shard(scan: Scan, shard: Path) -> None:
    """Read one shard's headers and small members; a broken shard is recorded, never raised."""
    # group by folder below the base (train/, val/); shards right in it are grouped under its name
    group = shard.parent.relative_to(scan.base).as_posix() if shard.parent.is_relative_to(scan.base) else "."
    group = (scan.base.name or ".") if group == "." else group
    scan.group_shards[group] += 1
    before = scan.samples
    try:
        size = shard.stat().st_size
        scan.bytes += size
        with tarfile.open(shard, "r") as tar:
            key, infos = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                name, member = split_member(info.name)
                if name != key and key is not None:
                    check_sample(scan, tar, shard, key, infos)
                    infos = {}
                key = name
                infos[member] = info
            if key is not None:
                check_sample(scan, tar, shard, key, infos)
            # a tar cut at a member boundary reads like a shorter, valid one: only the missing
            # end-of-archive block tells
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(512)
            if len(end) < 512 or end.strip(b"\0"):
                raise tarfile.ReadError("truncated (no end-of-archive block)")
    except (tarfile.TarError, OSError, EOFError) as e:
        if len(scan.shard_errors) < MAX_REASONS:
            scan.shard_errors.append(f"{shard}: {e} (after {scan.samples - before} samples)")
        else:
            scan.shard_errors.append(str(shard))
    scan.groups[group] += scan.samples - before


def scan_shards(shards: list[Path], base: Path) -> Scan:
    from tqdm.auto import tqdm

    scan = Scan(shards=shards, base=base)
    for shard in tqdm(shards, desc="inspect", unit="shard", disable=len(shards) < 4 or None, leave=False):
        scan_shard(scan, shard)
    return scan


def read_video(ref: ClipRef) -> bytes:
    with open(ref.shard, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.size)


def decode_all(scan: Scan) -> list[str]:
    """Decode every readable clip fully; return the problems found (count mismatches, corrupt video)."""
    from genie.data.video import DecodeError, count_frames

    problems = []
    for ref in scan.clips:
        try:
            n = count_frames(read_video(ref))
            if n != ref.frames:
                problems.append(f"{ref.shard.name}:{ref.key}: {n} frames decoded, metadata says {ref.frames}")
        except (DecodeError, OSError) as e:
            problems.append(f"{ref.shard.name}:{ref.key}: {e}")
    return problems


def sheet_size(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of ``rows`` clips x ``cols`` frames."""
    return GAP + cols * (width + GAP), GAP + rows * (LABEL_HEIGHT + height + GAP)


def contact_sheet(refs: list[ClipRef], frames: int, path: Path, scale: int = 1) -> tuple[bool, list[str]]:
    """Draw one row per clip, ``frames`` evenly spaced frames each, labelled with the key.

    Tiles take the first decodable clip's size (times ``scale``); clips of another size are
    resized to it. A clip that fails to decode gets a dark red row.

    Returns:
        (whether the sheet was written, the decode errors).
    """
    from PIL import Image, ImageDraw

    from genie.data.video import DecodeError, decode_clip

    rows: list[tuple[str, np.ndarray | None]] = []
    errors = []
    for ref in refs:
        idx = np.linspace(0, max(ref.frames - 1, 0), frames).round().astype(int).tolist()
        try:
            rows.append((ref.key, decode_clip(read_video(ref), idx)))
        except (DecodeError, OSError) as e:
            errors.append(f"{ref.shard.name}:{ref.key}: {e}")
            rows.append((ref.key, None))
    shapes = [r.shape[1:3] for _, r in rows if r is not None]
    if not shapes:
        return False, errors
    h, w = shapes[0][0] * scale, shapes[0][1] * scale
    sheet = Image.new("RGB", sheet_size(len(rows), frames, h, w), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, (key, clip) in enumerate(rows):
        top = GAP + r * (LABEL_HEIGHT + h + GAP)
        draw.text((GAP, top), key if clip is not None else f"{key} (decode failed)", fill=LABEL_COLOR)
        for c in range(frames):
            if clip is None:
                tile = Image.new("RGB", (w, h), ERROR_TILE)
            else:
                tile = Image.fromarray(clip[c])
                if tile.size != (w, h):
                    tile = tile.resize((w, h), Image.Resampling.NEAREST)
            sheet.paste(tile, (GAP + c * (w + GAP), top + LABEL_HEIGHT))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return True, errors


def build_report(scan: Scan, spec: str) -> dict[str, Any]:
    frames = np.asarray(scan.frames) if scan.frames else None
    actions: dict[str, Any] = {"present": scan.action_clips > 0, "clips": scan.action_clips}
    if scan.action_clips:
        actions.update(
            kind=", ".join(sorted(scan.action_kinds)),
            dtype=", ".join(sorted(scan.action_dtypes)),
            min=scan.action_min,
            max=scan.action_max,
        )
        if scan.action_values:
            actions["distinct_values"] = len(scan.action_values)
            if scan.action_values_capped:
                actions["distinct_values_capped"] = True
    return {
        "path": spec,
        "shards": len(scan.shards),
        "groups": {g: {"shards": scan.group_shards[g], "clips": scan.groups[g]} for g in sorted(scan.group_shards)},
        "bytes": scan.bytes,
        "samples": scan.samples,
        "clips": len(scan.clips),  # samples a loader can use
        "bad": scan.bad,
        "bad_examples": scan.bad_examples,
        "shard_errors": scan.shard_errors,
        "videos": len(scan.video_ids),
        "resolutions": dict(scan.resolutions.most_common()),
        "frames_per_clip": None
        if frames is None
        else {"min": int(frames.min()), "mean": round(float(frames.mean()), 2), "max": int(frames.max())},
        "fps": dict(scan.fps.most_common()),
        "lossless": scan.lossless,
        "whole_videos": scan.whole_videos,
        "sources": dict(scan.sources.most_common(10)),
        "members": dict(sorted(scan.members.items())),
        "actions": actions,
    }


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in c.items()) or "-"


def print_report(report: dict[str, Any]) -> None:
    groups = ", ".join(f"{g}: {v['shards']} shards, {v['clips']} clips" for g, v in report["groups"].items())
    rows = [
        ("path", report["path"]),
        ("shards", f"{report['shards']}  ({groups})"),
        ("clips", f"{report['clips']} readable of {report['samples']} samples from {report['videos']} videos"),
        ("resolution", _counts(report["resolutions"])),
    ]
    fpc = report["frames_per_clip"]
    if fpc:
        rows.append(("frames/clip", f"min {fpc['min']}, mean {fpc['mean']:g}, max {fpc['max']}"))
    rows += [
        ("fps", _counts(report["fps"])),
        ("lossless", f"{report['lossless']} of {report['samples']}"),
    ]
    if report["whole_videos"]:
        rows.append(
            (
                "whole videos",
                f"{report['whole_videos']} (no clip metadata, e.g. video2dataset: windowed and resized by the loader)",
            )
        )
    rows += [
        ("sources", _counts(report["sources"])),
        ("members", _counts(report["members"])),
    ]
    a = report["actions"]
    if a["present"]:
        values = f", {a['distinct_values']} distinct values" if "distinct_values" in a else ""
        rows.append(
            ("actions", f"{a['clips']} clips: {a['kind']} {a['dtype']}{values} in [{a['min']:g}, {a['max']:g}]")
        )
    else:
        rows.append(("actions", "none"))
    mb = report["bytes"] / 1e6
    per_clip = report["bytes"] / max(report["samples"], 1) / 1e3
    rows.append(("size", f"{mb:.1f} MB ({per_clip:.1f} kB per sample)"))
    rows.append(("unreadable", f"{report['bad']} samples, {len(report['shard_errors'])} broken shards"))
    if "undecodable" in report:
        rows.append(("decoded", f"{len(report['undecodable'])} problems in {report['clips']} clips"))
    if report.get("sheet"):
        rows.append(("sheet", report["sheet"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for reason in report["bad_examples"] + report["shard_errors"][:MAX_REASONS] + report.get("undecodable", [])[:5]:
        print(f"  ! {reason}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("path", help="shard folder (searched recursively), brace pattern, glob, or one .tar")
    add("--sheet", type=Path, default=None, help="contact sheet PNG (default DIR/contact_sheet.png)")
    add("--no-sheet", action="store_true", help="do not draw a contact sheet")
    add("--clips", type=int, default=8, help="clips (rows) in the contact sheet (default 8), evenly spread")
    add("--frames", type=int, default=8, help="evenly spaced frames per row (default 8)")
    add("--scale", type=int, default=1, help="upscale tiles by this integer factor (default 1)")
    add("--decode-all", action="store_true", help="also decode every clip fully to verify it (slow)")
    add("--json", action="store_true", help="print the report as JSON")
    add("--strict", action="store_true", help="exit with an error when any sample or shard is unreadable")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.clips < 1 or args.frames < 1 or args.scale < 1:
        raise PrepError("--clips, --frames and --scale must be >= 1")
    shards, base = find_shards(str(args.path))
    scan = scan_shards(shards, base)
    report = build_report(scan, str(args.path))
    if args.decode_all:
        report["undecodable"] = decode_all(scan)
    report["sheet"] = None
    if not args.no_sheet and scan.clips:
        path = args.sheet or base / "contact_sheet.png"
        pick = np.unique(np.linspace(0, len(scan.clips) - 1, min(args.clips, len(scan.clips))).round().astype(int))
        drawn, report["sheet_errors"] = contact_sheet([scan.clips[i] for i in pick], args.frames, path, args.scale)
        report["sheet"] = str(path) if drawn else None
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
        for e in report.get("sheet_errors", []):
            print(f"  ! sheet: {e}")
    broken = report["bad"] + len(report["shard_errors"]) + len(report.get("undecodable", []))
    if args.strict and broken:
        raise PrepError(f"{broken} unreadable samples or shards in {args.path}")
    return report

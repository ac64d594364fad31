"""``genie bench data``: decoded frames per second through the training loader.

Writes synthetic shards (smooth moving content, encoded exactly as ``genie prep videos`` does)
at each size, or reads the shards you give with ``--shards``, then times full training batches
(random windows, decode, collate) through a DataLoader with 0, 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from genie.bench.report import format_table, write_report
from genie.data.contract import ClipMeta, ShardWriter, clip_key
from genie.data.video import DEFAULT_GOP, encode_clip


def synthetic_clip(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """A camera-like clip: a drifting colour gradient with a few moving squares, uint8 [T, H, W, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0, 1, 3)
    v = rng.uniform(-0.03, 0.03, 2)
    squares = [(rng.uniform(0, 1, 2), rng.uniform(-0.02, 0.02, 2), rng.uniform(0, 255, 3)) for _ in range(3)]
    out = np.empty((frames, size, size, 3), np.uint8)
    side = max(2, size // 8)
    for t in range(frames):
        img = np.stack(
            [255 * (0.5 + 0.5 * np.sin(6 * (xx + v[0] * t) + 7 * base[c] + 4 * (yy + v[1] * t))) for c in range(3)], -1
        )
        for pos, vel, col in squares:
            y, x = (((pos + vel * t) % 1.0) * (size - side)).astype(int)
            img[y : y + side, x : x + side] = col
        out[t] = img.astype(np.uint8)
    return out


def write_synthetic_shards(out_dir: Path, size: int, clips: int, clip_frames: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, prefix=f"bench{size}", shard_size=max(1, clips // 4)) as w:
        for i in range(clips):
            frames = synthetic_clip(rng, clip_frames, size)
            meta = ClipMeta(
                source="synthetic",
                fps=15.0,
                frames=clip_frames,
                width=size,
                height=size,
                video_id="synthetic",
                clip_index=i,
            )
            w.write(
                clip_key("synthetic", i), {"mp4": encode_clip(frames, 15.0, gop=DEFAULT_GOP), "json": meta.to_bytes()}
            )
    return out_dir


def time_loader(
    shards: str, workers: int, num_frames: int, batch_size: int, batches: int, backend: str
) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from genie.data.loader import ClipStream

    ds = ClipStream(
        shards, num_frames=num_frames, batch_size=batch_size, train=True, shuffle_buffer=16, backend=backend
    )  # type: ignore[arg-type]
    dl = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    it = iter(dl)
    next(it)  # worker start-up and first batch are reported apart from the steady rate
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    frames = 0
    for _ in range(batches):
        b = next(it)
        frames += b["frames"].shape[0] * b["frames"].shape[1]
    dt = time.perf_counter() - t1
    del it
    return {"frames_per_s": frames / dt, "clips_per_s": frames / num_frames / dt, "first_batch_s": first}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="64,256", help="frame sizes of the synthetic shards (comma list)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (comma list)")
    parser.add_argument("--shards", default=None, help="time these shards instead of synthetic ones")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per window (T)")
    parser.add_argument("--clip-frames", type=int, default=32, help="frames per synthetic clip")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"], help="decoder")
    parser.add_argument("--json", default="bench_data.json", help="where to write the JSON report")


def run(args: argparse.Namespace) -> dict:
    workers = [int(w) for w in str(args.workers).split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="genie-bench-") as tmp:
        if args.shards:
            sources = [("given", args.shards)]
        else:
            sources = []
            for size in (int(s) for s in str(args.sizes).split(",")):
                d = write_synthetic_shards(Path(tmp) / f"s{size}", size, clips=32, clip_frames=args.clip_frames)
                sources.append((f"{size}x{size}", str(d)))
        for label, shards in sources:
            for w in workers:
                r = time_loader(shards, w, args.num_frames, args.batch_size, args.batches, args.backend)
                rows.append({"data": label, "workers": w, **r})
                print(f"  {label} workers={w}: {r['frames_per_s']:,.0f} frames/s", flush=True)
    cols = ["data", "workers", "frames_per_s", "clips_per_s", "first_batch_s"]
    print(format_table(rows, cols))
    report = write_report(
        args.json, "data", rows, num_frames=args.num_frames, batch_size=args.batch_size, backend=args.backend
    )
    print(f"wrote {args.json}")
    return report

"""``genie prep coinrun --out DIR``: Procgen CoinRun episodes under a random policy -> clip shards.

This is the embedded default dataset and the standard benchmark (Genie's CoinRun case study:
64x64 frames, 16-frame clips). Every clip carries the true actions (``actions.npy``, int64
``[T-1]``, one of CoinRun's 15 discrete actions per transition), so the latent action model
can be scored against them.

Output::

    DIR/train/train-000000.tar ...   levels [0, --levels)
    DIR/val/val-000000.tar ...       levels [--val-start-level, --val-start-level + --val-levels)

Each split is its own resumable :func:`data_prep.common.run_prep` run (``summary.json`` and
``prep_settings.json`` beside its shards, the level range included).

Determinism: every *episode* is seeded on its own from ``(--seed, split, episode index)``: the
level it plays, the environment's ``rand_seed`` and the policy's RNG. A fresh environment is
made per episode (it costs well under a millisecond once procgen is loaded). So the shards are
byte-identical for the same arguments whatever ``--workers`` and ``--episodes-per-job`` are, and
``--episodes 200`` holds exactly the clips of ``--episodes 100`` plus new ones. ``--seed`` also seeds the
shard order, which mixes the episodes' clips (:func:`data_prep.common.shard_order`).

Policy: *sticky-random*. The first action is uniform over the 15 actions; at each later step
the previous action is repeated with probability ``--sticky`` (default 0.5), otherwise a new one
is drawn uniformly. Why not plain uniform-random: CoinRun's character has inertia, so an action
held for a single frame barely shows; repeating actions gives stretches of consistent, visible
motion, which is what makes actions identifiable from frames (the LAM's job), and it explores
further into a level. Measured on 300 hard-mode episodes (capped at 1000 steps): sticky 0.0
completes 20% of levels with 5% of transitions static (frame unchanged); 0.5 completes 29% with
11% static; 0.75 completes 31% but 21% static (held no-op actions: 7 of the 15 actions do
nothing in CoinRun). 0.5 is the knee: most of the exploration gain, every action still used
uniformly over the run, and consecutive actions only moderately correlated.

Episodes end when the level is completed, the agent dies, or at CoinRun's 1000-step timeout;
we keep at most ``--max-episode-frames`` frames of each, cut into consecutive non-overlapping
clips of ``--clip-frames`` and drop the remainder. Episodes shorter than one clip are dropped
(and counted). Frames are encoded lossless by default: pixel art through lossy H.264 has
errors up to ~99 per pixel, which would cap the tokenizer's PSNR (see PITFALLS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import (
    Job,
    JobReport,
    PartWriter,
    PrepError,
    add_episode_output_arguments,
    check_episode_arguments,
    episode_jobs,
    episode_rng,
    print_summary,
    run_prep,
    write_episode_clips,
)
from genie.data.video import resize_center_crop

NUM_ACTIONS = 15  # CoinRun's action space (procgen's shared 15 key combos)
FPS = 15  # procgen's native frame rate
NATIVE_SIZE = 64  # procgen renders observations at 64x64
INT32_MAX = 2**31 - 1  # procgen takes level seeds and rand_seed as C ints
_WHEELS = "wheels for CPython 3.11/3.12 x86_64 Linux only"
PROCGEN_MISSING = f"CoinRun needs procgen-mirror (pip install 'genie[coinrun]'; {_WHEELS})"


def load_procgen() -> Any:
    """Import procgen lazily and quietly; return ``ProcgenGym3Env`` or raise :class:`PrepError`.

    procgen imports gym 0.26, which prints a multi-line deprecation notice to stderr on import;
    it says nothing about our use (we only use procgen's gym3 API), so it is swallowed.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            from procgen import ProcgenGym3Env
    except ImportError as e:
        raise PrepError(PROCGEN_MISSING) from e
    return ProcgenGym3Env


def procgen_version() -> str:
    """The installed procgen version (part of the prep settings: another build may differ)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("procgen-mirror")
    except PackageNotFoundError:
        return "unknown"


def play_episode(
    env_cls: Any,
    rng: np.random.Generator,
    *,
    level: int,
    env_seed: int,
    sticky: float,
    max_frames: int,
    distribution_mode: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Play one CoinRun episode on ``level`` with the sticky-random policy.

    Returns:
        ``(frames uint8 [L, 64, 64, 3], actions int64 [L - 1])`` where ``actions[t]`` was taken
        between frame ``t`` and ``t + 1``; ``L <= max_frames``. The action that ends the episode
        has no next frame (gym3 shows the next episode's first frame instead) and is not kept.
    """
    # num_threads=0 steps in this thread: twice as fast for a single env, and no extra threads
    # competing with the other prep workers
    env = env_cls(
        num=1,
        env_name="coinrun",
        start_level=level,
        num_levels=1,
        distribution_mode=distribution_mode,
        rand_seed=env_seed,
        num_threads=0,
    )
    try:
        _, obs, _ = env.observe()
        frames = [np.array(obs["rgb"][0])]
        actions: list[int] = []
        action = -1
        while len(frames) < max_frames:
            if action < 0 or rng.random() >= sticky:
                action = int(rng.integers(NUM_ACTIONS))
            env.act(np.array([action]))
            _, obs, first = env.observe()
            if first[0]:  # the episode ended; this frame already belongs to the next one
                break
            actions.append(action)
            frames.append(np.array(obs["rgb"][0]))
    finally:
        env.close()
    return np.stack(frames), np.asarray(actions, dtype=np.int64)


def process_episodes(job: Job, writer: PartWriter) -> JobReport:
    """Play a chunk of episodes and write their clips to ``writer``. Top-level for pickling."""
    p = job.payload
    env_cls = load_procgen()
    split, clip_frames, size = p["split"], p["clip_frames"], p["size"]
    report = JobReport(job.job_id, ok=True)
    short = env_frames = 0
    for episode in range(p["first_episode"], p["end_episode"]):
        rng = episode_rng(p["seed"], split, episode)
        level = p["start_level"] + int(rng.integers(p["num_levels"]))
        env_seed = int(rng.integers(INT32_MAX))
        frames, actions = play_episode(
            env_cls,
            rng,
            level=level,
            env_seed=env_seed,
            sticky=p["sticky"],
            max_frames=p["max_episode_frames"],
            distribution_mode=p["distribution_mode"],
        )
        env_frames += len(frames)
        if len(frames) < clip_frames:
            short += 1
            continue
        if size != NATIVE_SIZE:
            frames = np.stack([resize_center_crop(f, size) for f in frames])
        video_id = f"coinrun-{split}-s{p['seed']}-e{episode:06d}"
        write_episode_clips(
            writer,
            report,
            frames,
            actions,
            clip_frames,
            video_id=video_id,
            fps=FPS,
            source=f"coinrun:{split}",
            encoding=p,
            extra={
                "episode": episode,
                "env_seed": env_seed,
                "level": level,
                "episode_frames": len(frames),
                "distribution_mode": p["distribution_mode"],
            },
        )
    episodes = p["end_episode"] - p["first_episode"]
    report.info.update(episodes=episodes, short_episodes=short, env_frames=env_frames)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Play Procgen CoinRun with a sticky-random policy and write 16-frame 64x64 clips with their "
        "true actions to DIR/train/train-*.tar and DIR/val/val-*.tar (disjoint levels). "
        "Deterministic: the same arguments give byte-identical shards for any --workers."
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    add("--episodes", type=int, default=1000, help="training episodes to play (default 1000)")
    add("--seed", type=int, default=0, help="seed of levels, env, policy and shard order (default 0)")
    add(
        "--sticky",
        type=float,
        default=0.5,
        help="probability of repeating the previous action each step (default 0.5): held actions give "
        "consistent, identifiable motion despite CoinRun's inertia and explore further, while every "
        "action stays uniformly used; 0 = uniform random",
    )
    add("--clip-frames", type=int, default=16, help="frames per clip (default 16, as in Genie)")
    add("--max-episode-frames", type=int, default=500, help="keep at most this many frames per episode (500)")
    add("--size", type=int, default=NATIVE_SIZE, help="square frame size (default 64, native)")
    add("--levels", type=int, default=10000, help="training levels [0, LEVELS) (default 10000)")
    add(
        "--val-start-level",
        type=int,
        default=1_000_000_000,
        help="first validation level (default 1e9: fixed, so the val set does not move with --levels)",
    )
    add("--val-levels", type=int, default=1000, help="number of validation levels (default 1000)")
    add("--val-episodes", type=int, default=None, help="val episodes (max(1, episodes // 10); 0: none)")
    add("--distribution-mode", choices=["easy", "hard"], default="hard", help="procgen difficulty (hard)")
    add_episode_output_arguments(add, episodes_per_job=8)


def check_args(args: argparse.Namespace) -> int:
    """Validate arguments; return the number of validation episodes."""
    val_episodes, problems = check_episode_arguments(args)
    if not 0 <= args.sticky < 1:
        problems.append("--sticky must be in [0, 1)")
    if args.clip_frames < 2:
        problems.append("--clip-frames must be >= 2 (a clip needs at least one transition)")
    if args.max_episode_frames < args.clip_frames:
        problems.append("--max-episode-frames must be >= --clip-frames")
    if args.size < 2:
        problems.append("--size must be >= 2")
    if args.lossy and args.size % 2:
        problems.append(f"--size {args.size} is odd; lossy H.264 (yuv420p) needs an even size")
    if args.levels < 1 or args.val_levels < 1:
        problems.append("--levels and --val-levels must be >= 1 (0, procgen's 'all levels', would overlap)")
    if args.val_start_level < args.levels:
        problems.append(f"--val-start-level {args.val_start_level} overlaps training levels [0, {args.levels})")
    if args.val_start_level + args.val_levels > INT32_MAX:
        problems.append(f"validation levels must stay below {INT32_MAX} (procgen level seeds are C ints)")
    if args.episodes_per_job < 1:
        problems.append("--episodes-per-job must be >= 1")
    if problems:
        raise PrepError("; ".join(problems))
    return val_episodes


def run(args: argparse.Namespace) -> dict:
    val_episodes = check_args(args)
    load_procgen()  # fail with one clear line before any work when procgen is missing
    common = {
        "seed": args.seed,
        "sticky": args.sticky,
        "clip_frames": args.clip_frames,
        "max_episode_frames": args.max_episode_frames,
        "size": args.size,
        "lossless": not args.lossy,
        "crf": args.crf,
        "gop": args.gop,
        "distribution_mode": args.distribution_mode,
    }
    splits = {
        "train": (args.episodes, 0, args.levels),
        "val": (val_episodes, args.val_start_level, args.val_levels),
    }
    results: dict[str, Any] = {}
    for split, (episodes, start_level, num_levels) in splits.items():
        if episodes == 0:
            continue
        out_dir = args.out / split
        levels = {"start_level": start_level, "num_levels": num_levels}
        jobs = episode_jobs(split, episodes, args.episodes_per_job, {**common, **levels})
        summary = run_prep(
            out_dir=out_dir,
            jobs=jobs,
            fn=process_episodes,
            settings={
                "source": "coinrun",
                "split": split,
                "episodes": episodes,
                "episodes_per_job": args.episodes_per_job,
                "procgen": procgen_version(),
                **common,
                **levels,
            },
            shard_size=args.shard_size,
            shuffle_seed=args.seed,
            workers=args.workers,
            prefix=split,
            desc=f"coinrun {split}",
            overwrite=args.overwrite,
            fail_fast=True,  # a generated source has no bad inputs: a failing job is a bug to surface
            extra_summary={
                "split": split,
                "episodes": episodes,
                "levels": [start_level, start_level + num_levels],
                **common,
            },
        )
        print_summary(summary, out_dir)
        kept = episodes - int(summary["totals"].get("short_episodes", 0))
        summary["episodes_with_clips"] = kept
        summary["clips_per_s"] = round(summary["clips"] / max(summary["seconds"], 1e-9), 1)
        print(
            f"  {split}: {episodes} episodes on levels [{start_level}, {start_level + num_levels}), "
            f"{episodes - kept} dropped as shorter than one clip ({args.clip_frames} frames); "
            f"{summary['clips_per_s']:.1f} clips/s"
        )
        results[split] = summary
    for split, summary in results.items():
        print(f"{split} shards: {args.out / split}/{split}-*.tar ({len(summary['shards'])} shards)")
    return results

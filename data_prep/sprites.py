"""``genie prep sprites --out DIR``: synthetic controllable sprite videos whose right answer is known.

A source for the *learning tests* and the quick CPU demo: the latent action model (LAM) can be
scored against the true actions (NMI), and the dynamics model's controllability (ΔtPSNR) checked,
on clips that tiny models learn in well under a minute of CPU training.

The scene (64x64 by default; every length below scales with ``--size``)::

    background   one random dark colour per episode (channels <= 100), optionally a static
                 block texture (``--texture``, +-amplitude per step-sized block)
    sprite       the *controlled* one: an 8x8 filled WHITE square (the only pure-white pixels in
                 any frame), drawn last so it is never hidden; moved by the action each step
    distractors  ``--distractors`` (default 2) hollow/diamond/plus shapes in distinct saturated
                 colours (never white, never a filled square), each with its own constant velocity,
                 bouncing off the walls: motion that no action explains

Actions (``--num-actions`` K, 2..8) are the first K of::

    0 up   1 down   2 left   3 right   4 stay   5 up-left   6 up-right   7 down-left

each moving the sprite by ``--step`` pixels (default 4 at 64 px) per axis. So K=4 is the four
directions and K=5 adds "stay". The playfield is a **torus**: the sprite wraps around at the
borders (it may be drawn split across two edges). Why wrap rather than clamp: clamping at a wall
turns a move into a no-move frame, so the same action would sometimes show and sometimes not,
and a LAM could not tell "left at the wall" from "stay". With wrap-around every action *always*
has exactly its displacement (mod the frame size), actions stay i.i.d. and uniform (no redraw
near walls), and the sprite's position stays uniform over the frame. Actions are drawn uniformly
each step; ``--sticky p`` repeats the previous action with probability p (marginals stay uniform).

Why this is learnable by tiny models: at 64 px the sprite is 2x2 tokenizer patches (patch 4) and
every object moves by exactly one patch (4 px) per step on a 4-px grid, so patch contents come from
a small set and each action is a one-patch shift of a unique, always-visible white square. The
distractors move at the same speed (so "where is motion" does not reveal the action; colour and
shape do), but deterministically: from two past frames their next position is predictable, so the
only thing a decoder that sees the past cannot predict is the controlled sprite's move, which is
exactly what the action has to carry. The background is static (plain by default), so nothing
else changes between frames.

Output::

    DIR/train/train-000000.tar ...   --episodes clips
    DIR/val/val-000000.tar ...       --val-episodes clips (new episodes: a disjoint seed stream)

One episode is one clip of ``--clip-frames`` frames (default 16) with ``actions.npy`` (int64
``[T-1]``, ``actions[t]`` moves frame ``t`` to ``t+1``), encoded lossless (libx264rgb) at 10 fps.
Each episode is seeded on its own from ``(--seed, split, episode index)``
(:func:`episode_rng`), so shards are byte-identical for the same arguments whatever ``--workers``
and ``--episodes-per-job`` are, and :func:`render_episode` reproduces any stored clip exactly. ``--seed``
also seeds the shard order, which mixes the episodes (:func:`data_prep.common.shard_order`).
"""

from __future__ import annotations

import argparse
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
    write_clip,
)

FPS = 10
MIN_SIZE = 16
MAX_NUM_ACTIONS = 8  # the LAM's default codebook has 8 latent actions: never more true ones than that
MAX_TEXTURE = 60  # background channels stay <= BG_MAX + 60 = 160, far from the sprite's white
RENDER_VERSION = 1  # bump when the picture changes, so old output folders are not silently mixed

# (name, (dy, dx)) in units of --step; K actions are the first K rows
ACTIONS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("up", (-1, 0)),
    ("down", (1, 0)),
    ("left", (0, -1)),
    ("right", (0, 1)),
    ("stay", (0, 0)),
    ("up-left", (-1, -1)),
    ("up-right", (-1, 1)),
    ("down-left", (1, -1)),
)

SPRITE_COLOR = (255, 255, 255)  # unique: every other colour has a channel <= 160
BG_MAX = 100  # background channels are drawn from [0, BG_MAX]
# saturated distractor colours; each has a channel <= 60 (never white) and one >= 200 (never background)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 40, 40),  # red
    (40, 210, 60),  # green
    (50, 90, 240),  # blue
    (220, 50, 220),  # magenta
    (40, 210, 220),  # cyan
    (245, 140, 20),  # orange
    (235, 220, 40),  # yellow
    (150, 60, 235),  # purple
)
SHAPES = ("ring", "diamond", "plus")  # never a filled square: that is the controlled sprite's shape
MAX_DISTRACTORS = len(PALETTE)  # one distinct colour each
# distractor directions: the 8 compass directions (never standing still), in units of --step
DIRECTIONS8 = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], dtype=np.int64)


def default_step(size: int) -> int:
    """Pixels per move: 4 at 64 px (one tokenizer patch), 2 at 32 px."""
    return max(1, size // 16)


def default_sprite_size(size: int) -> int:
    """Sprite side: 8 at 64 px (2x2 patches), 4 at 32 px; at least 4 so the shapes stay distinct."""
    return max(4, size // 8)


def action_names(num_actions: int) -> list[str]:
    return [name for name, _ in ACTIONS[:num_actions]]


def action_deltas(num_actions: int) -> np.ndarray:
    """int64 ``[K, 2]``: the (dy, dx) of each action, in units of the step."""
    return np.array([delta for _, delta in ACTIONS[:num_actions]], dtype=np.int64)


def shape_mask(shape: str, d: int) -> np.ndarray:
    """Boolean ``[d, d]`` mask of a distractor shape."""
    yy, xx = np.mgrid[0:d, 0:d]
    c = (d - 1) / 2
    if shape == "diamond":
        return np.abs(yy - c) + np.abs(xx - c) <= d / 2
    if shape == "ring":  # a hollow square: same outline as the sprite, told apart by its hole
        t = max(1, d // 4)
        return ~((yy >= t) & (yy < d - t) & (xx >= t) & (xx < d - t))
    if shape == "plus":
        t = max(1, d // 2)
        lo = (d - t) // 2
        return ((yy >= lo) & (yy < lo + t)) | ((xx >= lo) & (xx < lo + t))
    raise ValueError(f"unknown shape {shape!r}")


def check_scene(size: int, num_actions: int, distractors: int, step: int, sprite_size: int) -> list[str]:
    """Problems with a scene's parameters, as messages (empty when fine)."""
    problems = []
    if size < MIN_SIZE:
        problems.append(f"--size must be >= {MIN_SIZE} (got {size}): smaller frames leave no room to move")
    if not 2 <= num_actions <= MAX_NUM_ACTIONS:
        problems.append(f"--num-actions must be in 2..{MAX_NUM_ACTIONS} (got {num_actions})")
    if not 0 <= distractors <= MAX_DISTRACTORS:
        problems.append(f"--distractors must be in 0..{MAX_DISTRACTORS} (got {distractors})")
    if size >= MIN_SIZE:
        # step < size / 2 keeps opposite moves distinct on the torus; <= size / 4 keeps bounces sane
        if not 1 <= step <= size // 4:
            problems.append(f"--step must be in 1..{size // 4} at --size {size} (got {step})")
        if not 4 <= sprite_size <= size // 4:
            problems.append(f"--sprite-size must be in 4..{size // 4} at --size {size} (got {sprite_size})")
    return problems


def _bounce(pos: np.ndarray, vel: np.ndarray, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """One step of motion in ``[0, hi]`` per axis, reflecting off the walls (arrays ``[n, 2]``)."""
    new = pos + vel
    vel = vel.copy()
    low, high = new < 0, new > hi
    new = np.where(low, -new, np.where(high, 2 * hi - new, new))
    vel[low | high] *= -1
    return new, vel


MAX_BACKGROUNDS = 16


def background_palette(n: int) -> np.ndarray:
    """The first ``n`` of a fixed list of dark background colours, int64 ``[n, 3]`` (channels <= BG_MAX)."""
    return np.random.default_rng(20240226).integers(0, BG_MAX + 1, size=(MAX_BACKGROUNDS, 3))[:n]


def render_episode(
    rng: np.random.Generator,
    num_frames: int,
    size: int = 64,
    num_actions: int = 4,
    distractors: int = 2,
    *,
    step: int | None = None,
    sprite_size: int | None = None,
    sticky: float = 0.0,
    texture: int = 0,
    backgrounds: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one episode: random scene, random actions, the frames they produce.

    Args:
        rng: decides everything random (scene, start positions, velocities, actions).
        num_frames: T, frames to render (>= 2).
        size: square frame side in pixels.
        num_actions: K; the actions are the first K of :data:`ACTIONS`.
        distractors: number of bouncing distractor shapes.
        step: pixels per move (default :func:`default_step`).
        sprite_size: side of the sprite and distractors (default :func:`default_sprite_size`).
        sticky: probability of repeating the previous action instead of drawing a new one.
        texture: amplitude of the static block texture on the background (0: plain).
        backgrounds: draw the background colour from this many fixed colours (:func:`background_palette`)
            instead of any dark colour (0). A small palette gives a tokenizer few colours to represent.

    Returns:
        ``(frames uint8 [T, size, size, 3], actions int64 [T-1], info)`` where ``actions[t]`` moves
        frame ``t`` to ``t+1``, and ``info`` holds the scene: ``sprite_positions`` int64 ``[T, 2]`` and
        ``distractor_positions`` int64 ``[T, n, 2]`` (top-left ``(row, col)`` of each object), plus the
        JSON-ready fields stored in the clip metadata (``num_actions``, ``action_names``, ``step``,
        ``sprite_size``, ``sprite_start``, ``background``, ``distractors``, ...).
    """
    step = default_step(size) if step is None else step
    d = default_sprite_size(size) if sprite_size is None else sprite_size
    problems = check_scene(size, num_actions, distractors, step, d)
    if num_frames < 2:
        problems.append(f"num_frames must be >= 2 (got {num_frames})")
    if not 0 <= sticky < 1:
        problems.append(f"sticky must be in [0, 1) (got {sticky})")
    if not 0 <= texture <= MAX_TEXTURE:
        problems.append(f"texture must be in 0..{MAX_TEXTURE} (got {texture})")
    if not 0 <= backgrounds <= MAX_BACKGROUNDS:
        problems.append(f"backgrounds must be in 0..{MAX_BACKGROUNDS} (got {backgrounds})")
    if problems:
        raise ValueError("; ".join(problems))

    # --- the scene (all random draws happen here, in a fixed order) ---
    if backgrounds:
        bg_color = background_palette(backgrounds)[rng.integers(0, backgrounds)]
    else:
        bg_color = rng.integers(0, BG_MAX + 1, size=3)
    background = np.broadcast_to(bg_color, (size, size, 3)).astype(np.int64)
    if texture:
        # static blocks of one step each: texture at the motion's own scale, identical in every frame
        blocks = -(-size // step)
        noise = rng.integers(-texture, texture + 1, size=(blocks, blocks, 1))
        background = background + np.repeat(np.repeat(noise, step, 0), step, 1)[:size, :size]
    background = np.clip(background, 0, 255).astype(np.uint8)

    cells = -(-size // step)  # grid positions per axis on the torus
    sprite_start = step * rng.integers(0, cells, size=2)
    hi = size - d  # distractors keep fully inside the frame: top-left in [0, hi]
    colors = rng.choice(len(PALETTE), size=distractors, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=distractors)
    d_start = step * rng.integers(0, hi // step + 1, size=(distractors, 2))
    d_vel = step * DIRECTIONS8[rng.integers(0, len(DIRECTIONS8), size=distractors)]

    # i.i.d. uniform actions, or sticky: keep the previous one with probability `sticky`
    fresh = rng.integers(0, num_actions, size=num_frames - 1)
    keep = rng.random(num_frames - 1) < sticky
    actions = fresh.copy()
    for t in range(1, num_frames - 1):
        if keep[t]:
            actions[t] = actions[t - 1]

    # --- the motion ---
    deltas = step * action_deltas(num_actions)
    sprite_pos = np.empty((num_frames, 2), dtype=np.int64)
    sprite_pos[0] = sprite_start
    sprite_pos[1:] = (sprite_start + np.cumsum(deltas[actions], axis=0)) % size
    d_pos = np.empty((num_frames, distractors, 2), dtype=np.int64)
    d_pos[0], vel = d_start, d_vel
    for t in range(1, num_frames):
        d_pos[t], vel = _bounce(d_pos[t - 1], vel, hi)

    # --- the pictures ---
    masks = [shape_mask(SHAPES[s], d) for s in shapes]
    offsets = np.arange(d)
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        frame = frames[t]
        for i in range(distractors):
            y, x = d_pos[t, i]
            frame[y : y + d, x : x + d][masks[i]] = PALETTE[colors[i]]
        # the controlled sprite last, so it is always fully visible; indices wrap around the torus
        rows, cols = (sprite_pos[t, 0] + offsets) % size, (sprite_pos[t, 1] + offsets) % size
        frame[rows[:, None], cols[None, :]] = SPRITE_COLOR

    info: dict[str, Any] = {
        "num_actions": num_actions,
        "action_names": action_names(num_actions),
        "step": step,
        "sprite_size": d,
        "sprite_color": list(SPRITE_COLOR),
        "sprite_start": [int(v) for v in sprite_start],
        "wrap": True,
        "sticky": sticky,
        "texture": texture,
        "backgrounds": backgrounds,
        "background": [int(v) for v in bg_color],
        "distractors": [
            {
                "shape": SHAPES[shapes[i]],
                "color": list(PALETTE[colors[i]]),
                "start": [int(v) for v in d_start[i]],
                "velocity": [int(v) for v in d_vel[i]],
            }
            for i in range(distractors)
        ],
        "sprite_positions": sprite_pos,
        "distractor_positions": d_pos,
    }
    return frames, actions.astype(np.int64), info


def process_episodes(job: Job, writer: PartWriter) -> JobReport:
    """Render a chunk of episodes (one clip each) and write them to ``writer``. Top-level for pickling."""
    p = job.payload
    split, clip_frames, size = p["split"], p["clip_frames"], p["size"]
    report = JobReport(job.job_id, ok=True)
    for episode in range(p["first_episode"], p["end_episode"]):
        frames, actions, info = render_episode(
            episode_rng(p["seed"], split, episode),
            clip_frames,
            size,
            p["num_actions"],
            p["distractors"],
            step=p["step"],
            sprite_size=p["sprite_size"],
            sticky=p["sticky"],
            texture=p["texture"],
            backgrounds=p["backgrounds"],
        )
        video_id = f"sprites-{split}-s{p['seed']}-e{episode:06d}"
        # per-frame positions are recomputable from the seed; the metadata keeps the JSON-sized scene
        extra = {k: v for k, v in info.items() if not isinstance(v, np.ndarray)}
        write_clip(
            writer,
            report,
            frames,
            actions,
            video_id=video_id,
            clip_index=0,
            start_frame=0,
            fps=FPS,
            source=f"sprites:{split}",
            encoding=p,
            extra={"episode": episode, "seed": p["seed"], "split": split, **extra},
        )
    report.info.update(episodes=p["end_episode"] - p["first_episode"])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render synthetic controllable videos: a white sprite moved by K known actions (wrapping around "
        "the borders) among bouncing distractor shapes no action explains; one clip per episode with its "
        "true actions, to DIR/train/train-*.tar and DIR/val/val-*.tar. Actions: the first K of "
        + ", ".join(f"{i} {name}" for i, (name, _) in enumerate(ACTIONS))
        + ". Deterministic: the same arguments give byte-identical shards for any --workers."
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    add("--episodes", type=int, default=1000, help="training episodes = clips (default 1000)")
    add("--val-episodes", type=int, default=None, help="val episodes (max(1, episodes // 10); 0: none)")
    add("--seed", type=int, default=0, help="seed of everything random (default 0)")
    add("--num-actions", type=int, default=4, help="K true actions, 2..8 (default 4: up/down/left/right; 5 adds stay)")
    add("--distractors", type=int, default=2, help=f"bouncing distractor shapes, 0..{MAX_DISTRACTORS} (default 2)")
    add("--sticky", type=float, default=0.0, help="probability of repeating the previous action (default 0: i.i.d.)")
    add("--clip-frames", type=int, default=16, help="frames per clip = per episode (default 16)")
    add("--size", type=int, default=64, help=f"square frame size, >= {MIN_SIZE} (default 64)")
    add("--step", type=int, default=None, help="pixels per move (default size // 16: 4 at 64 px)")
    add("--sprite-size", type=int, default=None, help="sprite/distractor side (default max(4, size // 8))")
    add("--texture", type=int, default=0, help=f"static background texture amplitude, 0..{MAX_TEXTURE} (0: plain)")
    add(
        "--backgrounds",
        type=int,
        default=0,
        help=f"background colours from a fixed list of 1..{MAX_BACKGROUNDS} (0: any)",
    )
    add_episode_output_arguments(add, episodes_per_job=64)


def check_args(args: argparse.Namespace) -> tuple[int, int, int]:
    """Validate arguments; return ``(val_episodes, step, sprite_size)`` with defaults resolved."""
    val_episodes, problems = check_episode_arguments(args)
    step = default_step(args.size) if args.step is None else args.step
    sprite_size = default_sprite_size(args.size) if args.sprite_size is None else args.sprite_size
    problems += check_scene(args.size, args.num_actions, args.distractors, step, sprite_size)
    if not 0 <= args.sticky < 1:
        problems.append("--sticky must be in [0, 1)")
    if args.clip_frames < 2:
        problems.append("--clip-frames must be >= 2 (a clip needs at least one transition)")
    if not 0 <= args.texture <= MAX_TEXTURE:
        problems.append(f"--texture must be in 0..{MAX_TEXTURE}")
    if not 0 <= args.backgrounds <= MAX_BACKGROUNDS:
        problems.append(f"--backgrounds must be in 0..{MAX_BACKGROUNDS}")
    if args.lossy and args.size % 2:
        problems.append(f"--size {args.size} is odd; lossy H.264 (yuv420p) needs an even size")
    if args.episodes_per_job < 1:
        problems.append("--episodes-per-job must be >= 1")
    if problems:
        raise PrepError("; ".join(problems))
    return val_episodes, step, sprite_size


def run(args: argparse.Namespace) -> dict:
    val_episodes, step, sprite_size = check_args(args)
    common = {
        "seed": args.seed,
        "num_actions": args.num_actions,
        "distractors": args.distractors,
        "sticky": args.sticky,
        "clip_frames": args.clip_frames,
        "size": args.size,
        "step": step,
        "sprite_size": sprite_size,
        "texture": args.texture,
        "backgrounds": args.backgrounds,
        "lossless": not args.lossy,
        "crf": args.crf,
        "gop": args.gop,
    }
    results: dict[str, Any] = {}
    for split, episodes in {"train": args.episodes, "val": val_episodes}.items():
        if episodes == 0:
            continue
        out_dir = args.out / split
        summary = run_prep(
            out_dir=out_dir,
            jobs=episode_jobs(split, episodes, args.episodes_per_job, common),
            fn=process_episodes,
            settings={
                "source": "sprites",
                "render_version": RENDER_VERSION,
                "split": split,
                "episodes": episodes,
                "episodes_per_job": args.episodes_per_job,
                **common,
            },
            shard_size=args.shard_size,
            shuffle_seed=args.seed,
            workers=args.workers,
            prefix=split,
            desc=f"sprites {split}",
            overwrite=args.overwrite,
            fail_fast=True,  # a generated source has no bad inputs: a failing job is a bug to surface
            extra_summary={
                "split": split,
                "episodes": episodes,
                "action_names": action_names(args.num_actions),
                **common,
            },
        )
        print_summary(summary, out_dir)
        summary["clips_per_s"] = round(summary["clips"] / max(summary["seconds"], 1e-9), 1)
        print(f"  {split}: {episodes} episodes, {summary['clips_per_s']:.1f} clips/s")
        results[split] = summary
    for split, summary in results.items():
        print(f"{split} shards: {args.out / split}/{split}-*.tar ({len(summary['shards'])} shards)")
    return results

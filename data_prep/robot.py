"""``genie prep robot --out DIR``: simulated robot-arm episodes with real continuous actions -> clip shards.

The simulator is Meta-World (``metaworld==3.1.1`` on MuJoCo 3.3): a Sawyer arm on a table with
50 manipulation tasks, each with a scripted expert policy (``metaworld.policies``). Rendering
is offscreen on the CPU (Mesa's llvmpipe through EGL by default, ``MUJOCO_GL=osmesa`` also
works where Debian's ``libosmesa6`` is installed). Every clip carries the actions that produced
it (``actions.npy``, float32 ``[T-1, 4]``: the end effector's x, y, z displacement and the
gripper effort, each in [-1, 1]), so an action adapter can learn to drive a world with them.

Output::

    DIR/train/train-000000.tar ...   --episodes episodes
    DIR/val/val-000000.tar ...       --val-episodes episodes (other object and goal positions)

Each split is its own resumable :func:`data_prep.common.run_prep` run (``summary.json`` and
``prep_settings.json`` beside its shards).

Tasks: episode ``i`` plays task ``i mod len(--task)`` (round robin, so every task gets the same
share and more episodes extend the same ones). The default is Meta-World's MT10 set.

Policy: the task's scripted expert plus Gaussian noise, ``a = clip(expert(obs) + N(0, s^2), -1, 1)``
with ``s = --action-noise`` (0.1 by default), applied for ``--action-repeat`` simulator steps.
Why noise: the expert is a deterministic function of the state, so without noise the action
is predictable from the frames alone and every episode of a task looks alike; noise makes
the actions vary independently of the state (the stored action is the executed, noisy one),
which is what a model that must *follow* actions needs to see. Measured on 60 MT10 episodes
(``--action-repeat 2``): s = 0.1 keeps every episode successful, s = 0.3 fails 1 in 60. The
experts' commands often saturate at +-1; with s = 0.1 about a third of the action components
still sit at the bound after clipping (measured on 1710 MT10 transitions: std 0.57-0.67 per
dimension, no two actions alike). Why repeat 2: one Meta-World step (12.5 ms, at most 1 cm
of hand motion) moves the arm about a pixel at 64 px; two make the motion per transition
visible, double the task progress per rendered frame (MT10 median: 38 frames to success
instead of 76) and make the experts *more* reliable (60/60 against 58/60 at repeat 1).
Stored fps = 80 / repeat (Meta-World simulates at 80 steps per second).

Episodes: from a seeded reset (object and goal positions drawn by the environment's own RNG)
the policy runs until the task succeeds, then on until the frame count is a multiple of
``--clip-frames`` (so no frame is wasted and clips do not end on a half-finished motion), or
until ``--max-episode-frames``. They are cut into consecutive clips; ``actions[t]`` is the
action between frame ``t`` and ``t + 1`` of a clip (the action between two clips is dropped).

Rendering: each frame is rendered at twice ``--size`` without multisampling and box-filtered
down (the same 4 samples per pixel as MuJoCo's default 4x MSAA, measured 2.2x faster here),
with shadows and reflections off (shadows alone cost ~8x). Meta-World's cameras come out
upside down and are flipped back (checked against a pinhole projection of the arm's base).

One quirk is Meta-World's own: in peg-insert-side the box flickers between red and orange from
frame to frame (also with MuJoCo's default render settings; likely coincident faces in its model).

Determinism: every episode is seeded on its own from ``(--seed, split, episode index)``: the
environment's reset and the noise. One environment per task is kept per process (up to 10, ~95 MB
each) and re-seeded for each episode (MuJoCo resets its whole state), so the shards are
byte-identical for the same arguments whatever ``--workers`` and ``--episodes-per-job`` are. ``--seed``
also seeds the shard order, which mixes the episodes' clips (:func:`data_prep.common.shard_order`).
Frames are encoded lossless by default (frame-exact, like CoinRun), ``--lossy`` for H.264 yuv420p.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections import OrderedDict
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

# Meta-World's MT10 benchmark tasks: ten different skills that all have scripted experts
MT10 = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
ACTION_NAMES = ("dx", "dy", "dz", "gripper")  # Meta-World's action: hand displacement + gripper effort
ACTION_DIM = len(ACTION_NAMES)
SIM_FPS = 80  # Meta-World: frame_skip 5 x timestep 2.5 ms
SUPERSAMPLE = 2  # render at 2x and box-filter down: 4 samples per pixel
DEFAULT_CAMERA = "corner4"  # a three-quarter view where the arm and the objects are large at 64 px
MAX_CACHED_ENVS = 10  # environments kept per process, one per task: ~95 MB each (model, data, renderer)
INT32_MAX = 2**31 - 1
_APT = "apt-get install -y libegl1 libegl-mesa0 libopengl0 libgl1-mesa-dri"
METAWORLD_MISSING = "the robot source needs Meta-World (pip install 'genie[robot]': metaworld==3.1.1, mujoco 3.3)"
GL_HELP = f"for EGL: {_APT} and MUJOCO_GL=egl (the default); or apt-get install -y libosmesa6 and MUJOCO_GL=osmesa"


def load_metaworld() -> tuple[Any, dict[str, Any]]:
    """Import Meta-World lazily; return ``(metaworld module, ENV_POLICY_MAP)`` or raise :class:`PrepError`.

    MuJoCo picks its OpenGL backend from ``MUJOCO_GL`` when it is first imported, so the default
    (EGL: headless, no X server) is set before that; a user's own setting is kept. Mesa's
    llvmpipe is told to use one thread: each prep worker is one process, and at these sizes its
    threads gain under 5%.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("LP_NUM_THREADS", "1")
    try:
        import metaworld
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        if (e.name or "").split(".")[0] in {"metaworld", "mujoco", "gymnasium"}:
            raise PrepError(METAWORLD_MISSING) from e
        raise PrepError(
            f"MuJoCo cannot load its OpenGL backend (MUJOCO_GL={os.environ['MUJOCO_GL']}): {e}; {GL_HELP}"
        ) from e
    except Exception as e:  # a broken GL backend fails inside mujoco's import with all sorts of errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepError(
            f"MuJoCo cannot load its OpenGL backend (MUJOCO_GL={os.environ['MUJOCO_GL']}): {msg}; {GL_HELP}"
        ) from e
    return metaworld, ENV_POLICY_MAP


def versions() -> dict[str, str]:
    """Simulator versions (part of the prep settings: another build may render differently)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("metaworld", "mujoco"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def available_tasks() -> list[str]:
    """Meta-World tasks that have a scripted expert."""
    metaworld, policies = load_metaworld()
    return sorted(set(metaworld.ALL_V3_ENVIRONMENTS) & set(policies))


class RobotSim:
    """One Meta-World task: its environment, its expert and an offscreen renderer.

    ``reset(env_seed)`` draws the object and goal positions from the environment's own RNG seeded
    with ``env_seed`` (Meta-World's "goal observable" setup, which the experts need).
    """

    def __init__(self, task: str, size: int, camera: str, max_steps: int):
        import mujoco

        metaworld, policies = load_metaworld()
        self.task, self.size, self.camera = task, size, camera
        env = metaworld.ALL_V3_ENVIRONMENTS[task]()
        env._partially_observable = False  # the experts read the goal from the observation
        env.__dict__.pop("sawyer_observation_space", None)  # a cached property that depends on the line above
        env._freeze_rand_vec = False  # draw new object/goal positions at every reset ...
        env.seeded_rand_vec = True  # ... from env.np_random, which env.seed() seeds
        env._set_task_called = True
        env.max_path_length = max_steps + 1  # Meta-World refuses to step past it (default 500)
        self.env = env
        self.policy = policies[task]()
        model = env.model
        cameras = [model.camera(i).name for i in range(model.ncam)]
        if camera not in cameras:
            raise ValueError(f"task {task} has no camera {camera!r}; its cameras: {', '.join(cameras)}")
        render = size * SUPERSAMPLE
        model.vis.quality.offsamples = 0  # no MSAA: supersampling instead (see module docstring)
        model.vis.quality.shadowsize = 0  # no shadow map: shadows are off, and its 4096^2 buffer costs ~65 MB
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, render)
        model.vis.global_.offheight = max(model.vis.global_.offheight, render)
        self.renderer = mujoco.Renderer(model, render, render)
        flags = self.renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False

    def reset(self, env_seed: int) -> np.ndarray:
        self.env.seed(env_seed)
        obs, _ = self.env.reset()
        return obs

    def step(self, action: np.ndarray, repeat: int) -> tuple[np.ndarray, bool]:
        success = False
        for _ in range(repeat):
            obs, _, _, _, info = self.env.step(action)
            success = success or bool(info["success"])
        return obs, success

    def render(self) -> np.ndarray:
        """The current frame, uint8 ``[size, size, 3]``, upright."""
        self.renderer.update_scene(self.env.data, camera=self.camera)
        frame = self.renderer.render()[::-1]  # Meta-World's cameras render upside down
        return resize_center_crop(np.ascontiguousarray(frame), self.size)

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


# one environment per (task, size, camera, max_steps) per process, reused across episodes and jobs: making one
# (model, GL context) costs ~0.3 s, as much as a short episode. At most MAX_CACHED_ENVS (the MT10 set fits; with
# more tasks the least recently used is rebuilt when needed: slower, never different)
_SIMS: OrderedDict[tuple, RobotSim] = OrderedDict()


def get_sim(task: str, size: int, camera: str, max_steps: int) -> RobotSim:
    key = (task, size, camera, max_steps)
    if key in _SIMS:
        _SIMS.move_to_end(key)
        return _SIMS[key]
    while len(_SIMS) >= MAX_CACHED_ENVS:
        _SIMS.popitem(last=False)[1].close()
    _SIMS[key] = sim = RobotSim(task, size, camera, max_steps)
    return sim


def close_sims() -> None:
    """Free the cached environments (their GL contexts would otherwise be freed noisily at exit)."""
    while _SIMS:
        _SIMS.popitem()[1].close()


def play_episode(
    sim: RobotSim,
    rng: np.random.Generator,
    *,
    env_seed: int,
    noise: float,
    repeat: int,
    clip_frames: int,
    max_frames: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the noisy expert from a seeded reset.

    Returns:
        ``(frames uint8 [L, size, size, 3], actions float32 [L - 1, 4], success_frame)`` where
        ``actions[t]`` was applied between frame ``t`` and ``t + 1``, ``L`` is a multiple of
        ``clip_frames`` (or ``max_frames``), and ``success_frame`` is the first frame showing the task
        done (-1: never within ``max_frames``).
    """
    obs = sim.reset(env_seed)
    first = sim.render()
    if not first.any():
        raise RuntimeError(
            f"rendered an all-black frame (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): the OpenGL backend is not working"
        )
    frames, actions = [first], []
    success_frame = -1
    while len(frames) < max_frames and not (success_frame >= 0 and len(frames) % clip_frames == 0):
        expert = np.asarray(sim.policy.get_action(obs), dtype=np.float64)
        action = np.clip(expert + rng.normal(0.0, noise, ACTION_DIM), -1.0, 1.0).astype(np.float32)
        obs, success = sim.step(action, repeat)
        actions.append(action)
        frames.append(sim.render())
        if success and success_frame < 0:
            success_frame = len(frames) - 1
    return np.stack(frames), np.stack(actions), success_frame


def process_episodes(job: Job, writer: PartWriter) -> JobReport:
    """Play a chunk of episodes and write their clips to ``writer``. Top-level for pickling."""
    p = job.payload
    split, clip_frames, size, tasks = p["split"], p["clip_frames"], p["size"], p["tasks"]
    fps = SIM_FPS / p["action_repeat"]
    report = JobReport(job.job_id, ok=True)
    successes = sim_frames = 0
    with warnings.catch_warnings():
        # the experts warn that their gains exceed the action box on every call; the env clips anyway
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        for episode in range(p["first_episode"], p["end_episode"]):
            task = tasks[episode % len(tasks)]
            rng = episode_rng(p["seed"], split, episode)
            env_seed = int(rng.integers(INT32_MAX))
            sim = get_sim(task, size, p["camera"], p["max_episode_frames"] * p["action_repeat"])
            frames, actions, success_frame = play_episode(
                sim,
                rng,
                env_seed=env_seed,
                noise=p["action_noise"],
                repeat=p["action_repeat"],
                clip_frames=clip_frames,
                max_frames=p["max_episode_frames"],
            )
            sim_frames += len(frames)
            successes += success_frame >= 0
            video_id = f"robot-{split}-s{p['seed']}-e{episode:06d}"
            write_episode_clips(
                writer,
                report,
                frames,
                actions,
                clip_frames,
                video_id=video_id,
                fps=fps,
                source=f"metaworld:{task}",
                encoding=p,
                extra={
                    "task": task,
                    "episode": episode,
                    "split": split,
                    "episode_frames": len(frames),
                    "env_seed": env_seed,
                    "success_frame": success_frame,
                    "action_dim": ACTION_DIM,
                    "action_names": list(ACTION_NAMES),
                    "action_noise": p["action_noise"],
                    "action_repeat": p["action_repeat"],
                    "camera": p["camera"],
                },
            )
    episodes = p["end_episode"] - p["first_episode"]
    report.info.update(episodes=episodes, successful_episodes=successes, sim_frames=sim_frames)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Simulate a robot arm (Meta-World, MuJoCo rendered on the CPU) driven by each task's scripted expert "
        "plus action noise, and write clips with their real continuous actions (float32 [T-1, 4]: hand dx, dy, "
        "dz, gripper) to DIR/train/train-*.tar and DIR/val/val-*.tar. Deterministic: the same arguments give "
        "byte-identical shards for any --workers."
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    add(
        "--task",
        nargs="+",
        default=list(MT10),
        metavar="TASK",
        help="Meta-World tasks, played round robin (default: the MT10 set; 'all': every task with an expert)",
    )
    add("--episodes", type=int, default=500, help="training episodes (default 500)")
    add("--val-episodes", type=int, default=None, help="val episodes (max(1, episodes // 10); 0: none)")
    add("--seed", type=int, default=0, help="seed of object/goal positions, action noise and shard order (default 0)")
    add("--size", type=int, default=64, help="square frame size (default 64)")
    add("--clip-frames", type=int, default=16, help="frames per clip (default 16)")
    add("--max-episode-frames", type=int, default=160, help="frames per episode at most (default 160)")
    add("--camera", default=DEFAULT_CAMERA, help=f"Meta-World camera (default {DEFAULT_CAMERA}; also corner..corner3)")
    add(
        "--action-noise",
        type=float,
        default=0.1,
        help="std of the Gaussian noise added to the expert's action, before clipping to [-1, 1] (default 0.1): "
        "actions that vary independently of the state, while the experts still succeed",
    )
    add(
        "--action-repeat",
        type=int,
        default=2,
        help="simulator steps per frame, each action held that long (default 2: 40 fps, visible motion per frame)",
    )
    add_episode_output_arguments(add, episodes_per_job=4)


def check_args(args: argparse.Namespace) -> int:
    """Validate the arguments that need no simulator; return the number of validation episodes."""
    val_episodes, problems = check_episode_arguments(args)
    if args.clip_frames < 2:
        problems.append("--clip-frames must be >= 2 (a clip needs at least one transition)")
    if args.max_episode_frames < args.clip_frames:
        problems.append("--max-episode-frames must be >= --clip-frames")
    if not 8 <= args.size <= 1024:
        problems.append("--size must be in 8..1024")
    if args.lossy and args.size % 2:
        problems.append(f"--size {args.size} is odd; lossy H.264 (yuv420p) needs an even size")
    if not 0 <= args.action_noise <= 2:
        problems.append("--action-noise must be in [0, 2]")
    if args.action_repeat < 1:
        problems.append("--action-repeat must be >= 1")
    if args.episodes_per_job < 1:
        problems.append("--episodes-per-job must be >= 1")
    if problems:
        raise PrepError("; ".join(problems))
    return val_episodes


def resolve_tasks(requested: list[str]) -> list[str]:
    known = available_tasks()
    if requested == ["all"]:
        return known
    unknown = [t for t in requested if t not in known]
    if unknown:
        raise PrepError(
            f"unknown Meta-World task(s) {', '.join(unknown)}; {len(known)} tasks have an expert, e.g. "
            f"{', '.join(MT10[:5])} (the default is the MT10 set; --task all: every one)"
        )
    if len(set(requested)) != len(requested):
        raise PrepError("--task lists a task twice")
    return list(requested)


def _drop_quietly(error: BaseException) -> None:
    """Free the half-built GL objects a failed renderer left in ``error``'s frames now, muting their destructors
    (mujoco's raise AttributeError on half-built objects, which Python would print at exit after our one line)."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


def probe(task: str, size: int, camera: str) -> None:
    """Render one frame in this process, so a missing GL library is one clear line before any work."""
    try:
        sim = RobotSim(task, size, camera, max_steps=1)
    except ValueError as e:  # an unknown camera
        raise PrepError(str(e)) from e
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        _drop_quietly(e)
        raise PrepError(f"MuJoCo cannot render (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {msg}; {GL_HELP}") from None
    try:
        sim.reset(0)
        if not sim.render().any():
            raise PrepError(f"MuJoCo renders black frames (MUJOCO_GL={os.environ.get('MUJOCO_GL')}); {GL_HELP}")
    finally:
        sim.close()


def run(args: argparse.Namespace) -> dict:
    val_episodes = check_args(args)
    tasks = resolve_tasks(args.task)  # also fails with one line when Meta-World is missing
    probe(tasks[0], args.size, args.camera)
    common = {
        "seed": args.seed,
        "tasks": tasks,
        "clip_frames": args.clip_frames,
        "max_episode_frames": args.max_episode_frames,
        "size": args.size,
        "camera": args.camera,
        "action_noise": args.action_noise,
        "action_repeat": args.action_repeat,
        "lossless": not args.lossy,
        "crf": args.crf,
        "gop": args.gop,
    }
    results: dict[str, Any] = {}
    try:
        for split, episodes in {"train": args.episodes, "val": val_episodes}.items():
            if episodes == 0:
                continue
            out_dir = args.out / split
            summary = run_prep(
                out_dir=out_dir,
                jobs=episode_jobs(split, episodes, args.episodes_per_job, common),
                fn=process_episodes,
                settings={
                    "source": "robot",
                    "simulator": "metaworld",
                    **versions(),
                    "split": split,
                    "episodes": episodes,
                    "episodes_per_job": args.episodes_per_job,
                    **common,
                },
                shard_size=args.shard_size,
                shuffle_seed=args.seed,
                workers=args.workers,
                prefix=split,
                desc=f"robot {split}",
                overwrite=args.overwrite,
                fail_fast=True,  # a generated source has no bad inputs: a failing job is a bug to surface
                extra_summary={
                    "split": split,
                    "episodes": episodes,
                    "action_dim": ACTION_DIM,
                    "action_names": list(ACTION_NAMES),
                    "fps": SIM_FPS / args.action_repeat,
                    **common,
                },
            )
            print_summary(summary, out_dir)
            totals = summary["totals"]
            summary["success_rate"] = round(totals.get("successful_episodes", 0) / episodes, 3)
            summary["frames_per_s"] = round(totals.get("sim_frames", 0) / max(summary["seconds"], 1e-9), 1)
            print(
                f"  {split}: {episodes} episodes over {len(tasks)} task(s), {summary['success_rate']:.0%} reached "
                f"success; {summary['frames_per_s']:.1f} frames/s simulated, rendered and encoded"
            )
            results[split] = summary
    finally:
        close_sims()  # in-process runs (--workers 0) keep environments in this process
    for split, summary in results.items():
        print(f"{split} shards: {args.out / split}/{split}-*.tar ({len(summary['shards'])} shards)")
    return results

"""``genie prep coinrun --out DIR``: Procgen CoinRun episodes under random policies -> clip shards.

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

Policies (``--policy`` for the training split, ``--val-policy`` for validation; both part of the prep
settings, so a cached folder made with another policy is refused unless ``--overwrite``):

- ``sticky`` (training default): *sticky-random*. The first action is uniform over the 15 actions; at each
  later step the previous action is repeated with probability ``--sticky`` (default 0.5), otherwise a new
  one is drawn uniformly. Why not plain uniform-random: CoinRun's character has inertia, so an action held
  for a single frame barely shows; repeating actions gives stretches of consistent, visible motion, which
  is what makes actions identifiable from frames (the LAM's job), and it explores further into a level.
  Measured earlier on 300 hard-mode episodes (capped at 1000 steps): sticky 0.0 completes 20% of levels
  with 5% of transitions static (frame unchanged); 0.5 completes 29% with 11% static; 0.75 completes 31%
  but 21% static (held no-op actions: NOOP and the 6 extra buttons do nothing in CoinRun, DOWN nearly
  nothing; see :data:`EFFECTIVE_ACTIONS`). 0.5 is the knee: most of the exploration gain, every action still
  used uniformly, and consecutive actions only moderately correlated.
- ``explore``: sticky the same way, but each new action is drawn with weights :data:`EXPLORE_WEIGHTS`
  (RIGHT 6, RIGHT+UP 6, UP 3, each of the other 12 actions 1: 22/22/11 % and 3.7 % each), so the agent
  runs right and jumps through the level while the LAM still sees every action, LEFT ones included.
  Weights 4/4/2 measured between the two (9.4 mean change, 5.7 % static, progress 6.5 tiles in 100
  frames); sticky 0.75 with 6/6/3 moved less (8.5, 9.4 % static).
- ``uniform`` (validation default): i.i.d. uniform over the 15 actions (sticky 0). Validation defaults to
  it whatever ``--policy`` is, so the held-out set stays comparable to GenieRedux's and Jafar's CoinRun
  evaluation (uniform random policy, hard levels) and one val set scores worlds trained on any policy.
  Defaulting to the training policy would have kept old val sets, but it ties the yardstick to the data
  being compared. Folders prepared before the policies existed (val played sticky-random; no ``policy``
  in their settings) are refused once: pass ``--overwrite`` or another ``--out``. ``--policy sticky``
  plays exactly the episodes it played before (same levels, actions and frames); each clip's metadata
  now also names its ``policy``.

Measured with :func:`measure_policy` (100 training-split episodes of hard levels, seed 0, one core;
``python -c "from data_prep.coinrun import Policy, measure_policy as m; print(m(Policy.make('explore',
0.5), episodes=100, max_frames=100))"``); change = mean |x_{t+1} - x_t| over pixels (0..255), static =
share of transitions with an unchanged frame, progress = tiles right of the start at the furthest point,
mean over episodes (from procgen's state), ended = episodes over (coin or death) before the cap:

=========  ============================  ======  ======  ========  =====  =========  ======
policy     new-action share              frames  change  static    ended  completed  progr.
=========  ============================  ======  ======  ========  =====  =========  ======
*capped at 100 frames*
uniform    6.7 % each                    98.0    8.62    5.5 %     7 %    2 %        2.7
sticky     6.7 % each                    96.5    7.58    11.8 %    8 %    1 %        3.1
explore    R 22.5, R+UP 22.0, UP 11.6,   73.8    10.00   3.4 %     68 %   37 %       7.8
           others 3.0-4.1 %
*full episodes (CoinRun's 1000-step timeout)*
uniform    6.7 % each                    603.8   8.73    5.6 %     67 %   25 %       6.6
sticky     6.7 % each                    555.7   7.81    12.5 %    72 %   34 %       7.1
explore    R 22.6, R+UP 21.7, UP 11.1    92.4    10.07   3.2 %     100 %  57 %       9.7
=========  ============================  ======  ======  ========  =====  =========  ======

So ``explore`` moves the frames ~30 % more per step with a third of the static transitions, and gets
2.5x as far right in 100 frames (a level's coin in 57 % of episodes, within ~92 steps; the other 43 % die
by then, against lava, a saw or an enemy). The cost: its episodes are short (74 frames against 97 capped
at 100; 92 against 556 uncapped), so the same ``--episodes`` gives fewer clips, spread over more levels.
Which gives the better world is for the speedrun to measure; this module only makes both available.

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
import struct
from dataclasses import dataclass
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
from genie.eval.actions import COINRUN_EFFECTIVE, COINRUN_MOVEMENT, effective_actions

NUM_ACTIONS = 15  # CoinRun's action space (procgen's shared 15 key combos)
FPS = 15  # procgen's native frame rate
NATIVE_SIZE = 64  # procgen renders observations at 64x64
INT32_MAX = 2**31 - 1  # procgen takes level seeds and rand_seed as C ints
_WHEELS = "wheels for CPython 3.11/3.12 x86_64 Linux only"
PROCGEN_MISSING = f"CoinRun needs procgen-mirror (pip install 'genie[coinrun]'; {_WHEELS})"
# procgen's 15 key combos (procgen/env.py, get_combos); 9..14 are extra buttons that CoinRun ignores (as NOOP)
ACTION_NAMES = (
    "LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
    "D", "A", "W", "S", "Q", "E",
)  # fmt: skip
# Which of the 15 act differently in CoinRun: raw id -> effective class (9 classes: {4, 9..14} is NOOP, the rest
# act alone) and a coarser movement class (left / none / right x jump or not). The tables live in genie.eval.actions
# (where `genie eval lam` reads them without procgen); their derivation from procgen's source is documented there,
# and measure_action_classes() below checks them on the installed procgen.
EFFECTIVE_ACTIONS = COINRUN_EFFECTIVE
MOVEMENT_ACTIONS = COINRUN_MOVEMENT
RIGHT, RIGHT_UP, UP = 7, 8, 5
# The explore policy's relative weights for each new action: RIGHT and RIGHT+UP 6 each, UP 3, every other action 1
# (27 in all): 22 % RIGHT, 22 % RIGHT+UP, 11 % UP, 3.7 % each of the other 12 (chosen by measurement, see above)
EXPLORE_WEIGHTS = tuple(6 if a in (RIGHT, RIGHT_UP) else 3 if a == UP else 1 for a in range(NUM_ACTIONS))
POLICIES = ("uniform", "sticky", "explore")


@dataclass(frozen=True)
class Policy:
    """How the agent picks its actions: repeat the previous one with probability ``sticky``, else draw anew.

    Attributes:
        name: ``uniform`` (i.i.d. uniform: ``sticky`` 0), ``sticky`` (sticky-random, uniform draws) or
            ``explore`` (sticky, with draws weighted by :data:`EXPLORE_WEIGHTS`).
        sticky: probability of repeating the previous action at each step after the first.
        weights: relative weight of each of the 15 actions in a new draw; ``None``: uniform.
    """

    name: str
    sticky: float
    weights: tuple[int, ...] | None = None

    @classmethod
    def make(cls, name: str, sticky: float) -> Policy:
        """The policy called ``name`` (one of :data:`POLICIES`); ``uniform`` ignores ``sticky``."""
        if name == "uniform":
            return cls("uniform", 0.0)
        if name == "sticky":
            return cls("sticky", sticky)
        if name == "explore":
            return cls("explore", sticky, EXPLORE_WEIGHTS)
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")

    def probabilities(self) -> np.ndarray:
        """Each action's probability in a new draw, float64 ``[15]``."""
        w = np.ones(NUM_ACTIONS) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    def settings(self) -> dict[str, Any]:
        """What the policy adds to the prep settings (a cached folder made with another policy is refused)."""
        return {"policy": self.name, "sticky": self.sticky, "action_weights": self.weights and list(self.weights)}

    def next_action(self, rng: np.random.Generator, previous: int) -> int:
        """The action after ``previous`` (-1 before the first): kept with probability ``sticky``, else drawn.

        Uniform draws use ``rng.integers``, so the sticky-random policy draws exactly what it drew before the
        policies were added (the same episodes for the same seed).
        """
        if previous >= 0 and rng.random() < self.sticky:
            return previous
        if self.weights is None:
            return int(rng.integers(NUM_ACTIONS))
        return int(rng.choice(NUM_ACTIONS, p=self.probabilities()))


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


def make_env(env_cls: Any, level: int, env_seed: int, distribution_mode: str, game: str = "coinrun") -> Any:
    """One environment of procgen game ``game`` (CoinRun by default) on exactly ``level``, seeded with ``env_seed``.

    ``num_threads=0`` steps in this thread: twice as fast for a single env, and no extra threads competing
    with the other prep workers.
    """
    return env_cls(
        num=1,
        env_name=game,
        start_level=level,
        num_levels=1,
        distribution_mode=distribution_mode,
        rand_seed=env_seed,
        num_threads=0,
    )


def play_episode(
    env_cls: Any,
    rng: np.random.Generator,
    *,
    level: int,
    env_seed: int,
    policy: Policy,
    max_frames: int,
    distribution_mode: str,
    on_step: Any = None,
    game: str = "coinrun",
) -> tuple[np.ndarray, np.ndarray]:
    """Play one episode of ``game`` (CoinRun by default; any procgen game) on ``level`` with ``policy``.

    Args:
        on_step: optional ``on_step(env, reward, ended)`` called after the first frame and after every step,
            the one that ends the episode included (:func:`measure_policy` reads the agent's position and
            whether the level was completed through it).

    Returns:
        ``(frames uint8 [L, 64, 64, 3], actions int64 [L - 1])`` where ``actions[t]`` was taken
        between frame ``t`` and ``t + 1``; ``L <= max_frames``. The action that ends the episode
        has no next frame (gym3 shows the next episode's first frame instead) and is not kept.
    """
    env = make_env(env_cls, level, env_seed, distribution_mode, game)
    try:
        _, obs, _ = env.observe()
        frames = [np.array(obs["rgb"][0])]
        if on_step is not None:
            on_step(env, 0.0, False)
        actions: list[int] = []
        action = -1
        while len(frames) < max_frames:
            action = policy.next_action(rng, action)
            env.act(np.array([action]))
            reward, obs, first = env.observe()
            if on_step is not None:
                on_step(env, float(reward[0]), bool(first[0]))
            if first[0]:  # the episode ended; this frame already belongs to the next one
                break
            actions.append(action)
            frames.append(np.array(obs["rgb"][0]))
    finally:
        env.close()
    return np.stack(frames), np.asarray(actions, dtype=np.int64)


def agent_x(state: bytes) -> float | None:
    """The agent's x position (in tiles; a level starts it near 1.5) in a procgen 0.10 ``get_state`` blob.

    Reads procgen's serialisation up to the first entity (the agent): the game header (version, name, 12
    option ints, 5 ints, two RNG states, the step data, 12 ints), the grid size and the entity count. Only
    :func:`measure_policy` uses it; ``None`` where the blob does not parse (another procgen build).
    """
    try:
        offset = 4
        offset += 4 + struct.unpack_from("i", state, offset)[0]  # game name
        offset += 4 * (12 + 5)
        for _ in range(2):  # RNG states: is_seeded, then a length-prefixed blob
            offset += 8 + struct.unpack_from("i", state, offset + 4)[0]
        offset += 4 * (3 + 12 + 1)
        if struct.unpack_from("i", state, offset)[0] < 1:  # no entities
            return None
        return float(struct.unpack_from("f", state, offset + 4)[0])
    except struct.error:
        return None


def measure_policy(
    policy: Policy, *, episodes: int = 100, max_frames: int = 100, seed: int = 0, distribution_mode: str = "hard"
) -> dict[str, Any]:
    """What a policy's episodes look like: action histogram, frame change, static transitions, progress.

    Plays ``episodes`` training-split episodes (the levels and seeds ``genie prep coinrun --seed`` uses) capped
    at ``max_frames`` frames, one CPU core, no encoding.

    Returns:
        ``action_share`` (each action's share of the transitions), ``mean_abs_change`` (mean |x_{t+1} - x_t|
        over pixels and channels, 0..255), ``static_share`` (transitions whose frame did not change at all),
        ``mean_frames`` (episode length), ``ended_share`` (episodes that ended, by death or completion, before
        ``max_frames``), ``completed_share`` (episodes that reached the coin), ``mean_progress`` (tiles the
        agent got right of its start at its furthest, mean over episodes; ``None`` if procgen's state does not
        parse).
    """
    env_cls = load_procgen()
    actions_all, changes, static, lengths, progress = [], [], 0, [], []
    ended = completed = 0
    for episode in range(episodes):
        rng = episode_rng(seed, "train", episode)
        level = int(rng.integers(10000))
        env_seed = int(rng.integers(INT32_MAX))
        xs: list[float | None] = []
        rewards: list[float] = []

        def on_step(env: Any, reward: float, end: bool, xs: list = xs, rewards: list = rewards) -> None:
            rewards.append(reward)
            if not end:  # at the end, the state is already the next episode's
                xs.append(agent_x(env.callmethod("get_state")[0]))

        frames, actions = play_episode(
            env_cls,
            rng,
            level=level,
            env_seed=env_seed,
            policy=policy,
            max_frames=max_frames,
            distribution_mode=distribution_mode,
            on_step=on_step,
        )
        diff = np.abs(frames[1:].astype(np.int16) - frames[:-1]).reshape(len(actions), -1)
        changes.append(diff.mean(axis=1))
        static += int((diff.max(axis=1) == 0).sum())
        actions_all.append(actions)
        lengths.append(len(frames))
        ended += len(frames) < max_frames
        completed += sum(rewards) > 0  # CoinRun's only reward is the coin at the level's end
        if xs and None not in xs:
            progress.append(max(xs) - xs[0])  # type: ignore[type-var,operator]
    acts = np.concatenate(actions_all)
    return {
        "policy": policy.settings(),
        "episodes": episodes,
        "transitions": len(acts),
        "action_share": (np.bincount(acts, minlength=NUM_ACTIONS) / len(acts)).round(4).tolist(),
        "mean_abs_change": round(float(np.concatenate(changes).mean()), 2),
        "static_share": round(static / len(acts), 4),
        "mean_frames": round(float(np.mean(lengths)), 1),
        "ended_share": round(ended / episodes, 3),
        "completed_share": round(completed / episodes, 3),
        "mean_progress": round(float(np.mean(progress)), 2) if len(progress) == episodes else None,
    }


def effective_action(actions: np.ndarray, grouping: str = "effective") -> np.ndarray:
    """CoinRun's raw action ids (any shape) -> their effective classes (``"effective"``: :data:`EFFECTIVE_ACTIONS`,
    9 classes) or movement classes (``"movement"``: :data:`MOVEMENT_ACTIONS`, 6 classes)."""
    return effective_actions("coinrun", np.asarray(actions), grouping)


def measure_action_classes(
    *, levels: int = 12, states_per_level: int = 10, horizon: int = 4, seed: int = 0, distribution_mode: str = "hard"
) -> np.ndarray:
    """How often each pair of actions leads to different frames from the same state (the check behind the tables).

    For each of ``levels`` levels, the agent plays a sticky-random prefix (seeded by ``seed``) and, at
    ``states_per_level`` states along it, every one of the 15 actions is taken from the saved state (procgen's
    ``get_state`` / ``set_state``) followed by ``horizon - 1`` NOOPs; two actions differ in that state when any of
    the ``horizon`` frames differ. Procgen's saved state itself always differs (it records the action taken), so
    frames are compared.

    Returns:
        ``(15, 15)`` int array: the number of states in which actions ``i`` and ``j`` gave different frames
        (0 everywhere within an effective class).
    """
    env_cls = load_procgen()
    rng = np.random.default_rng(seed)
    differ = np.zeros((NUM_ACTIONS, NUM_ACTIONS), dtype=np.int64)
    noop = np.array([4])
    for level in range(levels):
        env = make_env(env_cls, level, level, distribution_mode)
        try:
            action = int(rng.integers(NUM_ACTIONS))
            for _ in range(states_per_level):
                for _ in range(int(rng.integers(2, 8))):  # walk on to the next state
                    if rng.random() >= 0.5:
                        action = int(rng.integers(NUM_ACTIONS))
                    env.act(np.array([action]))
                saved = env.callmethod("get_state")
                seen = []
                for a in range(NUM_ACTIONS):
                    env.callmethod("set_state", saved)
                    frames = []
                    for t in range(horizon):
                        env.act(np.array([a]) if t == 0 else noop)
                        frames.append(np.array(env.observe()[1]["rgb"][0]))
                    seen.append(np.stack(frames))
                env.callmethod("set_state", saved)
                for i in range(NUM_ACTIONS):
                    for j in range(i + 1, NUM_ACTIONS):
                        if not np.array_equal(seen[i], seen[j]):
                            differ[i, j] += 1
                            differ[j, i] += 1
        finally:
            env.close()
    return differ


def process_episodes(job: Job, writer: PartWriter) -> JobReport:
    """Play a chunk of episodes and write their clips to ``writer``. Top-level for pickling.

    The payload's ``game`` (CoinRun when absent) picks the procgen game; ``game_key`` (absent for CoinRun) gives
    that game's episodes their own random stream, so ``genie prep procgen --games coinrun`` writes exactly the
    clips of ``genie prep coinrun`` and the other games do not replay CoinRun's action sequences.
    """
    p = job.payload
    env_cls = load_procgen()
    split, clip_frames, size = p["split"], p["clip_frames"], p["size"]
    game, game_key = p.get("game", "coinrun"), p.get("game_key")
    report = JobReport(job.job_id, ok=True)
    short = env_frames = 0
    policy = Policy(p["policy"], p["sticky"], p["action_weights"] and tuple(p["action_weights"]))
    for episode in range(p["first_episode"], p["end_episode"]):
        rng = episode_rng(p["seed"], split, episode, game_key)
        level = p["start_level"] + int(rng.integers(p["num_levels"]))
        env_seed = int(rng.integers(INT32_MAX))
        frames, actions = play_episode(
            env_cls,
            rng,
            level=level,
            env_seed=env_seed,
            policy=policy,
            max_frames=p["max_episode_frames"],
            distribution_mode=p["distribution_mode"],
            game=game,
        )
        env_frames += len(frames)
        if len(frames) < clip_frames:
            short += 1
            continue
        if size != NATIVE_SIZE:
            frames = np.stack([resize_center_crop(f, size) for f in frames])
        video_id = f"{game}-{split}-s{p['seed']}-e{episode:06d}"
        extra = {
            "episode": episode,
            "env_seed": env_seed,
            "level": level,
            "episode_frames": len(frames),
            "distribution_mode": p["distribution_mode"],
            "policy": policy.name,
        }
        if game != "coinrun":
            extra["game"] = game
        write_episode_clips(
            writer,
            report,
            frames,
            actions,
            clip_frames,
            video_id=video_id,
            fps=FPS,
            source=f"{game}:{split}",
            encoding=p,
            extra=extra,
        )
    episodes = p["end_episode"] - p["first_episode"]
    report.info.update(episodes=episodes, short_episodes=short, env_frames=env_frames)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Play Procgen CoinRun with a random policy (--policy, --val-policy) and write 16-frame 64x64 clips with their "
        "true actions to DIR/train/train-*.tar and DIR/val/val-*.tar (disjoint levels). "
        "Deterministic: the same arguments give byte-identical shards for any --workers."
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    add("--episodes", type=int, default=1000, help="training episodes to play (default 1000)")
    add("--seed", type=int, default=0, help="seed of levels, env, policy and shard order (default 0)")
    add(
        "--policy",
        choices=["sticky", "explore"],
        default="sticky",
        help="training episodes' policy (default sticky): sticky = sticky-random, new actions uniform over the "
        "15; explore = sticky too, new actions favour RIGHT, RIGHT+UP and UP (every action still used), so "
        "the agent runs and jumps through more of the level",
    )
    add(
        "--sticky",
        type=float,
        default=0.5,
        help="probability of repeating the previous action each step (default 0.5), for the sticky and explore "
        "policies: held actions give consistent, identifiable motion despite CoinRun's inertia and explore "
        "further; 0 = a new draw every step",
    )
    add(
        "--val-policy",
        choices=POLICIES,
        default="uniform",
        help="validation episodes' policy (default uniform: i.i.d. uniform random over the 15 actions, as "
        "GenieRedux's and Jafar's CoinRun evaluation sets, whatever --policy is); sticky/explore use --sticky",
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
    results = prep_game(args, "coinrun", args.out, val_episodes)
    for split, summary in results.items():
        print(f"{split} shards: {args.out / split}/{split}-*.tar ({len(summary['shards'])} shards)")
    return results


def prep_game(
    args: argparse.Namespace, game: str, out: Path, val_episodes: int, game_key: int | None = None
) -> dict[str, Any]:
    """Both splits of one procgen game into ``out/train`` and ``out/val`` (each a resumable prep run).

    Args:
        args: the parsed options of ``genie prep coinrun`` / ``genie prep procgen`` (checked).
        game: procgen game name.
        out: the game's output folder.
        val_episodes: validation episodes (0: no validation split).
        game_key: the game's own episode stream (None: CoinRun's, see :func:`process_episodes`).

    Returns:
        split -> the prep run's summary.
    """
    common = {
        "seed": args.seed,
        "clip_frames": args.clip_frames,
        "max_episode_frames": args.max_episode_frames,
        "size": args.size,
        "lossless": not args.lossy,
        "crf": args.crf,
        "gop": args.gop,
        "distribution_mode": args.distribution_mode,
    }
    if game != "coinrun":  # CoinRun's settings stay those of `genie prep coinrun`: its folders are interchangeable
        common.update(game=game, game_key=game_key)
    splits = {
        "train": (args.episodes, 0, args.levels, Policy.make(args.policy, args.sticky)),
        "val": (val_episodes, args.val_start_level, args.val_levels, Policy.make(args.val_policy, args.sticky)),
    }
    results: dict[str, Any] = {}
    for split, (episodes, start_level, num_levels, policy) in splits.items():
        if episodes == 0:
            continue
        out_dir = out / split
        levels = {"start_level": start_level, "num_levels": num_levels}
        own = {**common, **policy.settings()}  # the policy is part of the settings: a cache of another is refused
        jobs = episode_jobs(split, episodes, args.episodes_per_job, {**own, **levels})
        summary = run_prep(
            out_dir=out_dir,
            jobs=jobs,
            fn=process_episodes,
            settings={
                "source": game,
                "split": split,
                "episodes": episodes,
                "episodes_per_job": args.episodes_per_job,
                "procgen": procgen_version(),
                **own,
                **levels,
            },
            shard_size=args.shard_size,
            shuffle_seed=args.seed,
            workers=args.workers,
            prefix=split,
            desc=f"{game} {split}",
            overwrite=args.overwrite,
            fail_fast=True,  # a generated source has no bad inputs: a failing job is a bug to surface
            extra_summary={
                "split": split,
                "episodes": episodes,
                "levels": [start_level, start_level + num_levels],
                **own,
            },
        )
        print_summary(summary, out_dir)
        kept = episodes - int(summary["totals"].get("short_episodes", 0))
        summary["episodes_with_clips"] = kept
        summary["clips_per_s"] = round(summary["clips"] / max(summary["seconds"], 1e-9), 1)
        print(
            f"  {game} {split}: {episodes} episodes ({policy.name} policy) on levels "
            f"[{start_level}, {start_level + num_levels}), "
            f"{episodes - kept} dropped as shorter than one clip ({args.clip_frames} frames); "
            f"{summary['clips_per_s']:.1f} clips/s"
        )
        results[split] = summary
    return results

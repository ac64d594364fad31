"""``genie speedrun --budget-minutes M``: a controllable CoinRun world, trained and measured within a time budget.

1. **Data** (not counted in the budget, timed on its own): CoinRun shards from ``genie prep coinrun`` with
   every core (``--workers``), cached in ``--data``: a second run with the same settings reuses them (the
   prep is resumable and checks its settings), so only the first run pays for them. Validation episodes
   play levels that training never sees.
2. **Training**: the tokenizer, the LAM and the dynamics model, one after another, each an ordinary
   ``genie fit`` of ``configs/speedrun/<preset>/<stage>.yaml`` stopped by wall clock
   (``trainer.max_time`` = its share of the budget) with the learning rate's cosine decayed over that same
   time (``optim.budget_seconds``), so a stage ends with its schedule done whatever its step rate. The
   dynamics model's codebook size, token grid and number of actions are taken from the exported tokenizer
   and LAM. It tokenizes every batch on the fly; with ``--prep-tokenize`` its share starts with ``genie prep
   tokenize`` of the training shards (tokens and latent actions, once) and it trains on the token shards for the
   rest of the share. Those steps ran 1.48x faster on the 2-core CPU, but the world was not better for them
   (docs/architecture.md, Speedrun), so no preset does it by default.
3. **World and evaluation** on the held-out levels: tokenizer PSNR/SSIM, LAM code usage and NMI with the
   true actions, rollout PSNR/SSIM at t = 1..16 from one prompt frame with the LAM's inferred actions,
   ΔtPSNR at t = 4, and the "10 frames from 1" means that Genie-style papers report.

Writes ``OUT/speedrun.json`` (every number, the per-stage steps and seconds, the settings) and
``OUT/speedrun.png`` (reconstructions, a rollout next to the real clip, PSNR per step). Presets: ``gpu``
(bf16-mixed, 25 MaskGIT steps, as Genie) when CUDA is available, else ``cpu`` (small models, 8 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "lam", "dynamics")
DEFAULT_SHARES = (0.2, 0.2, 0.6)  # the dynamics model needs the longest; the k-means-started tokenizer, the least
CLIP_FRAMES = 20  # held-out clips need 1 prompt frame + 16 to predict
HORIZON = 16
PRESETS: dict[str, dict[str, Any]] = {
    # episodes: training episodes of CoinRun (val: a tenth, at least 16); eval_clips: held-out clips scored
    # sampler_*: how the exported world samples (SamplerConfig). On the CPU preset's pixel codes, greedy sampling that
    # fixes the most confident tokens first scored 19.79 dB over 10 frames from 1 against 18.18 at temperature 1
    # (docs/architecture.md, Speedrun): near-identical patch codes share the probability, and sampling picks noise
    "cpu": dict(
        episodes=96,
        max_episode_frames=100,
        policy="sticky",
        precision="32-true",
        sampler_steps=8,
        sampler_temperature=0.0,
        sampler_unmask="confidence",
        eval_clips=32,
        lam_training="frozen",
    ),
    "gpu": dict(
        episodes=2000,
        max_episode_frames=200,
        policy="sticky",
        precision="bf16-mixed",
        sampler_steps=25,
        sampler_temperature=1.0,
        sampler_unmask="random",
        eval_clips=256,
        lam_training="frozen",
    ),
}


class SpeedrunError(RuntimeError):
    """A step of the speedrun failed (its own error was printed above)."""


def hms(seconds: float) -> str:
    """Seconds -> Lightning's ``DD:HH:MM:SS`` for ``trainer.max_time`` (whole seconds, at least 1)."""
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parse_shares(text: str) -> tuple[float, float, float]:
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--shares must be 3 numbers like 0.35,0.2,0.45, got {text!r}") from None
    if len(shares) != 3 or min(shares) <= 0:
        raise ValueError(f"--shares must be 3 positive numbers (tokenizer,lam,dynamics), got {text!r}")
    total = sum(shares)
    return tuple(x / total for x in shares)  # type: ignore[return-value]


def run_genie(argv: list[str], what: str) -> None:
    from genie.cli import main

    print(f"\n[speedrun] {what}: genie {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise SpeedrunError(f"speedrun step '{what}' failed (exit {code}); rerun it alone with the command above")


def prepare_data(args: argparse.Namespace, preset: dict[str, Any]) -> dict[str, Any]:
    """CoinRun shards in ``args.data`` (reused when already made with these settings); returns timing."""
    episodes = args.episodes or preset["episodes"]
    val = max(16, episodes // 10)
    workers = os.cpu_count() or 1
    argv = ["prep", "coinrun", "--out", str(args.data), "--episodes", str(episodes), "--val-episodes", str(val)]
    argv += ["--clip-frames", str(CLIP_FRAMES), "--max-episode-frames", str(preset["max_episode_frames"])]
    argv += ["--seed", str(args.seed), "--workers", str(workers if workers > 1 else 0)]
    argv += ["--policy", args.policy or preset["policy"]]
    if args.overwrite_data:
        argv.append("--overwrite")
    stamps = [args.data / split / "summary.json" for split in ("train", "val")]
    before = [p.stat().st_mtime_ns if p.is_file() else None for p in stamps]
    t0 = time.monotonic()
    try:
        run_genie(argv, "data")
    except SpeedrunError as e:
        raise SpeedrunError(
            f"{e}; if {args.data} holds shards made with other settings (an older genie or another --policy / "
            "--episodes), pass --overwrite-data or choose another --data"
        ) from None
    seconds = time.monotonic() - t0
    reused = before == [p.stat().st_mtime_ns for p in stamps]  # nothing rewritten: the cache was complete
    summary = json.loads(stamps[0].read_text())
    return {
        "seconds": round(seconds, 1),
        "reused": reused,
        "episodes": episodes,
        "policy": args.policy or preset["policy"],
        "val_episodes": val,
        "clips": summary.get("clips"),
    }


def fit_stage(
    stage: str,
    args: argparse.Namespace,
    preset: dict[str, Any],
    seconds: float,
    extra: list[str],
    name: str = "",
    train_shards: Path | None = None,
) -> dict[str, Any]:
    """One ``genie fit`` stopped after ``seconds`` of wall clock; returns what it did (training.json).

    Runs ``configs/speedrun/<preset>/<stage>.yaml`` into ``OUT/<name>`` (default: the stage's name) on
    ``train_shards`` (default: the video shards, ``args.data / "train"``).
    """
    out = args.out / (name or stage)
    config = ROOT / "configs" / "speedrun" / args.preset / f"{stage}.yaml"
    argv = ["fit", "--config", str(config), f"--data.train_shards={train_shards or args.data / 'train'}"]
    argv += [f"--data.val_shards={args.data / 'val'}", f"--trainer.default_root_dir={out}", "--trainer.logger=false"]
    argv += [f"--trainer.max_time={hms(seconds)}", f"--model.init_args.optim.budget_seconds={seconds:.1f}"]
    argv += [f"--trainer.precision={preset['precision']}", f"--seed_everything={args.seed}"]
    argv += ["--trainer.enable_model_summary=false", *extra]
    t0 = time.monotonic()
    run_genie(argv, name or stage)
    record = json.loads((out / "export" / "training.json").read_text())
    record.update(budget_seconds=round(seconds, 1), wall_seconds=round(time.monotonic() - t0, 1))
    return record


def prep_tokenize(args: argparse.Namespace, device: Any) -> tuple[Path, float]:
    """Token shards of the training split from the run's exported tokenizer and LAM, into ``OUT/tokens/train``
    (remade: a folder left by an earlier run into the same OUT holds another tokenizer's codes); their path and the
    seconds it took."""
    import shutil

    tokens = args.out / "tokens" / "train"
    shutil.rmtree(tokens, ignore_errors=True)  # prep tokenize skips finished shards, so stale ones would stay
    tok, lam = (str(args.out / s / "export") for s in ("tokenizer", "lam"))
    argv = ["prep", "tokenize", "--data", str(args.data / "train"), "--out", str(tokens), "--tokenizer", tok]
    t0 = time.monotonic()
    run_genie([*argv, "--lam", lam, "--device", device.type], "tokens")
    return tokens, time.monotonic() - t0


def frozen_overrides(out: Path) -> list[str]:
    """The dynamics stage's settings that must match the exported tokenizer and LAM."""
    from genie.models.lam import LAMConfig
    from genie.models.tokenizer import TokenizerConfig
    from genie.stages.dynamics import read_config

    tok_dir, lam_dir = out / "tokenizer" / "export", out / "lam" / "export"
    tok, lam = read_config(TokenizerConfig, tok_dir, "tokenizer"), read_config(LAMConfig, lam_dir, "LAM")
    return [
        f"--model.init_args.tokenizer={tok_dir}",
        f"--model.init_args.lam={lam_dir}",
        f"--model.init_args.model.num_codes={tok.num_codes}",
        f"--model.init_args.model.grid_size={tok.grid_size}",
        f"--model.init_args.model.num_actions={lam.num_actions}",
    ]


def build_world(args: argparse.Namespace, preset: dict[str, Any], dynamics: str, name: str, device: Any) -> Any:
    """Export ``OUT/<name>`` from the run's tokenizer, LAM and ``OUT/<dynamics>`` and load it with the preset's
    sampler."""
    from genie.world import World, joint_lam

    tok, lam, dyn = (str(args.out / s / "export") for s in ("tokenizer", "lam", dynamics))
    lam = str(joint_lam(dyn) or lam)  # a dynamics stage that trained its LAM jointly: that one
    argv = ["export", "world", "--tokenizer", tok, "--lam", lam, "--dynamics", dyn, "--out", str(args.out / name)]
    argv += ["--steps", str(preset["sampler_steps"]), "--temperature", str(preset["sampler_temperature"])]
    run_genie([*argv, "--unmask", preset["sampler_unmask"]], name)
    return World.from_pretrained(args.out / name, device=device, seed=args.seed)  # with world.json's sampler


def changed_mean(report: dict[str, Any], key: str, steps: int = 10) -> float | None:
    """Mean of ``report[key]`` (a per-step mean over the frames that changed) over every changed frame of the first
    ``steps`` steps: each step weighted by its ``changed_frames_per_step``; None where no frame changed."""
    pairs = [(v, n) for v, n in zip(report[key][:steps], report["changed_frames_per_step"][:steps], strict=True) if n]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else None


def baseline_lines(metrics: dict[str, Any]) -> str:
    """The summary's lines under the world's PSNR: copying the prompt, the world without keep_pixels, and both on the
    frames that changed."""
    text = f"\n    copying the prompt frame {metrics['copy_psnr_10_from_1']:.2f} dB"
    if metrics["rollout_psnr_10_from_1_decoded"] is not None:
        text += f"; the world decoding every patch (no keep_pixels) {metrics['rollout_psnr_10_from_1_decoded']:.2f} dB"
    if metrics["rollout_psnr_10_from_1_changed"] is not None:
        text += (
            f"\n    on the {metrics['changed_frames_share_10_from_1']:.0%} of frames that differ from the prompt: "
            f"world {metrics['rollout_psnr_10_from_1_changed']:.2f} dB, "
            f"copying {metrics['copy_psnr_10_from_1_changed']:.2f}"
        )
    return text


def evaluate(args: argparse.Namespace, preset: dict[str, Any], world: Any, device: Any) -> dict[str, Any]:
    """Every metric of ``world`` on the held-out levels."""
    from genie.eval.lam import evaluate_lam
    from genie.eval.tokenizer import evaluate_tokenizer
    from genie.eval.world import evaluate_world

    val = str(args.data / "val")
    clips = preset["eval_clips"]
    frames = min(world.tokenizer.config.num_frames, CLIP_FRAMES)
    tok, _ = evaluate_tokenizer(world.tokenizer, val, num_frames=frames, max_clips=clips, device=device)
    # every transition of the held-out clips (the LAM slides its window over them): NMI on a few (32 clips x 3 =
    # 96) is mostly sampling bias (unrelated labelings score ~0.14 there, ~0.02 on 608; genie/eval/metrics.py)
    lam = evaluate_lam(world.lam, val, num_frames=CLIP_FRAMES, max_clips=clips, device=device)
    wld = evaluate_world(world, val, context=1, horizon=HORIZON, max_clips=clips, seed=args.seed)
    ten = slice(0, 10)
    metrics = {
        "tokenizer_psnr": tok["psnr"],
        "tokenizer_ssim": tok["ssim"],
        "tokenizer_codebook_usage": tok["usage"],
        "lam_codes_used": lam["codes_used"],
        "lam_code_usage_histogram": lam["usage_histogram"],
        "lam_nmi": lam.get("nmi"),
        "lam_nmi_effective": lam.get("nmi_effective"),  # against CoinRun's 9 effective action classes
        "lam_nmi_chance": lam.get("nmi_chance"),  # what unrelated labelings score on as many transitions
        "lam_nmi_effective_chance": lam.get("nmi_effective_chance"),
        "lam_nmi_effective_adjusted": lam.get("nmi_effective_adjusted"),  # 0 at chance, 1 perfect
        "lam_transitions": lam.get("transitions_with_true_actions"),
        "lam_train_eval_agreement": lam["train_eval_agreement"],
        "rollout_psnr_per_step": wld["psnr_per_step"],
        "rollout_ssim_per_step": wld["ssim_per_step"],
        "rollout_psnr_10_from_1": float(np.mean(wld["psnr_per_step"][ten])),  # Genie-style: 10 frames from 1
        "rollout_ssim_10_from_1": float(np.mean(wld["ssim_per_step"][ten])),
        # the same rollout with every patch decoded (SamplerConfig.keep_pixels off): comparable with earlier runs
        "rollout_psnr_decoded_per_step": wld.get("psnr_decoded_per_step"),
        "rollout_psnr_10_from_1_decoded": (
            float(np.mean(wld["psnr_decoded_per_step"][ten])) if "psnr_decoded_per_step" in wld else None
        ),
        "random_actions_psnr_per_step": wld["psnr_random_per_step"],
        "copy_psnr_per_step": wld["copy_psnr_per_step"],
        "copy_psnr_10_from_1": float(np.mean(wld["copy_psnr_per_step"][ten])),  # the world's target to beat
        # the same two over the frames that differ from the prompt (copying scores a capped 100 dB on the others)
        "changed_frames_share_10_from_1": sum(wld["changed_frames_per_step"][ten]) / (10 * wld["clips"]),
        "rollout_psnr_10_from_1_changed": changed_mean(wld, "psnr_changed_per_step"),
        "copy_psnr_10_from_1_changed": changed_mean(wld, "copy_psnr_changed_per_step"),
        "delta_psnr_t4": wld["delta_psnr_t4"],
        "teacher_forced_token_accuracy": wld["teacher_forced_token_accuracy"],
        "eval_clips": wld["clips"],
        "sampler_steps": preset["sampler_steps"],
        "sampler_temperature": preset["sampler_temperature"],
        "sampler_unmask": preset["sampler_unmask"],
    }
    return metrics


def true_action_bound(
    args: argparse.Namespace, preset: dict[str, Any], seconds: float, device: Any, tokens: Path | None = None
) -> dict[str, Any]:
    """The upper bound: the same dynamics stage and time, conditioned on the data's true actions, evaluated alike
    (on the token shards ``tokens`` where the latent world trained on them: they carry the true actions too).

    Not part of the budget. Tells the LAM's share of the world's error from the dynamics model's: the gap
    between this world and the latent one is what better latent actions could gain (GenieRedux-G).
    """
    from data_prep.coinrun import NUM_ACTIONS
    from genie.eval.world import evaluate_world

    extra = [
        *frozen_overrides(args.out),
        "--model.init_args.model.action_source=true",
        f"--model.init_args.model.num_actions={NUM_ACTIONS}",
        "--data.require_actions=true",
    ]
    record = fit_stage("dynamics", args, preset, seconds, extra, name="dynamics_true_actions", train_shards=tokens)
    world = build_world(args, preset, "dynamics_true_actions", "world_true_actions", device)
    clips = preset["eval_clips"]
    wld = evaluate_world(world, str(args.data / "val"), context=1, horizon=HORIZON, max_clips=clips, seed=args.seed)
    return {
        "steps": record["global_step"],
        "train_seconds": record["train_seconds"],
        "rollout_psnr_per_step": wld["psnr_per_step"],
        "rollout_psnr_10_from_1": float(np.mean(wld["psnr_per_step"][:10])),
        "rollout_ssim_10_from_1": float(np.mean(wld["ssim_per_step"][:10])),
        "random_actions_psnr_per_step": wld["psnr_random_per_step"],
        "delta_psnr_t4": wld["delta_psnr_t4"],
        "teacher_forced_token_accuracy": wld["teacher_forced_token_accuracy"],
    }


def summary_png(world: Any, args: argparse.Namespace, metrics: dict[str, Any], path: Path) -> Path:
    """Reconstructions, a rollout next to the real clip, and PSNR per step, in one picture."""
    from genie.data.loader import ClipStream
    from genie.eval.common import save_figure
    from genie.stages.media import frame_grid, to_uint8

    batch = next(iter(ClipStream(str(args.data / "val"), num_frames=HORIZON + 1, batch_size=2, train=False)))
    real = batch["frames"].to(world.device)  # (2, 17, H, W, 3)
    n = min(8, world.tokenizer.config.num_frames)
    recon = to_uint8(world.tokenizer.decode(world.tokenizer.encode(real[:, :n])))
    actions = world.lam.infer_actions(real)
    world.seed(args.seed)
    rollout = world.rollout(real[:1, :1], actions[:1])  # (1, 16, H, W, 3)
    real_np = real.cpu().numpy()
    recon_rows = frame_grid(np.stack([real_np[0, :n], recon[0], real_np[1, :n], recon[1]]))
    roll_rows = frame_grid(np.stack([real_np[0, 1 : 1 + HORIZON : 2], rollout[0, ::2]]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 7))
    ax = fig.add_subplot(2, 2, 1)
    ax.imshow(recon_rows, interpolation="nearest")
    ax.set_title(f"tokenizer: real / reconstructed  (PSNR {metrics['tokenizer_psnr']:.1f} dB)")
    ax.axis("off")
    ax = fig.add_subplot(2, 2, 2)
    ax.imshow(roll_rows, interpolation="nearest")
    ax.set_title("real / world with inferred actions (every 2nd of 16 frames)")
    ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    steps = np.arange(1, HORIZON + 1)
    ax.plot(steps, metrics["rollout_psnr_per_step"], "o-", label="inferred actions")
    ax.plot(steps, metrics["random_actions_psnr_per_step"], "s--", label="random actions")
    ax.plot(steps, metrics["copy_psnr_per_step"], ":", label="copy the prompt frame")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("PSNR (dB)")
    nmi = metrics["lam_nmi"]
    ax.set_title(
        f"ΔtPSNR(4) {metrics['delta_psnr_t4']:+.2f} dB · 10-from-1 PSNR {metrics['rollout_psnr_10_from_1']:.1f} dB "
        f"SSIM {metrics['rollout_ssim_10_from_1']:.2f} · LAM NMI {'-' if nmi is None else f'{nmi:.2f}'}"
    )
    ax.legend()
    return save_figure(fig, path)


def rollout_gif(world: Any, args: argparse.Namespace, path: Path, steps: int = 12, scale: int = 3) -> Path:
    """One GIF of panels side by side: a real held-out clip, the world driven by the LAM's actions inferred from it,
    then the world driven by each latent action alone (the same prompt frame); a white gap between panels."""
    import torch

    from genie.data.loader import ClipStream
    from genie.rollout import write_video

    batch = next(iter(ClipStream(str(args.data / "val"), num_frames=steps + 1, batch_size=1, train=False)))
    real = batch["frames"].to(world.device)  # (1, steps + 1, H, W, 3)
    world.seed(args.seed)
    panels = [real[0].cpu().numpy()]  # each (steps + 1, H, W, 3) uint8, frame 0 the prompt
    if world.dynamics.config.action_source == "latent":
        inferred = world.lam.infer_actions(real)  # (1, steps)
        panels.append(np.concatenate([panels[0][:1], world.rollout(real[:, :1], inferred)[0]]))
    for a in range(world.num_actions):
        world.seed(args.seed)
        actions = torch.full((1, steps), a, dtype=torch.long, device=world.device)
        panels.append(np.concatenate([panels[0][:1], world.rollout(real[:, :1], actions)[0]]))
    gap = np.full((steps + 1, panels[0].shape[1], 2, 3), 255, np.uint8)
    frames = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=2)  # (steps + 1, H, W', 3)
    return write_video(frames, path, fps=4, scale=scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-minutes", type=float, required=True, help="training time for all three stages")
    parser.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="output folder (default runs/speedrun)")
    parser.add_argument("--data", type=Path, default=Path("data/coinrun_speedrun"), help="CoinRun shards (cached)")
    parser.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto", help="auto: gpu when CUDA is there")
    parser.add_argument("--episodes", type=int, default=None, help="training episodes (default: the preset's)")
    parser.add_argument(
        "--policy", choices=("sticky", "explore"), default=None, help="training data's policy (default: the preset's)"
    )
    parser.add_argument("--overwrite-data", action="store_true", help="remake --data if made with other settings")
    parser.add_argument("--shares", default=",".join(map(str, DEFAULT_SHARES)), help="tokenizer,lam,dynamics time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lam-training",
        choices=("frozen", "joint"),
        default=None,
        help="frozen: the dynamics stage reads the LAM stage's actions (Genie); joint: it trains that LAM on "
        "through the dynamics loss (default: the preset's)",
    )
    # off by default: token shards gave 1.48x faster dynamics steps on 2 cores, but on the same tokenizer and LAM the
    # world scored 20.40 dB against 20.61 on the fly (one seed; docs/architecture.md, Speedrun). On a GPU (1.25x
    # faster steps on an H200) tokenizing the gpu preset's 2000 x 200 frames first is unmeasured
    parser.add_argument(
        "--prep-tokenize",
        action="store_true",
        help="start the dynamics share by tokenizing the training shards once (genie prep tokenize) and train on the "
        "tokens (1.48x faster steps on 2 cores; the world was not better for it); default: tokenize every batch on "
        "the fly",
    )
    parser.add_argument(
        "--true-actions",
        action="store_true",
        help="also train the dynamics stage (same time, not counted in the budget) on the data's true actions "
        "and report that world beside the latent one: the upper bound better latent actions could reach",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    shares = parse_shares(args.shares)
    if args.prep_tokenize and (args.lam_training or PRESETS.get(args.preset, {}).get("lam_training")) == "joint":
        raise ValueError("--prep-tokenize with --lam-training joint: the LAM trains on the frames, drop one of them")
    if args.preset == "auto":
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    report: dict[str, Any] = {"budget_minutes": args.budget_minutes, "preset": args.preset, "device": str(device)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    report["data"] = prepare_data(args, preset)
    report["lam_training"] = args.lam_training or preset["lam_training"]

    budget = args.budget_minutes * 60
    report["stages"] = {}
    joint = report["lam_training"] == "joint"
    tokens: Path | None = None
    for stage, share in zip(STAGES, shares, strict=True):
        extra, seconds = [], budget * share
        if stage != "dynamics":
            report["stages"][stage] = fit_stage(stage, args, preset, seconds, extra) | {"share": round(share, 3)}
            continue
        extra = frozen_overrides(args.out) + (["--model.init_args.lam_training=joint"] if joint else [])
        spent = 0.0
        if args.prep_tokenize:  # inside the dynamics share: preparing the stage's data is part of its training time
            tokens, spent = prep_tokenize(args, device)
        fit_seconds = max(seconds - spent, 0.5 * seconds)  # a tiny share still trains; the budget then runs over
        if spent > 0.5 * seconds:
            print(f"[speedrun] tokenizing took {spent:.0f} s of the dynamics share's {seconds:.0f} s", flush=True)
        record = fit_stage(stage, args, preset, fit_seconds, extra, train_shards=tokens)
        record.update(
            share=round(share, 3),
            fit_seconds=record["budget_seconds"],  # the fit's own max_time
            budget_seconds=round(seconds, 1),  # the stage's whole share, tokenizing included
            tokenize_seconds=round(spent, 1),
            train_shards="tokens" if tokens else "video",
            wall_seconds=round(record["wall_seconds"] + spent, 1),
        )
        report["stages"][stage] = record
    train_seconds = sum(s["wall_seconds"] for s in report["stages"].values())

    out_world = args.out / "world"
    world = build_world(args, preset, "dynamics", "world", device)
    t_eval = time.monotonic()
    print("\n[speedrun] evaluating on held-out levels ...", flush=True)
    metrics = evaluate(args, preset, world, device)
    report["metrics"] = metrics
    eval_seconds = time.monotonic() - t_eval
    if args.true_actions:
        print("\n[speedrun] the upper bound: the dynamics stage on the data's true actions ...", flush=True)
        seconds = report["stages"]["dynamics"]["fit_seconds"]  # the latent world's training time and shards
        report["true_actions"] = true_action_bound(args, preset, seconds, device, tokens)
    report["seconds"] = {
        "data": report["data"]["seconds"],
        "train": round(train_seconds, 1),
        "eval": round(eval_seconds, 1),
        "total": round(time.monotonic() - t_start, 1),
    }
    (args.out / "speedrun.json").write_text(json.dumps(report, indent=1))
    png = summary_png(world, args, metrics, args.out / "speedrun.png")
    gif = rollout_gif(world, args, args.out / "rollouts.gif")
    nmi = metrics["lam_nmi"]

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(
        f"\nspeedrun ({args.preset}, {args.budget_minutes:g} min of training; data {report['seconds']['data']:.0f} s, "
        f"eval {report['seconds']['eval']:.0f} s):\n"
        + "\n".join(
            f"  {s:<9} {r['global_step']:>6} steps in {r['train_seconds']:.0f} s (share {r['budget_seconds']:.0f} s"
            + (f", after {r['tokenize_seconds']:.0f} s of genie prep tokenize)" if r.get("tokenize_seconds") else ")")
            for s, r in report["stages"].items()
        )
        + f"\n  tokenizer PSNR {metrics['tokenizer_psnr']:.2f} dB, SSIM {metrics['tokenizer_ssim']:.3f}"
        + f"\n  LAM{' (trained on jointly with the dynamics)' if report['lam_training'] == 'joint' else ''} "
        f"NMI with the true actions {num(nmi)} (effective actions {num(metrics['lam_nmi_effective'])}; "
        f"chance {num(metrics['lam_nmi_effective_chance'])} on {metrics['lam_transitions'] or 0} transitions), "
        f"codes used {metrics['lam_codes_used']}, eval/training codes agree {metrics['lam_train_eval_agreement']:.1%}"
        + f"\n  world, 10 frames from 1: PSNR {metrics['rollout_psnr_10_from_1']:.2f} dB, "
        f"SSIM {metrics['rollout_ssim_10_from_1']:.3f}; ΔtPSNR(t=4) {metrics['delta_psnr_t4']:+.2f} dB"
        + baseline_lines(metrics)
        + (
            ""
            if not args.true_actions
            else f"\n  upper bound, the same dynamics on the true actions ({report['true_actions']['steps']} steps): "
            f"10 frames from 1 PSNR {report['true_actions']['rollout_psnr_10_from_1']:.2f} dB, "
            f"ΔtPSNR(t=4) {report['true_actions']['delta_psnr_t4']:+.2f} dB"
        )
        + f"\n  report: {args.out / 'speedrun.json'}  summary: {png}"
        + f"\n  rollouts: {gif} (real clip | the world with its inferred actions | each latent action alone)"
        + f"\n  play it: genie play --world {out_world} --data {args.data / 'val'}"
    )
    return report

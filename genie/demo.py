"""``genie demo``: the whole idea end to end on a CPU in a few minutes.

Makes the plain synthetic sprites (a white square moved by 4 actions the models never see), trains the
tiny tokenizer, LAM and dynamics model (``--dynamics``: its kind) on them (``configs/tiny/``), exports a world,
evaluates it (``genie eval world``: ΔtPSNR says whether the latent actions control it) and writes a rollout GIF per
latent action. Every stage is an ordinary genie command, printed as it runs, so each can be rerun alone.

    OUT/data/{train,val}        sprites shards          OUT/tokens/{train,val}   token shards
    OUT/{tokenizer,lam,dynamics}/export                 OUT/world                world bundle
    OUT/world/eval/world_eval.{json,png}                OUT/rollouts/action_<a>.gif
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"
SPRITES = ["--size", "24", "--step", "4", "--sprite-size", "4", "--distractors", "0", "--backgrounds", "4"]


class DemoError(RuntimeError):
    """A stage of the demo failed (its own error was printed above)."""


def stages(out: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The demo's genie commands, in order: (what, argv)."""
    data, tokens = out / "data", out / "tokens"

    def fit(config: str, name: str, train: Path, val: Path, steps: int | None, *extra: str) -> list[str]:
        argv = ["fit", "--config", str(CONFIGS / config), f"--data.train_shards={train}", f"--data.val_shards={val}"]
        argv += [f"--trainer.default_root_dir={out / name}", "--trainer.logger=false", f"--seed_everything={args.seed}"]
        argv += ["--data.num_workers=0", "--trainer.limit_val_batches=2"]
        if steps is not None:
            argv += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(1, steps // 2)}"]
            argv += [f"--checkpoint_every={steps}"]
        return [*argv, *extra]

    quick = args.quick
    tok_export, lam_export = out / "tokenizer" / "export", out / "lam" / "export"
    episodes = ["--episodes", str(args.episodes), "--val-episodes", str(max(16, args.episodes // 10))]
    cmds: list[tuple[str, list[str]]] = [
        ("data", ["prep", "sprites", "--out", str(data), *SPRITES, *episodes, "--seed", str(args.seed), "--overwrite"]),
        ("tokenizer", fit("sprites_tokenizer.yaml", "tokenizer", data / "train", data / "val", 4 if quick else None)),
        ("LAM", fit("lam.yaml", "lam", data / "train", data / "val", 4 if quick else None)),
    ]
    for split in ("train", "val"):
        tokenize = ["prep", "tokenize", "--data", str(data / split), "--out", str(tokens / split)]
        cmds.append((f"tokenize {split}", [*tokenize, "--tokenizer", str(tok_export), "--lam", str(lam_export)]))
    frozen = [f"--model.init_args.tokenizer={tok_export}", f"--model.init_args.lam={lam_export}"]
    config = "dynamics.yaml" if args.dynamics == "maskgit" else f"dynamics_{args.dynamics}.yaml"
    cmds.append(("dynamics", fit(config, "dynamics", tokens / "train", tokens / "val", 4 if quick else None, *frozen)))
    world = out / "world"
    cmds.append(
        (
            "world",
            ["export", "world", "--tokenizer", str(tok_export), "--lam", str(lam_export)]
            + ["--dynamics", str(out / "dynamics" / "export"), "--out", str(world), "--temperature", "0"]
            # the play default `genie eval sampler` measured on this world (docs/architecture.md, "Real-time"):
            # 16 greedy steps, confidence unmasking, 39.25 dB against 38.26 for 25 steps in random order
            + ["--steps", "16", "--unmask", "confidence"],
        )
    )
    evaluate = ["eval", "world", "--world", str(world), "--data", str(data / "val"), "--clips", "16" if quick else "64"]
    cmds.append(("evaluate", [*evaluate, "--horizon", "8", "--device", "cpu"]))
    return cmds


def write_rollouts(world_dir: Path, val: Path, out: Path, steps: int = 6) -> list[Path]:
    """One GIF per latent action: the first held-out frame, then that action ``steps`` times."""
    from genie.data.loader import ClipStream
    from genie.rollout import write_video
    from genie.world import World

    world = World.from_pretrained(world_dir, seed=0)
    prompt = next(iter(ClipStream(str(val), num_frames=1, batch_size=1, train=False)))["frames"][0, 0].numpy()
    paths = []
    for a in range(world.num_actions):
        frames = [world.reset(prompt)] + [world.step(a) for _ in range(steps)]
        paths.append(write_video(np.stack(frames), out / f"action_{a}.gif", fps=4, scale=8))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--episodes", type=int, default=1500, help="training clips of sprites (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training runs")
    parser.add_argument("--quick", action="store_true", help="4 steps a stage: plumbing only")
    parser.add_argument(
        "--dynamics",
        choices=("maskgit", "causal", "diffusion"),  # conditioning.DYNAMICS_KINDS (not imported: torch at --help)
        default="maskgit",
        help="dynamics kind: maskgit (Genie's, default), causal (next token in raster order) or diffusion (diffusion "
        "forcing over code vectors); configs/tiny/dynamics_<kind>.yaml",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.cli import main

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cmds = stages(out, args)
    for i, (what, argv) in enumerate(cmds, 1):
        print(f"\n[{i}/{len(cmds) + 1}] {what}: genie {' '.join(argv)}", flush=True)
        t0 = time.time()
        code = main(argv)
        if code != 0:
            raise DemoError(f"demo stage '{what}' failed (exit {code}); rerun it alone with the command above")
        print(f"[{i}/{len(cmds) + 1}] {what} done in {time.time() - t0:.0f} s", flush=True)
    print(f"\n[{len(cmds) + 1}/{len(cmds) + 1}] rollouts: one GIF per latent action", flush=True)
    gifs = write_rollouts(out / "world", out / "data" / "val", out / "rollouts")
    report = json.loads((out / "world" / "eval" / "world_eval.json").read_text())
    minutes = (time.time() - t_start) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min. ΔtPSNR(t={report['delta_psnr_t']}) = {report['delta_psnr_t4']:+.2f} dB "
        f"(the world follows the inferred actions this much better than random ones); rollout PSNR "
        f"{report['psnr_mean']:.2f} dB vs {report['copy_psnr_mean']:.2f} for copying the prompt.\n"
        f"  eval:     {out / 'world' / 'eval' / 'world_eval.png'}\n"
        f"  rollouts: {gifs[0].parent}/action_*.gif\n"
        f"  play it:  genie play --world {out / 'world'} --data {out / 'data' / 'val'}   (then open http://127.0.0.1:8000)\n"
        f"  drive it: genie rollout --world {out / 'world'} --prompt F.png --actions 0,1,2,3 --out a.gif --scale 8\n"
        f"  in code:  genie.World.from_pretrained({str(out / 'world')!r})"
    )
    return {"delta_psnr_t4": report["delta_psnr_t4"], "minutes": minutes, "gifs": [str(g) for g in gifs]}

"""``genie eval sampler --world DIR --data SHARDS``: rollout quality against MaskGIT steps, unmasking and temperature.

Each sampler setting (every combination of ``--steps``, ``--unmask`` and ``--temperatures``) runs the same
held-out evaluation as ``genie eval world`` (same clips, same seed): mean rollout PSNR / SSIM over the horizon
and ΔtPSNR at t = 4. The reference is the best setting at the most steps (25 by default, Genie's number); the
**play default** is the setting with the fewest steps whose PSNR is within ``--tolerance`` (0.5 dB) of it (at
equal steps, the higher PSNR). A frame costs one forward of the dynamics model per step, so this is the cheapest
sampler that draws as well as the full one. ``--write`` stores it in the bundle's ``world.json``, which
``World``, ``genie play`` and ``genie rollout`` then use.

Writes ``sampler_sweep.json`` and ``sampler_sweep.png`` (PSNR against steps, a line per unmasking and
temperature) to ``--out`` (default WORLD/eval).

    genie eval sampler --world runs/demo/world --data runs/demo/data/val --clips 64 --horizon 8 --write
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from genie.eval.common import pick_device, save_figure, subplots, write_json
from genie.models.sampler import UNMASK_MODES, SamplerConfig

DEFAULT_STEPS = "1,2,4,8,16,25"


def int_list(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise ValueError(f"--steps must be a comma list of positive integers, got {text!r}")
    return values


def sweep(
    world: Any,
    shards: str,
    steps: list[int],
    unmasks: list[str],
    temperatures: list[float],
    tolerance: float = 0.5,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``world`` under every sampler setting; the rows and the play default (see the module docstring)."""
    from genie.eval.world import evaluate_world
    from genie.models.kinds import kind_of

    kind = kind_of(world.dynamics)
    if kind != "maskgit" and (len(steps) > 1 or len(unmasks) > 1):
        raise ValueError(
            f"this world's dynamics is of the {kind} kind, which has no MaskGIT steps or unmasking order to sweep: "
            "leave --steps and --unmask out, and sweep --temperatures"
        )
    base = world.sampler_config
    rows = []
    settings = list(itertools.product(unmasks, temperatures, steps))
    for i, (unmask, temperature, n) in enumerate(settings):
        world.sampler_config = dataclasses.replace(base, steps=n, unmask=unmask, temperature=temperature)
        t0 = time.perf_counter()
        report = evaluate_world(world, shards, **eval_kwargs)
        row = {
            "steps": n,
            "unmask": unmask,
            "temperature": temperature,
            "psnr": report["psnr_mean"],
            "ssim": float(np.mean(report["ssim_per_step"])),
            "delta_psnr_t4": report["delta_psnr_t4"],
            "psnr_per_step": report["psnr_per_step"],
            "eval_seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"[{i + 1}/{len(settings)}] steps {n:>2}, {unmask} unmasking, temperature {temperature:g}: PSNR "
            f"{row['psnr']:.2f} dB, ΔtPSNR(4) {row['delta_psnr_t4']:+.2f} dB",
            flush=True,
        )
    world.sampler_config = base
    most = max(steps)
    reference = max((r for r in rows if r["steps"] == most), key=lambda r: r["psnr"])
    good = [r for r in rows if r["psnr"] >= reference["psnr"] - tolerance]
    default = min(good, key=lambda r: (r["steps"], -r["psnr"]))
    return {
        "clips": report["clips"],
        "horizon": report["horizon"],
        "copy_psnr_mean": report["copy_psnr_mean"],
        "tolerance_db": tolerance,
        "reference": {k: reference[k] for k in ("steps", "unmask", "temperature", "psnr")},
        "play_default": {k: default[k] for k in ("steps", "unmask", "temperature", "psnr", "delta_psnr_t4")},
        "rows": rows,
    }


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    fig, axes = subplots(2, figsize=(10, 4))
    for key in sorted({(r["unmask"], r["temperature"]) for r in result["rows"]}):
        rows = sorted((r for r in result["rows"] if (r["unmask"], r["temperature"]) == key), key=lambda r: r["steps"])
        label = f"{key[0]}, temperature {key[1]:g}"
        axes[0, 0].plot([r["steps"] for r in rows], [r["psnr"] for r in rows], "o-", label=label)
        axes[0, 1].plot([r["steps"] for r in rows], [r["delta_psnr_t4"] for r in rows], "o-", label=label)
    ref, default = result["reference"], result["play_default"]
    axes[0, 0].axhline(ref["psnr"] - result["tolerance_db"], color="gray", ls=":", label="reference - tolerance")
    axes[0, 0].axhline(result["copy_psnr_mean"], color="gray", ls="--", label="copy last frame")
    axes[0, 0].set_title(f"play default: {default['steps']} steps ({default['unmask']}, T={default['temperature']:g})")
    for ax, name in ((axes[0, 0], "mean rollout PSNR (dB)"), (axes[0, 1], "ΔtPSNR(4) (dB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MaskGIT steps per frame")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, required=True, help="world bundle folder (genie export world)")
    parser.add_argument("--data", required=True, help="held-out video shards")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: WORLD/eval)")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of MaskGIT steps (default {DEFAULT_STEPS})")
    parser.add_argument("--unmask", default=None, help="comma list of random, confidence (default: the bundle's own)")
    parser.add_argument(
        "--temperatures", default=None, help="comma list of sampling temperatures (default: the bundle's own)"
    )
    parser.add_argument("--tolerance", type=float, default=0.5, help="dB below the reference (default 0.5)")
    parser.add_argument("--write", action="store_true", help="store the play default in the bundle's world.json")
    parser.add_argument("--clips", type=int, default=64, help="at most this many clips (default 64)")
    parser.add_argument("--context", type=int, default=1, help="prompt frames (default 1)")
    parser.add_argument("--horizon", type=int, default=8, help="steps to roll out (default 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.models.kinds import kind_of
    from genie.world import World

    world = World.from_pretrained(args.world, device=pick_device(args.device))
    own: SamplerConfig = world.sampler_config
    if args.steps == DEFAULT_STEPS and kind_of(world.dynamics) != "maskgit":
        args.steps = str(own.steps)  # a kind without MaskGIT steps: temperatures only
    unmasks = [own.unmask] if args.unmask is None else [u.strip() for u in args.unmask.split(",") if u.strip()]
    for u in unmasks:
        if u not in UNMASK_MODES:
            raise ValueError(f"--unmask takes {', '.join(UNMASK_MODES)}, got {u!r}")
    temperatures = (
        [own.temperature] if args.temperatures is None else [float(t) for t in args.temperatures.split(",") if t]
    )
    if any(t < 0 for t in temperatures):
        raise ValueError(f"--temperatures must be >= 0, got {args.temperatures!r}")
    result = sweep(
        world,
        args.data,
        int_list(args.steps),
        unmasks,
        temperatures,
        args.tolerance,
        context=args.context,
        horizon=args.horizon,
        max_clips=args.clips,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out = args.out or args.world / "eval"
    write_json(out, "sampler_sweep.json", result)
    plot_sweep(result, out / "sampler_sweep.png")
    print(f"{'steps':>5}  {'unmask':>10}  {'temp':>4}  {'PSNR':>6}  {'SSIM':>5}  {'ΔtPSNR(4)':>9}")
    for r in result["rows"]:
        print(
            f"{r['steps']:>5}  {r['unmask']:>10}  {r['temperature']:>4g}  {r['psnr']:>6.2f}  {r['ssim']:>5.3f}  "
            f"{r['delta_psnr_t4']:>+9.2f}"
        )
    ref, d = result["reference"], result["play_default"]
    print(
        f"play default: {d['steps']} steps, {d['unmask']} unmasking, temperature {d['temperature']:g} "
        f"({d['psnr']:.2f} dB, within {args.tolerance:g} dB of {ref['psnr']:.2f} at {ref['steps']} steps) -> {out}"
    )
    if args.write:
        meta_path = args.world / "world.json"
        meta = json.loads(meta_path.read_text())
        meta["sampler"] = {**meta.get("sampler", {}), **{k: d[k] for k in ("steps", "unmask", "temperature")}}
        meta_path.write_text(json.dumps(meta, indent=1))
        print(f"wrote the play default into {meta_path}")
    return result

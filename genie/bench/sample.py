"""``genie bench sample``: milliseconds per generated frame of the MaskGIT dynamics sampler.

Builds a dynamics model of the given size (random weights: speed does not depend on them), feeds
a context of ``--context`` frames, then generates ``--frames`` frames with ``--steps`` MaskGIT
steps each, with and without the KV cache of past frames.

    genie bench sample --grid 8 --width 128 --heads 4 --depth 4 --mlp 512 --codes 1024 --actions 8 \\
        --context 8 --steps 10
    genie bench sample --config configs/coinrun/dynamics.yaml     # a stage config's model; options override
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from genie.bench.report import format_table, write_report

# option -> (DynamicsConfig field, default when neither the option nor a --config gives it)
SIZE_OPTIONS = {
    "grid": ("grid_size", 8),
    "width": ("width", 128),
    "heads": ("num_heads", 4),
    "depth": ("depth", 4),
    "codes": ("num_codes", 1024),
    "actions": ("num_actions", 8),
    "window": ("num_frames", 16),
    "conditioning": ("action_conditioning", "film"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="take the model size from a dynamics stage YAML")
    parser.add_argument("--grid", type=int, default=None, help="tokens per side of a frame (default 8: 64 px / 8)")
    parser.add_argument("--width", type=int, default=None, help="default 128")
    parser.add_argument("--heads", type=int, default=None, help="default 4")
    parser.add_argument("--depth", type=int, default=None, help="default 4")
    parser.add_argument("--mlp", type=int, default=None, help="MLP hidden width (default 4 x width)")
    parser.add_argument("--codes", type=int, default=None, help="tokenizer codebook size (default 1024)")
    parser.add_argument("--actions", type=int, default=None, help="default 8")
    parser.add_argument("--window", type=int, default=None, help="temporal window = training clip length (16)")
    parser.add_argument("--context", type=int, default=8, help="prompt frames before generation")
    parser.add_argument("--frames", type=int, default=8, help="frames generated per timing")
    parser.add_argument("--steps", type=int, default=10, help="MaskGIT steps per frame")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--conditioning", default=None, choices=["film", "prepend", "add"], help="default film")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--modes", default="cache,nocache", help="comma list of cache, nocache")
    parser.add_argument("--json", default="bench_sample.json")


def time_generation(model: Any, args: argparse.Namespace, use_cache: bool, device: torch.device) -> float:
    from genie.models.sampler import MaskGITSampler, SamplerConfig

    g = torch.Generator(device=device).manual_seed(0)
    N = args.grid**2
    ctx = torch.randint(0, args.codes, (args.batch_size, args.context, N), device=device, generator=g)
    ctx_actions = torch.randint(0, args.actions, (args.batch_size, args.context - 1), device=device, generator=g)
    sampler = MaskGITSampler(model, SamplerConfig(steps=args.steps, use_cache=use_cache))
    sampler.reset(ctx, ctx_actions)
    action = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    sampler.next_frame(action, g)  # warm-up frame
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.frames):
        sampler.next_frame(action, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.frames


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.eval.common import pick_device
    from genie.models.dynamics import DynamicsConfig, DynamicsModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    fields: dict[str, Any] = {}
    if args.config:
        import yaml

        fields = dict(yaml.safe_load(open(args.config).read())["model"]["init_args"]["model"])
    for option, (field, default) in SIZE_OPTIONS.items():
        value = getattr(args, option)
        fields[field] = value if value is not None else fields.get(field, default)
        setattr(args, option, fields[field])  # time_generation reads the resolved sizes
    if args.mlp is not None:
        fields["mlp_ratio"] = args.mlp / fields["width"]
    cfg = DynamicsConfig(**fields)
    torch.manual_seed(0)
    model = DynamicsModel(cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for mode in args.modes.split(","):
        dt = time_generation(model, args, mode == "cache", device)
        rows.append(
            {
                "mode": mode,
                "device": device.type,
                "tokens": args.grid**2,
                "conditioning": cfg.action_conditioning,
                "width": args.width,
                "depth": args.depth,
                "params_M": params,
                "context": args.context,
                "steps": args.steps,
                "batch": args.batch_size,
                "ms_per_frame": dt * 1000,
                "frames_per_s": args.batch_size / dt,
            }
        )
        print(f"  {mode}: {dt * 1000:.1f} ms/frame", flush=True)
    print(
        format_table(
            rows,
            [
                "mode",
                "device",
                "tokens",
                "width",
                "depth",
                "params_M",
                "context",
                "steps",
                "batch",
                "ms_per_frame",
                "frames_per_s",
            ],
        )
    )
    if len(rows) == 2:
        print(f"cache speed-up: {rows[1]['ms_per_frame'] / rows[0]['ms_per_frame']:.2f}x")
    report = write_report(args.json, "sample", rows)
    print(f"wrote {args.json}")
    return report

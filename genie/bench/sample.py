"""``genie bench sample``: milliseconds per generated frame, end to end through a world or of the sampler alone.

With ``--world DIR`` it times what a player waits for: :meth:`World.step` end to end (every MaskGIT step, the
tokenizer's decode of the new frame, the copy to a uint8 host array) at batch 1, and frames/s with
``--batch-size`` worlds stepped together (:meth:`World.advance`); then the world's dynamics model alone
(:meth:`MaskGITSampler.next_frame`) as a second line. ``--modes`` (default ``eager,compiled``) times the eager step
and the compiled one (:attr:`SamplerConfig.compile`: one ``torch.compile`` graph for every refinement step over the
ring KV cache; the compile, in the first step, is reported apart and not timed).

    genie bench sample --world runs/demo/world       # eager and compiled, the world's own sampler settings
    genie bench sample --world runs/demo/world --modes eager,compiled --steps 8 --batch-size 8
    genie bench sample --world configs/coinrun --device cuda --modes eager,compiled   # untrained, CoinRun size

Without ``--world`` it builds a dynamics model of the given size (random weights: speed does not depend on them), feeds
a context of ``--context`` frames, then generates ``--frames`` frames with ``--steps`` MaskGIT
steps each, with and without the KV cache of past frames.

    genie bench sample --grid 8 --width 128 --heads 4 --depth 4 --mlp 512 --codes 1024 --actions 8 \\
        --context 8 --steps 10
    genie bench sample --config configs/coinrun/dynamics.yaml     # a stage config's model; options override
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
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
    "kind": ("kind", "maskgit"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world",
        default=None,
        help="time World.step end to end on this world bundle, or on an untrained world of a folder of stage configs "
        "(tokenizer.yaml, lam.yaml, dynamics.yaml, e.g. configs/coinrun)",
    )
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
    parser.add_argument("--steps", type=int, default=None, help="MaskGIT steps per frame (10; a world: its own)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences stepped together (1; a world: 8)")
    parser.add_argument("--conditioning", default=None, choices=["film", "prepend", "add"], help="default film")
    parser.add_argument(
        "--kind",
        default=None,
        choices=["maskgit", "causal"],
        help="dynamics kind (default maskgit; causal: cache only)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument(
        "--modes",
        default=None,
        help="comma list of cache, nocache (default both); with --world: eager, compiled (default both)",
    )
    parser.add_argument("--json", default="bench_sample.json")


def time_generation(
    model: Any, args: argparse.Namespace, use_cache: bool, device: torch.device, config: Any = None
) -> float:
    """Seconds per frame of the kind's ``sampler.next_frame`` (``config``: the sampler settings, else defaults)."""
    import dataclasses

    from genie.models.kinds import kind_of, make_sampler
    from genie.models.sampler import SamplerConfig

    g = torch.Generator(device=device).manual_seed(0)
    N = args.grid**2
    ctx = torch.randint(0, args.codes, (args.batch_size, args.context, N), device=device, generator=g)
    if kind_of(model) == "diffusion":  # code vectors, not ids
        Z = model.config.code_dim
        ctx = torch.nn.functional.normalize(torch.randn(*ctx.shape, Z, device=device, generator=g), dim=-1)
    ctx_actions = torch.randint(0, args.actions, (args.batch_size, args.context - 1), device=device, generator=g)
    base = SamplerConfig() if config is None else config
    sampler = make_sampler(model, dataclasses.replace(base, steps=args.steps, use_cache=use_cache))
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_world(world: Any, batch: int, frames: int, warmup: int) -> tuple[float, float]:
    """Seconds per step of ``batch`` worlds stepped together (uint8 frames on the host), and seconds of the first
    step after the first reset (compilation, when asked for). Batch 1 goes through :meth:`World.step`."""
    S, A = world.image_size, world.num_actions
    prompt = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 1, S, S, 3), dtype=np.uint8))
    actions = [torch.arange(batch) % A + f for f in range(frames + warmup)]  # every action, in turn
    t0 = time.perf_counter()
    if batch == 1:
        world.reset(prompt[0])
        world.step(0)
    else:
        world.begin(prompt.to(world.device))
        world.advance(actions[0].to(world.device) % A)
    first = time.perf_counter() - t0

    def step(f: int) -> np.ndarray:  # uint8 numpy frames: the host copy is part of the step
        return world.step(f % A) if batch == 1 else world.advance(actions[f].to(world.device) % A)

    for f in range(warmup):
        step(f)
    synchronize(world.device)
    t0 = time.perf_counter()
    for f in range(warmup, warmup + frames):
        frame = step(f)
    assert frame.dtype == np.uint8
    return (time.perf_counter() - t0) / frames, first


def untrained_world(folder: Path, device: torch.device) -> Any:
    """A world of random weights from a folder of stage configs (``tokenizer.yaml``, ``lam.yaml``,
    ``dynamics.yaml``, e.g. ``configs/coinrun``): its speed is a trained one's, with nothing trained."""
    import yaml

    from genie.models.kinds import build_dynamics, dynamics_config
    from genie.models.lam import LAMConfig, LatentActionModel
    from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
    from genie.world import World

    parts = []
    for name, config_cls, model_cls in (
        ("tokenizer", TokenizerConfig, VideoTokenizer),
        ("lam", LAMConfig, LatentActionModel),
        ("dynamics", lambda **fields: dynamics_config(fields), build_dynamics),  # any kind: the yaml's model.kind
    ):
        path = folder / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(
                f"--world {folder}: neither a world bundle (world.json) nor a folder of stage configs "
                f"({name}.yaml is missing)"
            )
        torch.manual_seed(0)
        parts.append(model_cls(config_cls(**yaml.safe_load(path.read_text())["model"]["init_args"]["model"])))
    return World(*parts, device=device, seed=0)


def run_world(args: argparse.Namespace) -> dict[str, Any]:
    """``--world``: World.step end to end (batch 1 and a batch), then the sampler alone; one row each."""
    import dataclasses

    from genie.eval.common import pick_device
    from genie.world import World

    device = pick_device(args.device)
    folder = Path(args.world)
    if (folder / "world.json").is_file():
        base = World.from_pretrained(folder, device=device, seed=0)
    else:  # stage configs: untrained parts of the configured sizes
        base = untrained_world(folder, device)
    sampler = base.sampler_config
    if args.steps is not None:
        sampler = dataclasses.replace(sampler, steps=args.steps)
    batch = 8 if args.batch_size is None else args.batch_size
    cfg = base.dynamics.config
    params = sum(p.numel() for m in (base.tokenizer, base.dynamics) for p in m.parameters()) / 1e6
    rows = []
    from genie.models.kinds import kind_of

    kind = kind_of(base.dynamics)
    for mode in (args.modes or ("eager,compiled" if kind == "maskgit" else "eager")).split(","):
        if mode not in ("eager", "compiled"):
            raise ValueError(f"--modes with --world takes eager and compiled, got {mode!r}")
        config = dataclasses.replace(sampler, compile=mode == "compiled")
        for b, what in ((1, "world.step"), (batch, f"world x{batch}")):
            world = World(base.tokenizer, base.lam, base.dynamics, config, device, seed=0)
            dt, first = time_world(world, b, args.frames, warmup=3)
            rows.append({"what": what, "mode": mode, "batch": b, "ms_per_step": dt * 1000, "frames_per_s": b / dt})
            rows[-1]["first_step_s"] = first
            print(f"  {what} ({mode}): {dt * 1000:.1f} ms per step, {b / dt:.1f} frames/s", flush=True)
        if mode == "eager":  # the dynamics model alone, as without --world
            args.grid, args.codes, args.actions, args.batch_size = cfg.grid_size, cfg.num_codes, cfg.num_actions, 1
            args.context, args.steps = 1, config.steps
            dt = time_generation(base.dynamics, args, True, device, config)
            rows.append({"what": "dynamics only", "mode": mode, "batch": 1, "ms_per_step": dt * 1000})
            rows[-1]["frames_per_s"] = 1 / dt
    for row in rows:
        # sequential model calls a frame: refinement or denoising steps, or one per token for the causal kind
        steps = cfg.tokens_per_frame if kind == "causal" else sampler.steps
        row.update(device=device.type, steps=steps, tokens=cfg.tokens_per_frame, params_M=params)
        row.update(image=base.image_size, temperature=sampler.temperature, unmask=sampler.unmask)
    print(
        f"world {args.world}: {base.image_size} px, {cfg.tokens_per_frame} tokens a frame, {kind} dynamics, tokenizer "
        f"+ dynamics {params:.2f} M parameters, "
        + {"maskgit": f"{sampler.steps} MaskGIT steps ({sampler.unmask} unmasking, ", "causal": "token by token ("}.get(
            kind, f"{sampler.steps} denoising steps ("
        )
        + f"temperature {sampler.temperature})"
    )
    columns = ["what", "mode", "device", "batch", "steps", "ms_per_step", "frames_per_s", "first_step_s"]
    print(format_table(rows, columns))
    report = write_report(args.json, "sample", rows)
    print(f"wrote {args.json}")
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.eval.common import pick_device
    from genie.models.kinds import build_dynamics, dynamics_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.world:
        return run_world(args)
    args.steps = 10 if args.steps is None else args.steps
    args.batch_size = 1 if args.batch_size is None else args.batch_size
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
    cfg = dynamics_config(fields)
    torch.manual_seed(0)
    model = build_dynamics(cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for mode in (args.modes or ("cache,nocache" if cfg.kind == "maskgit" else "cache")).split(","):
        dt = time_generation(model, args, mode == "cache", device)
        rows.append(
            {
                "mode": mode,
                "kind": cfg.kind,
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
                "kind",
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

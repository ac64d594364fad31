"""``genie bench train --stage tokenizer|lam|dynamics --config ...``: training-step speed of a stage's model.

Times full optimizer steps (forward, backward, gradient clipping, AdamW) on synthetic uint8 clips,
so the number is the model's, not the loader's (``genie bench data`` measures that). Model sizes
come from the stage config and can be overridden, so a reference configuration can be run exactly:

    genie bench train --stage tokenizer --image-size 64 --frames 8 --batch-size 8 --patch 8 \\
        --width 128 --heads 4 --depth 4 --mlp 512 --codes 1024 --precision bf16

Reports seconds per step, samples/s, tokens/s, achieved FLOP/s (counted with
``torch.utils.flop_counter``), model FLOPs utilization on GPU, and peak memory.

The dynamics stage is timed twice: on token shards' batches (``inputs=tokens``: the dynamics model
alone) and on video batches (``inputs=frames``: the frozen tokenizer and LAM run first), which is the
speed-up ``genie prep tokenize`` buys. Where the config's tokenizer/LAM exports do not exist, untrained
stand-ins are built from the ``tokenizer.yaml`` and ``lam.yaml`` next to the dynamics config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from genie.bench.report import format_table, write_report

ROOT = Path(__file__).resolve().parents[2]

# Dense bf16 tensor-core peak (FLOP/s) for MFU; matched on the device name.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def _count_onednn_flops() -> None:
    """Teach torch's FLOP counter oneDNN's inner product, which the CPU fast path calls
    (genie/models/cpu_ops.py); once per process."""
    from torch.utils.flop_counter import register_flop_formula

    def flops(x_shape, w_shape, *args, **kwargs) -> int:
        rows = math.prod(x_shape[:-1])
        return 2 * rows * x_shape[-1] * w_shape[0]  # (M, I) @ (I, O)

    with contextlib.suppress(RuntimeError):  # "duplicate registrations": counted already
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(flops)


def default_config(stage: str) -> Path:
    return ROOT / "configs" / "tiny" / f"{stage}.yaml"


def apply_overrides(model: dict[str, Any], fields: set[str], args: argparse.Namespace) -> dict[str, Any]:
    """Map the benchmark's size options onto the stage's model config ``fields`` (those it has)."""
    m = dict(model)
    wanted = {
        "image_size": args.image_size,
        "patch_size": args.patch,
        "num_frames": args.frames,
        "width": args.width,
        "num_heads": args.heads,
        "num_codes": args.codes,
        "num_actions": args.actions,
        "encoder_depth": args.depth,
        "decoder_depth": args.depth,
        "depth": args.depth,
    }
    if args.image_size is not None and args.patch is not None:
        wanted["grid_size"] = args.image_size // args.patch  # the dynamics model sees the tokenizer's grid
    m.update({k: v for k, v in wanted.items() if v is not None and k in fields})
    if args.mlp is not None:
        m["mlp_ratio"] = args.mlp / m.get("width", 512)
    return m


def build_stage(config: Path, stage: str, args: argparse.Namespace) -> Any:
    cfg = yaml.safe_load(Path(config).read_text())
    model_cfg = cfg["model"]
    class_path = model_cfg["class_path"]
    module_name, _, cls_name = class_path.rpartition(".")
    if stage not in module_name:
        raise SystemExit(f"error: {config} trains {class_path}, not the {stage} stage")
    cls = getattr(importlib.import_module(module_name), cls_name)
    init = dict(model_cfg.get("init_args", {}))
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    init["model"] = apply_overrides(init.get("model", {}), fields, args)
    if stage == "dynamics":
        init["tokenizer"], init["lam"] = frozen_parts(Path(config), init)
    return cls(**init), cfg


def frozen_parts(config: Path, init: dict[str, Any]) -> tuple[str, str]:
    """The dynamics config's tokenizer and LAM folders, or untrained stand-ins of the sizes beside it."""
    import tempfile

    from genie.models.lam import LAMConfig, LatentActionModel
    from genie.models.tokenizer import TokenizerConfig, VideoTokenizer

    tok, lam = Path(init.get("tokenizer", "")), Path(init.get("lam", ""))
    if (tok / "config.json").is_file() and (lam / "config.json").is_file():
        return str(tok), str(lam)
    dyn = init["model"]
    root = Path(tempfile.mkdtemp(prefix="genie_bench_"))

    def sizes(name: str) -> dict[str, Any]:
        path = config.parent / f"{name}.yaml"
        if not path.is_file():
            path = config.parent / f"sprites_{name}.yaml"
        return dict(yaml.safe_load(path.read_text())["model"]["init_args"]["model"]) if path.is_file() else {}

    t = sizes("tokenizer")
    patch = t.get("patch_size", 4)
    t.update(image_size=dyn["grid_size"] * patch, num_codes=dyn["num_codes"])
    VideoTokenizer(TokenizerConfig(**t)).save_pretrained(root / "tokenizer")
    la = sizes("lam")
    la.update(image_size=t["image_size"], num_actions=dyn["num_actions"])
    if la["image_size"] % la.get("patch_size", 16):
        la["patch_size"] = patch
    LatentActionModel(LAMConfig(**la)).save_pretrained(root / "lam")
    return str(root / "tokenizer"), str(root / "lam")


def bench_one(
    stage_mod: Any,
    batch_size: int,
    frames: int,
    steps: int,
    warmup: int,
    precision: str,
    device: torch.device,
    compile_model: bool,
    inputs: str = "frames",
) -> dict[str, Any]:
    net = stage_mod.net.to(device).train()
    cfg = net.config
    image_size = getattr(cfg, "image_size", None) or stage_mod.expected_resolution()
    fused = device.type in ("cuda", "cpu")  # as the stages do (OptimConfig.fused)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused)
    step_fn = stage_mod.training_loss
    g = torch.Generator().manual_seed(0)
    if inputs == "tokens":  # a token-shard batch (genie prep tokenize): the dynamics model alone
        grid = (batch_size, frames, cfg.grid_size, cfg.grid_size)
        batch = {
            "tokens": torch.randint(0, cfg.num_codes, grid, generator=g).to(device),
            "latent_actions": torch.randint(0, cfg.num_actions, (batch_size, frames - 1), generator=g).to(device),
        }
    else:
        shape = (batch_size, frames, image_size, image_size, 3)
        batch = {"frames": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)}
    if hasattr(stage_mod, "frozen"):
        stage_mod.frozen.load(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def one_step() -> None:
        with autocast:
            loss = step_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs of one eager step. Before compiling: a dispatch mode around compiled blocks makes dynamo recompile
    # each one, and past its cache limit it falls back to eager for good (seen on an H200: --compile then timed
    # exactly the eager step)
    _count_onednn_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        one_step()
    flops = counter.get_total_flops()
    if compile_model:  # as `genie fit --compile true`: every ST block compiled
        stage_mod.compile_blocks()
    for _ in range(warmup):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    tokens_per_frame = cfg.grid_size**2 if hasattr(cfg, "grid_size") else (cfg.image_size // cfg.patch_size) ** 2
    row: dict[str, Any] = {
        "inputs": inputs,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "precision": precision,
        "s_per_step": dt,
        "samples_per_s": batch_size / dt,
        "tokens_per_s": batch_size * frames * tokens_per_frame / dt,
        "GFLOP_per_step": flops / 1e9,
        "TFLOP_per_s": flops / dt / 1e12,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if peak:
            row["mfu"] = flops / dt / peak
        row["peak_gpu_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=["tokenizer", "lam", "dynamics"], help="which stage")
    parser.add_argument("--config", type=Path, default=None, help="stage config (default configs/tiny/STAGE.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default: the config's)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the config's)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--patch", type=int, default=None, help="patch size")
    parser.add_argument("--width", type=int, default=None, help="transformer width D")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="ST blocks (per encoder and decoder)")
    parser.add_argument("--mlp", type=int, default=None, help="MLP hidden width")
    parser.add_argument("--codes", type=int, default=None, help="tokenizer codebook size")
    parser.add_argument("--actions", type=int, default=None, help="number of latent actions")
    parser.add_argument("--precision", default="both", choices=["32", "bf16", "both"], help="fp32, bf16 autocast")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the ST blocks (as genie fit --compile)")
    parser.add_argument("--json", default="bench_train.json", help="where to write the JSON report")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.eval.common import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = args.config or default_config(args.stage)
    precisions = ["32", "bf16"] if args.precision == "both" else [args.precision]
    rows = []
    input_modes = ["tokens", "frames"] if args.stage == "dynamics" else ["frames"]
    for precision in precisions:
        for inputs in input_modes:
            torch.manual_seed(0)
            stage_mod, cfg = build_stage(config, args.stage, args)
            data = cfg.get("data", {})
            batch_size = args.batch_size or data.get("batch_size", 8)
            frames = args.frames or data.get("num_frames", stage_mod.net.config.num_frames)
            row = bench_one(
                stage_mod, batch_size, frames, args.steps, args.warmup, precision, device, args.compile, inputs
            )
            c = stage_mod.net.config
            rows.append(
                {
                    "stage": args.stage,
                    "device": device.type,
                    "batch": batch_size,
                    "frames": frames,
                    "image": getattr(c, "image_size", None) or stage_mod.expected_resolution(),
                    "patch": getattr(c, "patch_size", "-"),
                    "width": c.width,
                    **row,
                }
            )
            print(f"  {args.stage} {precision} ({inputs}): {row['s_per_step']:.3f} s/step", flush=True)
            del stage_mod
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    for r in rows:
        r["peak_rss_GiB"] = peak_rss_gib
    cols = [
        "stage",
        "inputs",
        "precision",
        "batch",
        "frames",
        "image",
        "patch",
        "width",
        "params_M",
        "s_per_step",
        "samples_per_s",
        "tokens_per_s",
        "TFLOP_per_s",
        "peak_rss_GiB",
    ]
    if device.type == "cuda":
        cols += ["mfu", "peak_gpu_mem_GiB"]
    print(format_table(rows, cols))
    report = write_report(args.json, "train", rows, config=str(config), argv=sys.argv[1:])
    print(f"wrote {args.json}")
    return report

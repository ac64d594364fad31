"""``genie export``: a stage's Lightning checkpoint -> a Hugging Face-layout model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", type=Path, help="Lightning checkpoint written by `genie fit` (e.g. .../last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for config.json + model.safetensors")


def run(args: argparse.Namespace) -> Path:
    from genie.stages.base import load_stage_checkpoint

    if not args.ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
    stage = load_stage_checkpoint(args.ckpt)
    out = stage.export(args.out)
    print(f"exported {type(stage.net).__name__} ({stage.count_parameters(stage.net):,} parameters) to {out}")
    return out

"""``genie export world``: three exported models -> one world bundle folder (see :mod:`genie.world`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from genie.models.sampler import SamplerConfig


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """MaskGIT sampling options shared by every command that generates frames."""
    d = SamplerConfig()
    parser.add_argument("--steps", type=int, default=d.steps, help=f"MaskGIT steps per frame (default {d.steps})")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (0: greedy)")
    parser.add_argument("--unmask", choices=("random", "confidence"), default=d.unmask, help="which tokens to fix")


def sampler_from(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(steps=args.steps, temperature=args.temperature, unmask=args.unmask)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, required=True, help="exported tokenizer folder")
    parser.add_argument("--lam", type=Path, required=True, help="exported LAM folder")
    parser.add_argument("--dynamics", type=Path, required=True, help="exported dynamics folder")
    parser.add_argument("--out", type=Path, required=True, help="the world bundle folder to write")
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    from genie.world import write_bundle

    out = write_bundle(args.out, args.tokenizer, args.lam, args.dynamics, sampler_from(args))
    print(f"world bundle written to {out} (load it with genie.World.from_pretrained({str(out)!r}))")
    return out

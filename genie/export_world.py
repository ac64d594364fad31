"""``genie export world``: three exported models -> one world bundle folder (see :mod:`genie.world`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from genie.models.sampler import SamplerConfig


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """MaskGIT sampling options shared by every command that generates frames (unset: the bundle's own)."""
    d = SamplerConfig()
    parser.add_argument("--steps", type=int, default=None, help=f"MaskGIT steps per frame (default {d.steps})")
    parser.add_argument(
        "--temperature", type=float, default=None, help=f"sampling temperature, 0: greedy (default {d.temperature})"
    )
    parser.add_argument("--unmask", choices=("random", "confidence"), default=None, help=f"default {d.unmask}")
    parser.add_argument(
        "--keep-pixels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep a patch's pixels while its token does not change, decoding only the patches that do "
        f"(--no-keep-pixels: decode every patch; default {d.keep_pixels})",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile each MaskGIT step and the frame's decode (CUDA: CUDA graphs); seconds to compile once",
    )


def sampler_from(args: argparse.Namespace, base: SamplerConfig | None = None) -> SamplerConfig:
    """``base`` (default: SamplerConfig()) with the sampling options that were given on the command line."""
    keys = ("steps", "temperature", "unmask", "keep_pixels", "compile")
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return dataclasses.replace(base or SamplerConfig(), **given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, required=True, help="exported tokenizer folder")
    parser.add_argument(
        "--lam",
        type=Path,
        default=None,
        help="exported LAM folder (default: DYNAMICS/lam, where a dynamics stage that trained its LAM jointly put it)",
    )
    parser.add_argument("--dynamics", type=Path, required=True, help="exported dynamics folder")
    parser.add_argument("--adapter", type=Path, default=None, help="optional exported action adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="the world bundle folder to write")
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    from genie.world import JOINT_LAM, joint_lam, write_bundle

    lam = args.lam or joint_lam(args.dynamics)
    if lam is None:
        raise ValueError(f"pass --lam: {args.dynamics} has no jointly trained LAM in {args.dynamics / JOINT_LAM}")
    out = write_bundle(args.out, args.tokenizer, lam, args.dynamics, sampler_from(args), args.adapter)
    print(f"world bundle written to {out} (load it with genie.World.from_pretrained({str(out)!r}))")
    return out

"""Pieces every ``genie eval`` command shares: devices, model folders, held-out streams, reports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TypeVar

import torch

from genie.data.loader import ClipStream, DataError

M = TypeVar("M")


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cls: type[M], path: Path) -> M:
    """Load an exported HF-layout model folder, with a clear error when it is not one."""
    if not (Path(path) / "config.json").is_file():
        raise DataError(f"{path} is not an exported model folder (no config.json); run `genie export` first")
    return cls.from_pretrained(path)  # type: ignore[attr-defined]


def heldout_stream(
    shards: str, num_frames: int, batch_size: int, resolution: int, max_clips: int, require_actions: bool = False
) -> ClipStream:
    """The fixed, deterministic clip set of ``shards`` (one process reads all of it)."""
    return ClipStream(
        shards,
        num_frames=num_frames,
        batch_size=batch_size,
        train=False,
        resolution=resolution,
        max_clips=max_clips,
        rank=0,
        world_size=1,
        require_actions=require_actions,
    )


def add_common_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model", type=Path, required=True, help=f"exported {what} folder (config.json + safetensors)")
    parser.add_argument("--data", required=True, help="held-out shards: folder, brace pattern or pipe: URL")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: MODEL/eval)")
    parser.add_argument("--clips", type=int, default=256, help="at most this many clips")
    parser.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def subplots(ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure with one row of ``ncols`` axes (array of shape (1, ncols)), headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize, squeeze=False)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a figure from :func:`subplots`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(out: Path, name: str, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(report, indent=1))
    return path

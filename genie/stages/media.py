"""Pictures and videos of what a stage is doing, for wandb and for eval reports."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from genie.data.video import encode_clip


def to_uint8(frames: Tensor | np.ndarray) -> np.ndarray:
    """float [0, 1] or uint8 frames (any leading dims, channels last) -> uint8 numpy."""
    if isinstance(frames, Tensor):
        frames = frames.detach().cpu()
        if frames.dtype != torch.uint8:
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return frames.numpy()
    if frames.dtype != np.uint8:
        return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def side_by_side(*videos_BTHWC: Tensor | np.ndarray, max_clips: int = 4, gap: int = 2) -> np.ndarray:
    """Videos of equal shape -> one video (T, H', W', C): clips as rows, the given videos as columns."""
    vids = [to_uint8(v)[:max_clips] for v in videos_BTHWC]
    b, t, h, w, c = vids[0].shape
    out = np.full((t, b * (h + gap) - gap, len(vids) * (w + gap) - gap, c), 255, np.uint8)
    for j, v in enumerate(vids):
        for i in range(b):
            out[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = v[i]
    return out


def frame_grid(rows_RTHWC: np.ndarray, gap: int = 2) -> np.ndarray:
    """Rows of frames (R, T, H, W, C) uint8 -> one image, rows stacked, frames left to right."""
    r, t, h, w, c = rows_RTHWC.shape
    padded = np.full((r, t, h + gap, w + gap, c), 255, np.uint8)
    padded[:, :, :h, :w] = rows_RTHWC
    return rearrange(padded, "r t h w c -> (r h) (t w) c")[: r * (h + gap) - gap, : t * (w + gap) - gap]


def save_png(image_HWC: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    from PIL import Image

    img = Image.fromarray(image_HWC)
    if scale > 1:  # nearest neighbour keeps pixel art crisp
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def even(video_THWC: np.ndarray) -> np.ndarray:
    """Pad to even height/width (H.264 yuv420p needs it)."""
    t, h, w, c = video_THWC.shape
    return np.pad(video_THWC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def log_video(logger: Any, key: str, video_THWC: np.ndarray, step: int, fps: float = 8.0) -> bool:
    """Log a video to a wandb logger (mp4 written by us: no moviepy needed). False if not wandb."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return False
    import wandb

    folder = Path(logger.save_dir or tempfile.gettempdir()) / "media"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key.replace('/', '_')}_{step:08d}.mp4"
    scale = max(1, 256 // max(1, min(video_THWC.shape[1:3])))  # pixel art at 64 px is too small to see
    if scale > 1:
        video_THWC = video_THWC.repeat(scale, axis=1).repeat(scale, axis=2)
    path.write_bytes(encode_clip(even(video_THWC), fps))
    logger.experiment.log({key: wandb.Video(str(path), format="mp4"), "trainer/global_step": step})
    return True

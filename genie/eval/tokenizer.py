"""``genie eval tokenizer --model DIR --data SHARDS``: reconstruction quality on held-out clips.

Reports PSNR and SSIM (per clip, averaged over frames, then over clips), codebook usage and
perplexity over all tokens, and a trivial baseline (each clip's mean frame) so a number can be
read at a glance. Writes ``tokenizer_eval.json`` and ``tokenizer_eval.png`` (originals over
reconstructions).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genie.data.loader import DataError
from genie.eval.common import add_common_arguments, heldout_stream, load_model, pick_device, write_json
from genie.eval.metrics import codebook_stats, frame_psnr, frame_ssim
from genie.stages.media import frame_grid, save_png, to_uint8


@torch.no_grad()
def evaluate_tokenizer(
    model: Any,
    shards: str,
    num_frames: int | None = None,
    max_clips: int = 256,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Evaluate a :class:`~genie.models.tokenizer.VideoTokenizer` on the clips of ``shards``.

    Returns the metrics dict and a uint8 image of the first clips (originals over reconstructions).
    """
    cfg = model.config
    num_frames = num_frames or cfg.num_frames
    device = torch.device(device)
    model.to(device).eval()
    stream = heldout_stream(shards, num_frames, batch_size, cfg.image_size, max_clips)
    psnr, ssim, base_psnr, colour_psnr = [], [], [], []
    counts = torch.zeros(cfg.num_codes, dtype=torch.long)
    picture = None
    skipped = 0
    bar = tqdm(total=max_clips, desc="eval tokenizer", unit="clip", dynamic_ncols=True)
    for batch in stream:
        frames = batch["frames"].to(device)  # (B, T, H, W, C) uint8
        ids = model.encode(frames)  # (B, T, h, w)
        recon = model.decode(ids)  # (B, T, H, W, C) float [0, 1]
        counts += torch.bincount(ids.flatten().cpu(), minlength=cfg.num_codes)
        psnr.append(frame_psnr(recon, frames).mean(1).cpu())
        ssim.append(frame_ssim(recon, frames).mean(1).cpu())
        # trivial baselines: each clip's mean frame (strong on static cameras), each frame's mean colour
        mean_frame = frames.float().mean(1, keepdim=True).expand_as(frames) / 255.0
        base_psnr.append(frame_psnr(mean_frame, frames).mean(1).cpu())
        mean_colour = frames.float().mean((2, 3), keepdim=True).expand_as(frames) / 255.0
        colour_psnr.append(frame_psnr(mean_colour, frames).mean(1).cpu())
        if picture is None:
            n = min(4, frames.shape[0])
            rows = np.stack([r for i in range(n) for r in (to_uint8(frames[i]), to_uint8(recon[i]))])
            picture = frame_grid(rows)
        skipped = int(batch["skipped"])
        bar.update(frames.shape[0])
    bar.close()
    if not psnr:
        raise DataError(f"no readable {cfg.image_size}x{cfg.image_size} clips of {num_frames}+ frames in {shards}")
    p, s, b = torch.cat(psnr), torch.cat(ssim), torch.cat(base_psnr)
    metrics = {
        "clips": len(p),
        "num_frames": num_frames,
        "psnr": float(p.mean()),
        "psnr_std": float(p.std()) if len(p) > 1 else 0.0,
        "ssim": float(s.mean()),
        "baseline_mean_frame_psnr": float(b.mean()),
        "baseline_mean_colour_psnr": float(torch.cat(colour_psnr).mean()),
        **codebook_stats(counts),
        "num_codes": cfg.num_codes,
        "skipped_samples": skipped,
    }
    return metrics, picture


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "tokenizer")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.models.tokenizer import VideoTokenizer

    model = load_model(VideoTokenizer, args.model)
    metrics, picture = evaluate_tokenizer(
        model, args.data, args.num_frames, args.clips, args.batch_size, pick_device(args.device)
    )
    out = args.out or args.model / "eval"
    write_json(out, "tokenizer_eval.json", metrics)
    if picture is not None:
        save_png(picture, out / "tokenizer_eval.png", scale=2)
    print(
        f"PSNR {metrics['psnr']:.2f} dB (mean-frame baseline {metrics['baseline_mean_frame_psnr']:.2f}), "
        f"SSIM {metrics['ssim']:.3f}, codebook usage {metrics['usage']:.1%} "
        f"({metrics['codes_used']}/{metrics['num_codes']}), perplexity {metrics['perplexity']:.1f} "
        f"on {metrics['clips']} clips -> {out}"
    )
    return metrics

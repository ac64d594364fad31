"""What a fixed-rate patch code can reconstruct: k-means on raw pixel patches, scored on held-out frames.

The bound a tokenizer with one token of V codes per P x P patch should beat (docs/architecture.md, the pixel
codebook). Usage:

    python scripts/patch_kmeans.py --train data/coinrun_speedrun/train --val data/coinrun_speedrun/val \\
        --patch 4 --codes 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from einops import rearrange

from genie.data.loader import ClipStream
from genie.eval.metrics import frame_psnr
from genie.models.quantizer import kmeans


def patches(frames_BTHWC: torch.Tensor, P: int) -> torch.Tensor:
    """uint8 frames (B, T, H, W, C) -> (B*T*h*w, P*P*C) float patches in [-1, 1]."""
    return rearrange(frames_BTHWC.float() / 127.5 - 1, "b t (h p) (w q) c -> (b t h w) (p q c)", p=P, q=P)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training shards (folder)")
    parser.add_argument("--val", required=True, help="held-out shards (folder)")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=200_000, help="training patches to cluster")
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    stream = iter(ClipStream(args.train, num_frames=4, batch_size=64, train=True, seed=args.seed, shuffle_buffer=256))
    rows, have = [], 0
    while have < args.samples:
        rows.append(patches(next(stream)["frames"], args.patch))
        have += len(rows[-1])
    x_MX = torch.cat(rows)
    x_MX = x_MX[torch.randperm(len(x_MX))[: args.samples]]
    centroids_VX = kmeans(x_MX, args.codes, args.iters)
    val = next(iter(ClipStream(args.val, num_frames=4, batch_size=64, train=False)))["frames"]
    B, T, H, W, _ = val.shape
    g = H // args.patch
    recon_MX = centroids_VX[torch.cdist(patches(val, args.patch), centroids_VX).argmin(1)].clamp(-1, 1)
    pattern = "(b t h w) (p q c) -> b t (h p) (w q) c"
    recon = rearrange((recon_MX + 1) / 2, pattern, b=B, t=T, h=g, p=args.patch, q=args.patch)
    psnr = float(frame_psnr(recon, val).mean())
    seconds = time.monotonic() - t0
    print(f"k-means, patch {args.patch}, {args.codes} codes: {psnr:.2f} dB on {B * T} held-out frames, {seconds:.0f} s")


if __name__ == "__main__":
    main()

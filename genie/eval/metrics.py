"""Image metrics on video tensors, per frame. torchmetrics does the maths; we do the shapes.

Inputs are float frames in [0, 1] shaped (B, T, H, W, C), or uint8 (converted).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

MAX_PSNR = 100.0


def to_unit(frames: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def frame_psnr(pred_BTHWC: Tensor, target_BTHWC: Tensor) -> Tensor:
    """PSNR in dB of every frame, (B, T). Data range 1; capped at ``MAX_PSNR`` for identical frames."""
    p, t = to_unit(pred_BTHWC), to_unit(target_BTHWC)
    b = p.shape[0]
    psnr = peak_signal_noise_ratio(
        rearrange(p, "b t h w c -> (b t) c h w"),
        rearrange(t, "b t h w c -> (b t) c h w"),
        data_range=1.0,
        reduction="none",
        dim=(1, 2, 3),
    )
    # identical frames have infinite PSNR; cap so that averages stay finite (100 dB ~ MSE 1e-10)
    return rearrange(psnr.clamp(max=MAX_PSNR), "(b t) -> b t", b=b)


def frame_ssim(pred_BTHWC: Tensor, target_BTHWC: Tensor) -> Tensor:
    """SSIM of every frame, (B, T) (Gaussian window 11, as in the SSIM paper). Data range 1."""
    p, t = to_unit(pred_BTHWC), to_unit(target_BTHWC)
    b = p.shape[0]
    ssim = structural_similarity_index_measure(
        rearrange(p, "b t h w c -> (b t) c h w"),
        rearrange(t, "b t h w c -> (b t) c h w"),
        data_range=1.0,
        reduction="none",
    )
    return rearrange(ssim, "(b t) -> b t", b=b)


def codebook_stats(counts_V: Tensor) -> dict[str, float]:
    """Usage (fraction of codes ever used) and perplexity of a histogram of code ids."""
    total = counts_V.sum().clamp_min(1)
    p = counts_V.float() / total
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {
        "usage": float((counts_V > 0).float().mean()),
        "codes_used": int((counts_V > 0).sum()),
        "perplexity": float(torch.exp(entropy)),
    }


def contingency(pred: Tensor, true: Tensor, num_pred: int, num_true: int) -> Tensor:
    """(num_pred, num_true) long table counting each (pred, true) pair of two equal-shape id tensors."""
    flat = pred.flatten().long() * num_true + true.flatten().long()
    return torch.bincount(flat, minlength=num_pred * num_true).reshape(num_pred, num_true)


def nmi_from_contingency(table: Tensor) -> float:
    """Normalized mutual information (arithmetic-mean normalisation, as scikit-learn's default).

    Works from counts so it can be accumulated batch by batch and summed across ranks.
    1 = the two labelings determine each other, 0 = independent (or one of them constant).
    """
    n = table.sum()
    if n == 0:
        return 0.0
    p_xy = table.double() / n
    p_x, p_y = p_xy.sum(1), p_xy.sum(0)
    nz = p_xy > 0
    mi = (p_xy[nz] * torch.log(p_xy[nz] / (p_x[:, None] * p_y[None, :])[nz])).sum()
    h_x = -(p_x[p_x > 0] * torch.log(p_x[p_x > 0])).sum()
    h_y = -(p_y[p_y > 0] * torch.log(p_y[p_y > 0])).sum()
    denom = (h_x + h_y) / 2
    if denom <= 0:
        return 0.0
    return float((mi / denom).clamp(0, 1))


def nmi_chance(table: Tensor, draws: int = 20, seed: int = 0) -> float:
    """The NMI that *independent* labelings with this table's marginals score on as many samples.

    NMI is biased upwards on a finite sample: two unrelated labelings of 96 transitions into 6 codes and 9 classes
    score ~0.14, of 1000 transitions ~0.01. This is the mean NMI over ``draws`` random pairings of the table's row
    and column labels (a permutation test's null), so a reported NMI can be read against it.
    """
    rows = torch.repeat_interleave(torch.arange(table.shape[0]), table.sum(1).long())
    cols = torch.repeat_interleave(torch.arange(table.shape[1]), table.sum(0).long())
    if rows.numel() == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    scores = [
        nmi_from_contingency(contingency(rows, cols[torch.randperm(cols.numel(), generator=g)], *table.shape))
        for _ in range(draws)
    ]
    return sum(scores) / draws


def adjusted_nmi(nmi: float, chance: float) -> float:
    """NMI rescaled so that chance (:func:`nmi_chance`) is 0 and a perfect match 1 (negative: below chance)."""
    return (nmi - chance) / (1 - chance) if chance < 1 else 0.0

"""``genie eval lam --model DIR --data SHARDS``: which latent actions the LAM uses, and what they mean.

Reports the latent action usage histogram, the LAM's next-frame PSNR, and, when the clips carry
discrete true actions, the normalized mutual information between latent and true actions plus a
confusion matrix (true action x latent action). Writes ``lam_eval.json`` and ``lam_eval.png``.

Where the data's source has a table of effective actions (:mod:`genie.eval.actions`: CoinRun, whose 15
raw actions form 9 classes that act differently), NMI is also reported against those classes
(``nmi_effective``) and the coarser movement classes (``nmi_movement``); ``nmi`` stays the raw one. The
source is read from the first clip's metadata (``source``, e.g. ``"coinrun:val"``, written by ``genie prep``).
Each NMI comes with ``<key>_chance``, what unrelated labelings score on as many transitions (NMI is biased upwards
on small samples: ~0.14 for 96 CoinRun transitions), and ``<key>_adjusted``, rescaled so that chance is 0; with
clips longer than the LAM's window (``--num-frames``) the LAM slides over them and every transition counts.

``train_eval_agreement`` is the share of transitions whose eval-mode code (what ``infer_actions``,
``prep tokenize`` and ``World`` use) equals the code training mode gives the same evaluation batch (see
:class:`~genie.models.lam.LatentNorm`): 1 for a LAM whose latent statistics were fixed before training ended,
lower for one whose training codes depended on the batch (then it depends on ``--batch-size`` too).

Dimension keys: B batch, T frames, A latent actions, K true actions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from genie.data.loader import DataError, probe_meta
from genie.eval.actions import GROUPINGS, classes, effective_actions, source_name
from genie.eval.common import (
    add_common_arguments,
    heldout_stream,
    load_model,
    pick_device,
    save_figure,
    subplots,
    write_json,
)
from genie.eval.metrics import adjusted_nmi, contingency, frame_psnr, nmi_chance, nmi_from_contingency

MAX_TRUE_ACTIONS = 64
GROUPING_NAMES = ("effective", "movement")  # the groupings of genie.eval.actions, in the order reported


def data_source(shards: str) -> str | None:
    """The source name of the clips of ``shards`` (``"coinrun"``, ``"sprites"``...) from the first clip's metadata;
    None when unreadable (e.g. a stream URL or whole videos without genie's clip metadata)."""
    try:
        return source_name(probe_meta(shards).source)
    except Exception:  # any reading problem only costs the effective-action NMI; the evaluation reports the rest
        return None


@torch.no_grad()
def evaluate_lam(
    model: Any,
    shards: str,
    num_frames: int | None = None,
    max_clips: int = 256,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluate a :class:`~genie.models.lam.LatentActionModel` on the clips of ``shards``."""
    cfg = model.config
    num_frames = num_frames or cfg.num_frames
    device = torch.device(device)
    model.to(device).eval()
    A = cfg.num_actions
    source = data_source(shards)
    groupings = GROUPINGS.get(source, {}) if source else {}
    usage_A = torch.zeros(A, dtype=torch.long)
    table_AK = torch.zeros(A, MAX_TRUE_ACTIONS, dtype=torch.long)
    grouped_AK = {name: torch.zeros(A, MAX_TRUE_ACTIONS, dtype=torch.long) for name in groupings}
    psnr, copy_psnr = [], []
    clips = skipped = agree = transitions = 0
    has_true = False
    bar = tqdm(total=max_clips, desc="eval lam", unit="clip", dynamic_ncols=True)
    for batch in heldout_stream(shards, num_frames, batch_size, cfg.image_size, max_clips):
        frames = batch["frames"].to(device)  # (B, T, H, W, C) uint8
        out = model(frames)  # eval mode: no codebook updates
        ids_BT = out.ids.cpu()
        train_ids_BT = model.infer_actions(frames, as_in_training=True).cpu()  # this batch's codes in training
        agree += int((train_ids_BT == ids_BT).sum())
        transitions += ids_BT.numel()
        usage_A += torch.bincount(ids_BT.flatten(), minlength=A)
        psnr.append(frame_psnr(out.recon, frames[:, 1:]).mean(1).cpu())
        copy_psnr.append(frame_psnr(frames[:, :-1], frames[:, 1:]).mean(1).cpu())
        true = batch.get("actions")
        if true is not None and true.dtype == torch.long and true.ndim == 2:
            keep = (true >= 0) & (true < MAX_TRUE_ACTIONS)
            table_AK += contingency(ids_BT[keep], true[keep], A, MAX_TRUE_ACTIONS)
            for name, table in grouped_AK.items():
                table += contingency(ids_BT[keep], effective_actions(source, true[keep], name), A, MAX_TRUE_ACTIONS)
            has_true = True
        clips += frames.shape[0]
        skipped = int(batch["skipped"])
        bar.update(frames.shape[0])
    bar.close()
    if clips == 0:
        raise DataError(f"no readable {cfg.image_size}x{cfg.image_size} clips of {num_frames}+ frames in {shards}")
    hist = (usage_A.float() / usage_A.sum()).tolist()
    report: dict[str, Any] = {
        "clips": clips,
        "num_frames": num_frames,
        "num_actions": A,
        "usage_histogram": hist,
        "codes_used": int((usage_A > 0).sum()),
        "next_frame_psnr": float(torch.cat(psnr).mean()),
        "copy_last_frame_psnr": float(torch.cat(copy_psnr).mean()),
        "train_eval_agreement": agree / transitions,
        "latent_norm": model.latent_norm.phase_name,  # "frozen": training mode used the eval statistics too
        "data_source": source,
        "skipped_samples": skipped,
    }
    if has_true:
        used_true = int((table_AK.sum(0) > 0).sum())
        k = int(table_AK.sum(0).nonzero().max()) + 1
        report["transitions_with_true_actions"] = int(table_AK.sum())
        report |= nmi_report("nmi", table_AK)
        report["true_actions_seen"] = used_true
        report["confusion"] = table_AK[:, :k].T.tolist()  # rows: true action, columns: latent action
        for name, table in grouped_AK.items():
            report |= nmi_report(f"nmi_{name}", table)
            report[f"{name}_action_classes"] = classes(groupings[name])  # raw ids of each class, by class id
    return report


def nmi_report(key: str, table: Tensor) -> dict[str, float]:
    """``key``: the NMI of a (latent x true) contingency table; ``key_chance``: what unrelated labelings score on as
    many transitions (:func:`~genie.eval.metrics.nmi_chance`); ``key_adjusted``: rescaled so that chance is 0."""
    nmi, chance = nmi_from_contingency(table), nmi_chance(table)
    return {key: nmi, f"{key}_chance": chance, f"{key}_adjusted": adjusted_nmi(nmi, chance)}


def plot_lam(report: dict[str, Any], path: Path) -> Path:
    """Usage histogram and (when known) the true-vs-latent confusion matrix, as one PNG."""
    has_conf = "confusion" in report
    fig, axes = subplots(2 if has_conf else 1, figsize=(10 if has_conf else 5, 4))
    ax = axes[0, 0]
    ax.bar(range(report["num_actions"]), report["usage_histogram"], color="tab:blue")
    ax.set_xlabel("latent action")
    ax.set_ylabel("fraction of transitions")
    ax.set_title(f"usage: {report['codes_used']}/{report['num_actions']} codes")
    if has_conf:
        conf = np.asarray(report["confusion"], dtype=float)
        rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        ax = axes[0, 1]
        im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xlabel("latent action")
        ax.set_ylabel("true action")
        effective = f", effective {report['nmi_effective']:.3f}" if "nmi_effective" in report else ""
        ax.set_title(f"P(latent | true), NMI {report['nmi']:.3f}{effective}")
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "LAM")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.models.lam import LatentActionModel

    model = load_model(LatentActionModel, args.model)
    report = evaluate_lam(model, args.data, args.num_frames, args.clips, args.batch_size, pick_device(args.device))
    out = args.out or args.model / "eval"
    write_json(out, "lam_eval.json", report)
    plot_lam(report, out / "lam_eval.png")
    nmi = f", NMI with true actions {report['nmi']:.3f}" if "nmi" in report else ""
    if "nmi" in report:
        nmi += f" [chance {report['nmi_chance']:.3f} on {report['transitions_with_true_actions']} transitions]"
    grouped = [f"{name} actions {report[f'nmi_{name}']:.3f}" for name in GROUPING_NAMES if f"nmi_{name}" in report]
    if grouped:
        nmi += f" ({', '.join(grouped)})"
    print(
        f"latent actions used: {report['codes_used']}/{report['num_actions']}{nmi}; next-frame PSNR "
        f"{report['next_frame_psnr']:.2f} dB (copy-last-frame {report['copy_last_frame_psnr']:.2f}); eval-mode codes "
        f"agree with training mode's on {100 * report['train_eval_agreement']:.1f}% of transitions "
        f"(latent statistics {report['latent_norm']}); {report['clips']} clips -> {out}"
    )
    return report

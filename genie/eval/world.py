"""``genie eval world --world DIR --data SHARDS``: how well a world predicts real clips, and how controllable it is.

For each held-out clip (``context`` prompt frames then ``horizon`` frames to predict):

- **teacher-forced token accuracy**: with the true tokens of every past frame as context and the LAM's
  action, the dynamics model's most likely token for each token of the next frame (fully masked), against
  the tokenizer's tokens of the real frame; averaged over the horizon.
- **rollout PSNR / SSIM per step 1..horizon**: the world, prompted with the context frames and driven by the
  actions the LAM infers from the real clip, generates the horizon autoregressively; each generated frame
  is compared with the real one.
- **ΔtPSNR** (Genie, section 3.2 "Controllability"): the same rollout driven by uniformly random actions
  instead; ``delta_psnr[t] = psnr_inferred[t] - psnr_random[t]``, reported at t = 4 as ``delta_psnr_t4``.
  Positive means the latent actions steer the world the way the real clip went.
- **action adapter** (worlds fine-tuned on robot data, clips with real actions ``actions.npy`` float32
  ``[T-1, U]``): ``adapter_accuracy``, how often the adapter maps a transition's real action to the latent
  action the LAM infers from its frames, against ``adapter_majority_baseline`` (always answering the LAM's
  most common action) and chance (1/A); and ``psnr_adapter_per_step``, the rollout driven by the adapter's
  mapping of the real actions (what ``World.step(robot_action=...)`` does).
- baselines: copying the last context frame (``copy_psnr``), and the tokenizer's own reconstruction of the
  real frames (``tokenizer_psnr``, what a perfect dynamics model would reach without ``keep_pixels``).
- for a world that keeps unchanged pixels (``SamplerConfig.keep_pixels``): ``psnr_decoded_per_step`` /
  ``ssim_decoded_per_step``, the same rollout (same seed, so the same tokens) with every patch decoded, i.e. the
  number without the compositing, comparable with worlds that decode everything.
- the same on the frames that differ from the prompt frame (``changed_frames_per_step`` clips per step,
  ``psnr_changed_per_step`` and ``copy_psnr_changed_per_step``, None where none changed): a frame equal to the prompt
  gives copying the capped 100 dB (``MAX_PSNR``), more than any world decoded through a lossy tokenizer can score,
  so a few unchanged frames can outweigh the rest of copying's mean.

Writes ``world_eval.json`` and ``world_eval.png`` (PSNR per step of each).

Dimension keys: B batch, T frames (context + horizon), F horizon, H W pixels, C channels, N tokens per frame.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genie.data.loader import DataError
from genie.eval.common import heldout_stream, pick_device, save_figure, subplots, write_json
from genie.eval.metrics import frame_psnr, frame_ssim
from genie.models.kinds import make_sampler
from genie.models.sampler import SamplerConfig
from genie.world import discrete_actions

DELTA_T = 4  # Genie reports ΔtPSNR at t = 4


@torch.no_grad()
def evaluate_world(
    world: Any,
    shards: str,
    context: int = 1,
    horizon: int = 16,
    max_clips: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a :class:`~genie.world.World` on the clips of ``shards`` (see the module docstring)."""
    if context < 1 or horizon < 1:
        raise ValueError(f"need context >= 1 and horizon >= 1, got {context}, {horizon}")
    T = context + horizon
    A = world.num_actions
    device = world.device
    sums: dict[str, Any] = {
        k: torch.zeros(horizon, dtype=torch.float64)
        for k in (
            "psnr",
            "ssim",
            "psnr_random",
            "ssim_random",
            "copy_psnr",
            "tokenizer_psnr",
            "acc",
            "changed",  # clips whose frame differs from the prompt frame
            "psnr_changed",  # sums over those clips only
            "copy_psnr_changed",
        )
    }
    clips = skipped = 0
    adapter_hits = adapter_total = 0
    lam_counts_A = torch.zeros(A, dtype=torch.long)
    rng = torch.Generator().manual_seed(seed)
    true_actions = world.dynamics.config.action_source == "true"  # an upper-bound world: the data's own actions
    # the same world decoding every patch (same models, same seeds: the same tokens), to report both renderings
    if world.keeps_pixels:
        decoded_world = world.fork(sampler=dataclasses.replace(world.sampler_config, keep_pixels=False))
        sums.update({k: torch.zeros(horizon, dtype=torch.float64) for k in ("psnr_decoded", "ssim_decoded")})
    bar = tqdm(total=max_clips, desc="eval world", unit="clip", dynamic_ncols=True)
    stream = heldout_stream(shards, T, batch_size, world.image_size, max_clips, require_actions=true_actions)
    for b, batch in enumerate(stream):
        frames = batch["frames"].to(device)  # (B, T, H, W, C) uint8
        B = frames.shape[0]
        real = frames[:, context:]  # (B, F, H, W, C)
        # (B, T-1): the LAM's latent actions, or the clips' own for a world trained on them
        actions = (
            world.check_actions(discrete_actions(batch, shards)) if true_actions else world.lam.infer_actions(frames)
        )
        tokens_BThw = world.tokenizer.encode(frames)
        tokens = tokens_BThw.flatten(2)  # (B, T, N)

        # teacher forcing: true past frames (MaskGIT: the next frame fully masked; causal: each token after the true
        # tokens before it; diffusion: the nearest code of the one-step prediction from noise), one frame at a time
        sampler = make_sampler(world.dynamics, SamplerConfig(steps=1, temperature=0.0), world.tokenizer)
        sampler.reset(tokens[:, :context], actions[:, : context - 1])
        for f in range(horizon):
            a = actions[:, context - 1 + f]
            pred = sampler.next_frame_logits(a, tokens[:, context + f]).argmax(-1)
            sums["acc"][f] += (pred == tokens[:, context + f]).float().mean(1).sum().cpu().double()
            sampler.append(tokens[:, context + f], a)

        # rollouts: inferred vs random actions, from the same seed
        ctx_actions = actions[:, : context - 1]
        world.seed(seed + b)
        gen = torch.from_numpy(world.rollout(frames[:, :context], actions[:, context - 1 :], ctx_actions)).to(device)
        random_actions = torch.randint(0, A, (B, horizon), generator=rng).to(device)
        world.seed(seed + b)
        gen_rand = torch.from_numpy(world.rollout(frames[:, :context], random_actions, ctx_actions)).to(device)
        if world.keeps_pixels:
            decoded_world.seed(seed + b)
            gen_dec = decoded_world.rollout(frames[:, :context], actions[:, context - 1 :], ctx_actions)
            gen_dec = torch.from_numpy(gen_dec).to(device)
            sums["psnr_decoded"] += frame_psnr(gen_dec, real).sum(0).cpu().double()
            sums["ssim_decoded"] += frame_ssim(gen_dec, real).sum(0).cpu().double()
        real_actions = batch.get("actions")
        if world.adapter is not None and real_actions is not None and real_actions.is_floating_point():
            mapped = world.adapter.latent_action(real_actions.to(device))  # (B, T-1)
            adapter_hits += int((mapped == actions).sum())
            adapter_total += mapped.numel()
            lam_counts_A += torch.bincount(actions.flatten().cpu(), minlength=A)
            world.seed(seed + b)
            gen_adapter = world.rollout(frames[:, :context], mapped[:, context - 1 :], ctx_actions)
            sums.setdefault("psnr_adapter", torch.zeros(horizon, dtype=torch.float64))
            sums["psnr_adapter"] += frame_psnr(torch.from_numpy(gen_adapter).to(device), real).sum(0).cpu().double()
        recon = world.tokenizer.decode(tokens_BThw)
        copy = frames[:, context - 1 : context].expand_as(real)

        psnr_BF, copy_psnr_BF = frame_psnr(gen, real), frame_psnr(copy, real)
        changed_BF = (real != copy).flatten(2).any(-1)  # (B, F)
        sums["changed"] += changed_BF.sum(0).cpu().double()
        sums["psnr_changed"] += (psnr_BF * changed_BF).sum(0).cpu().double()
        sums["copy_psnr_changed"] += (copy_psnr_BF * changed_BF).sum(0).cpu().double()
        sums["psnr"] += psnr_BF.sum(0).cpu().double()
        sums["ssim"] += frame_ssim(gen, real).sum(0).cpu().double()
        sums["psnr_random"] += frame_psnr(gen_rand, real).sum(0).cpu().double()
        sums["ssim_random"] += frame_ssim(gen_rand, real).sum(0).cpu().double()
        sums["copy_psnr"] += copy_psnr_BF.sum(0).cpu().double()
        sums["tokenizer_psnr"] += frame_psnr(recon[:, context:], real).sum(0).cpu().double()
        clips += B
        skipped = int(batch["skipped"])
        bar.update(B)
    bar.close()
    if clips == 0:
        raise DataError(
            f"no readable {world.image_size}x{world.image_size} clips of {T}+ frames (context {context} + horizon "
            f"{horizon}) in {shards}: lower --horizon or use longer clips"
        )
    changed = sums.pop("changed")
    per_step = {k: (v / clips).tolist() for k, v in sums.items() if not k.endswith("_changed")}
    for k in ("psnr_changed", "copy_psnr_changed"):  # None at a step where no frame changed
        per_step[k] = [float(v / n) if n else None for v, n in zip(sums[k], changed, strict=True)]
    delta = [p - r for p, r in zip(per_step["psnr"], per_step["psnr_random"], strict=True)]
    t4 = min(DELTA_T, horizon)
    adapter: dict[str, Any] = {}
    if adapter_total:
        adapter = {
            "adapter_accuracy": adapter_hits / adapter_total,
            "adapter_majority_baseline": int(lam_counts_A.max()) / adapter_total,
            "adapter_chance": 1 / A,
            "adapter_transitions": adapter_total,
            "psnr_adapter_per_step": per_step["psnr_adapter"],
            "psnr_adapter_mean": float(np.mean(per_step["psnr_adapter"])),
        }
    return {
        "clips": clips,
        "context": context,
        "horizon": horizon,
        "num_actions": A,
        "action_source": world.dynamics.config.action_source,
        "sampler": dataclasses.asdict(world.sampler_config),
        "teacher_forced_token_accuracy": float(np.mean(per_step["acc"])),
        "teacher_forced_accuracy_per_step": per_step["acc"],
        "psnr_per_step": per_step["psnr"],
        "ssim_per_step": per_step["ssim"],
        "psnr_random_per_step": per_step["psnr_random"],
        "ssim_random_per_step": per_step["ssim_random"],
        "copy_psnr_per_step": per_step["copy_psnr"],
        "changed_frames_per_step": changed.long().tolist(),
        "psnr_changed_per_step": per_step["psnr_changed"],
        "copy_psnr_changed_per_step": per_step["copy_psnr_changed"],
        "tokenizer_psnr_per_step": per_step["tokenizer_psnr"],
        "delta_psnr_per_step": delta,
        "delta_psnr_t": t4,
        "delta_psnr_t4": delta[t4 - 1],
        "psnr_mean": float(np.mean(per_step["psnr"])),
        **{f"{k}_per_step": per_step[k] for k in ("psnr_decoded", "ssim_decoded") if k in per_step},
        "copy_psnr_mean": float(np.mean(per_step["copy_psnr"])),
        "skipped_samples": skipped,
        **adapter,
    }


def plot_world(report: dict[str, Any], path: Path) -> Path:
    """PSNR per rollout step: inferred actions, random actions, copy-last-frame and tokenizer bound."""
    steps = np.arange(1, report["horizon"] + 1)
    fig, axes = subplots(2, figsize=(10, 4))
    ax = axes[0, 0]
    ax.plot(steps, report["psnr_per_step"], "o-", label="inferred actions")
    ax.plot(steps, report["psnr_random_per_step"], "s--", label="random actions")
    if "psnr_decoded_per_step" in report:
        ax.plot(steps, report["psnr_decoded_per_step"], "x-", alpha=0.6, label="inferred, every patch decoded")
    ax.plot(steps, report["copy_psnr_per_step"], ":", label="copy last frame")
    ax.plot(steps, report["tokenizer_psnr_per_step"], "-", alpha=0.5, label="tokenizer reconstruction")
    if "psnr_adapter_per_step" in report:
        ax.plot(steps, report["psnr_adapter_per_step"], "^-", label="robot actions (adapter)")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"ΔtPSNR(t={report['delta_psnr_t']}) = {report['delta_psnr_t4']:.2f} dB")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(steps, report["teacher_forced_accuracy_per_step"], "o-")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("teacher-forced token accuracy")
    ax.set_title(f"mean {report['teacher_forced_token_accuracy']:.3f}")
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from genie.export_world import add_sampler_arguments

    parser.add_argument("--world", type=Path, required=True, help="world bundle folder (genie export world)")
    parser.add_argument("--data", required=True, help="held-out video shards")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: WORLD/eval)")
    parser.add_argument("--clips", type=int, default=64, help="at most this many clips (default 64)")
    parser.add_argument("--context", type=int, default=1, help="prompt frames (default 1)")
    parser.add_argument(
        "--horizon", type=int, default=None, help="steps to roll out (default: 16, or what clips allow)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.data.loader import probe_meta
    from genie.export_world import sampler_from
    from genie.world import World

    world = World.from_pretrained(args.world, device=pick_device(args.device))
    world.sampler_config = sampler_from(args, world.sampler_config)
    horizon = args.horizon
    if horizon is None:
        horizon = max(1, min(16, probe_meta(args.data).frames - args.context))
    report = evaluate_world(world, args.data, args.context, horizon, args.clips, args.batch_size, args.seed)
    out = args.out or args.world / "eval"
    write_json(out, "world_eval.json", report)
    plot_world(report, out / "world_eval.png")
    print(
        f"teacher-forced token accuracy {report['teacher_forced_token_accuracy']:.3f}; rollout PSNR "
        f"{report['psnr_mean']:.2f} dB (copy-last-frame {report['copy_psnr_mean']:.2f}); "
        f"ΔtPSNR(t={report['delta_psnr_t']}) {report['delta_psnr_t4']:+.2f} dB on {report['clips']} clips -> {out}"
    )
    if "psnr_decoded_per_step" in report:
        print(
            f"the same rollout with every patch decoded (no keep_pixels): "
            f"{float(np.mean(report['psnr_decoded_per_step'])):.2f} dB"
        )
    if "adapter_accuracy" in report:
        print(
            f"action adapter: {report['adapter_accuracy']:.3f} of {report['adapter_transitions']} transitions mapped "
            f"to the LAM's latent action (always-majority {report['adapter_majority_baseline']:.3f}, chance "
            f"{report['adapter_chance']:.3f}); rollout PSNR driven by robot actions "
            f"{report['psnr_adapter_mean']:.2f} dB"
        )
    return report

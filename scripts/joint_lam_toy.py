"""Does the dynamics loss teach a LAM actions that mean the same everywhere? A toy of ``lam_training="joint"``.

One white 4x4 square on a black 16 px torus, moved by 4 actions (data_prep.sprites, no distractors); the dynamics
model's tokens say which 4x4 patch holds the square (2 codes), so the only unknown of the next frame is the move.
A LAM and a MaskGIT dynamics model (width 32, depth 1) train together for ``--steps`` batches of 32:

- ``joint``: the LAM's actions reach the dynamics model as the straight-through one-hot of
  :meth:`~genie.models.lam.LatentActionModel.straight_through_actions` (the joint dynamics stage's path);
- ``apart``: the dynamics model reads the same LAM's ids, without gradient (the LAM then learns only from its own
  loss, or not at all with ``--lam-loss-weight 0``).

It prints, per seed, the NMI of the LAM's held-out codes with the true moves and how often the dynamics model,
reading those codes, puts the square in the right patch (a quarter when the code says nothing). Measured numbers:
docs/architecture.md (Stages, the LAM trained through the dynamics loss)::

    python scripts/joint_lam_toy.py --lam-loss-weight 0
    python scripts/joint_lam_toy.py --lam-loss-weight 1

Dimension keys: B batch, T frames, A actions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from einops import reduce

from data_prep.sprites import episode_rng, render_episode
from genie.eval.metrics import contingency, nmi_from_contingency
from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.lam import LAMConfig, LatentActionModel

SIZE, PATCH, A = 16, 4, 4


def clips(n: int, seed: int, T: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """n episodes of T frames: uint8 (n, T, 16, 16, 3) and their moves (n, T-1)."""
    frames, moves = [], []
    for i in range(n):
        f, a, _ = render_episode(episode_rng(seed, "train", i), T, SIZE, A, 0, step=PATCH, sprite_size=PATCH)
        frames.append(f)
        moves.append(a)
    return torch.from_numpy(np.stack(frames)), torch.from_numpy(np.stack(moves))


def square_tokens(frames_BTHWC: torch.Tensor) -> torch.Tensor:
    """(B, T, 16, 16, 3) uint8 -> (B, T, 4, 4) long: 1 where the white square covers the patch."""
    white = (frames_BTHWC == 255).all(-1).float()
    return (reduce(white, "b t (h p) (w q) -> b t h w", "mean", p=PATCH, q=PATCH) > 0.5).long()


def run(seed: int, joint: bool, steps: int, lam_loss_weight: float, temperature: float) -> tuple[float, float]:
    """Train one pair; returns (NMI of held-out codes with the moves, share of squares placed right)."""
    torch.manual_seed(seed)
    lam = LatentActionModel(
        LAMConfig(
            image_size=SIZE, patch_size=PATCH, num_frames=4, width=32, encoder_depth=1, decoder_depth=1,
            num_heads=2, mlp_ratio=2.0, code_dim=4, num_actions=A, dead_code_threshold=20, norm_freeze_fraction=0.0,
        )
    ).train()  # fmt: skip
    dynamics = DynamicsModel(
        DynamicsConfig(num_codes=2, grid_size=SIZE // PATCH, num_actions=A, num_frames=4, width=32, depth=1,
                       num_heads=2, mlp_ratio=2.0)
    ).train()  # fmt: skip
    trains_lam = joint or lam_loss_weight > 0
    params = list(dynamics.parameters()) + (list(lam.parameters()) if trains_lam else [])
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    train_frames, _ = clips(2048, seed)
    val_frames, val_moves = clips(256, 1000 + seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        frames = train_frames[torch.randint(0, len(train_frames), (32,), generator=g)]
        out = lam(frames)
        actions = lam.straight_through_actions(out, temperature) if joint else out.ids
        loss = dynamics(square_tokens(frames), actions).loss + lam_loss_weight * out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ids_BT = lam.infer_actions(val_frames, as_in_training=True)
        tokens = square_tokens(val_frames)
        logits_BNV = dynamics.next_frame_output(tokens, ids_BT).logits[:, -1]
        placed = (logits_BNV[..., 1].argmax(-1) == tokens[:, -1].flatten(1).argmax(-1)).float().mean()
    return nmi_from_contingency(contingency(ids_BT, val_moves, A, A)), float(placed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lam-loss-weight", type=float, default=0.0, help="the LAM's own loss beside the dynamics'")
    parser.add_argument("--temperature", type=float, default=0.1, help="the straight-through softmax's temperature")
    args = parser.parse_args()
    for seed in range(args.seeds):
        t0 = time.monotonic()
        nmi_j, placed_j = run(seed, True, args.steps, args.lam_loss_weight, args.temperature)
        nmi_a, placed_a = run(seed, False, args.steps, args.lam_loss_weight, args.temperature)
        print(
            f"seed {seed}: joint NMI {nmi_j:.3f}, placed {placed_j:.3f} | apart NMI {nmi_a:.3f}, placed {placed_a:.3f}"
            f" ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""How visible are CoinRun's actions in its frames? A supervised probe: the ceiling a LAM's NMI can be read against.

A small CNN sees frames t-K+2 .. t+1 (and their differences) and is trained with cross entropy on the true action
class of the transition t -> t+1 (CoinRun's 9 effective classes or 6 movement classes, genie/eval/actions.py);
it prints its held-out accuracy, the majority class's, and the NMI of its predictions with the truth (the number
`genie eval lam` reports for a LAM). Train on uniform-policy clips (a prep's val split), e.g.:

    genie prep coinrun --out data/probe --episodes 4 --val-episodes 400 --clip-frames 20 --seed 1
    python scripts/action_probe.py --train data/probe/val --val data/coinrun_speedrun/val --frames 4

Dimension keys: B batch, K frames seen, C channels, H W pixels.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genie.eval.actions import grouping_table
from genie.eval.common import heldout_stream
from genie.eval.metrics import contingency, nmi_chance, nmi_from_contingency

CLIP_FRAMES = 20


def load(shards: str, clips: int) -> tuple[Tensor, Tensor]:
    """uint8 frames (B, T, H, W, C) and raw actions (B, T-1) of up to ``clips`` clips."""
    frames, actions = [], []
    for batch in heldout_stream(shards, CLIP_FRAMES, 16, 64, clips, require_actions=True):
        frames.append(batch["frames"])
        actions.append(batch["actions"].long())
    return torch.cat(frames), torch.cat(actions)


def inputs(frames_BTHWC: Tensor, t: int, k: int) -> Tensor:
    """Frames t-k+2 .. t+1 and their differences, channels first: (B, (2k-1) C, H, W) float."""
    x = frames_BTHWC[:, t - k + 2 : t + 2].permute(0, 1, 4, 2, 3).float() / 255  # (B, K, C, H, W)
    return torch.cat([x, 4 * (x[:, 1:] - x[:, :-1])], 1).flatten(1, 2)


def probe(k: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3 * (2 * k - 1), 32, 4, 2, 1), nn.GELU(),
        nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
        nn.Conv2d(64, 128, 4, 2, 1), nn.GELU(),
        nn.Conv2d(128, 128, 3, 1, 1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="CoinRun shards with actions (uniform policy)")
    parser.add_argument("--val", required=True, help="held-out CoinRun shards")
    parser.add_argument("--frames", type=int, default=4, help="K: frames seen, the transition's two included")
    parser.add_argument("--grouping", choices=("effective", "movement"), default="effective")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 2 <= args.frames <= CLIP_FRAMES:
        parser.error(f"--frames must be in [2, {CLIP_FRAMES}]")
    torch.manual_seed(args.seed)
    table = torch.tensor(grouping_table("coinrun", args.grouping))
    classes = int(table.max()) + 1
    train_frames, train_actions = load(args.train, 100_000)
    val_frames, val_actions = load(args.val, 100_000)
    print(f"{len(train_frames)} training clips, {len(val_frames)} held out", flush=True)
    k = args.frames
    net = probe(k, classes)
    opt = torch.optim.AdamW(net.parameters(), args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        clips = torch.randint(0, len(train_frames), (args.batch_size,), generator=g)
        t = int(torch.randint(k - 2, CLIP_FRAMES - 1, (1,), generator=g))
        loss = F.cross_entropy(net(inputs(train_frames[clips], t, k)), table[train_actions[clips, t]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    counts = torch.zeros(classes, classes, dtype=torch.long)
    with torch.no_grad():
        for t in range(k - 2, CLIP_FRAMES - 1):
            for i in range(0, len(val_frames), 64):
                pred = net(inputs(val_frames[i : i + 64], t, k)).argmax(-1)
                counts += contingency(pred, table[val_actions[i : i + 64, t]], classes, classes)
    n = int(counts.sum())
    accuracy = float(counts.diag().sum()) / n
    majority = float(counts.sum(0).max()) / n
    print(
        f"frames {k}, {args.grouping} classes: {n} held-out transitions, accuracy {accuracy:.3f} (majority class "
        f"{majority:.3f}), NMI {nmi_from_contingency(counts):.3f} (chance {nmi_chance(counts):.3f})"
    )


if __name__ == "__main__":
    main()

"""How visible are CoinRun's actions in its frames? A supervised probe: the ceiling a LAM's NMI can be read against.

A network sees frames t-K+2 .. t+1 and is trained with cross entropy on the true action class of the transition
t -> t+1 (CoinRun's 9 effective classes or 6 movement classes, genie/eval/actions.py); it prints its held-out
accuracy, the majority class's, and the NMI of its predictions with the truth (the number `genie eval lam`
reports for a LAM). Train on uniform-policy clips (a prep's val split), e.g.:

    genie prep coinrun --out data/probe --episodes 4 --val-episodes 400 --clip-frames 20 --seed 1
    python scripts/action_probe.py --train data/probe/val --val data/coinrun_speedrun/val --frames 4

The network (``--net``): ``cnn``, a small CNN on the frames and their differences; or ``lam``, the encoder of a
LAM stage config (default: the CPU speedrun's, ``configs/speedrun/cpu/lam.yaml``) with a linear head on each
transition's action token, i.e. the speedrun's LAM *told* the actions: with ``--seconds`` set to the LAM's share of
the speedrun, what its codes could carry at best at that budget. ``--crop C`` shows the network only the central
C x C pixels (CoinRun's camera follows the agent, so the agent is there).

Dimension keys: B batch, K frames seen, C channels, H W pixels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from genie.eval.actions import grouping_table
from genie.eval.common import heldout_stream
from genie.eval.metrics import contingency, nmi_chance, nmi_from_contingency

RESOLUTION = 64  # CoinRun frames are 64 x 64
SPEEDRUN_LAM = Path(__file__).resolve().parents[1] / "configs/speedrun/cpu/lam.yaml"


def load(shards: str, clips: int, clip_frames: int) -> tuple[Tensor, Tensor]:
    """uint8 frames (B, T, H, W, C) and raw actions (B, T-1) of up to ``clips`` clips of ``clip_frames`` frames."""
    frames, actions = [], []
    for batch in heldout_stream(shards, clip_frames, 16, RESOLUTION, clips, require_actions=True):
        frames.append(batch["frames"])
        actions.append(batch["actions"].long())
    return torch.cat(frames), torch.cat(actions)


def window(frames_BTHWC: Tensor, t: int, k: int, crop: int) -> Tensor:
    """Frames t-k+2 .. t+1, cut to their central ``crop`` x ``crop`` pixels (0: whole): (B, K, H', W', C) uint8."""
    x = frames_BTHWC[:, t - k + 2 : t + 2]
    if crop:
        top, left = (x.shape[2] - crop) // 2, (x.shape[3] - crop) // 2
        x = x[:, :, top : top + crop, left : left + crop]
    return x


class CNNProbe(nn.Module):
    """A small CNN on the window's frames and their differences -> logits (B, classes) of its last transition."""

    def __init__(self, k: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(
        nn.Conv2d(3 * (2 * k - 1), 32, 4, 2, 1), nn.GELU(),
        nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
        nn.Conv2d(64, 128, 4, 2, 1), nn.GELU(),
        nn.Conv2d(128, 128, 3, 1, 1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
        )  # fmt: skip

    def forward(self, window_BKHWC: Tensor) -> Tensor:
        x = window_BKHWC.permute(0, 1, 4, 2, 3).float() / 255  # (B, K, C, H, W)
        return self.net(torch.cat([x, 4 * (x[:, 1:] - x[:, :-1])], 1).flatten(1, 2))


class LAMProbe(nn.Module):
    """A LAM's encoder (its config's model fields) with a linear head on each transition's action token."""

    def __init__(self, config_path: Path, size: int, classes: int):
        super().__init__()
        from genie.models.lam import LAMConfig, LatentActionModel

        fields = yaml.safe_load(config_path.read_text())["model"]["init_args"]["model"]
        self.lam = LatentActionModel(LAMConfig(**{**fields, "image_size": size}))
        self.head = nn.Linear(self.lam.config.width, classes)

    def forward(self, window_BKHWC: Tensor) -> Tensor:
        """Logits (B, K-1, classes): one per transition of the window (each sees only the frames up to its own)."""
        from genie.models.tokenizer import frames_to_unit

        return self.head(self.lam.action_features(self.lam.patchify(frames_to_unit(window_BKHWC))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="CoinRun shards with actions (uniform policy)")
    parser.add_argument("--val", required=True, help="held-out CoinRun shards")
    parser.add_argument("--frames", type=int, default=4, help="K: frames seen, the transition's two included")
    parser.add_argument("--grouping", choices=("effective", "movement"), default="effective")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-frames", type=int, default=20, help="frames of each clip read (the prep's)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this much training time (0: --steps)")
    parser.add_argument("--crop", type=int, default=0, help="show only the central C x C pixels (0: whole frames)")
    parser.add_argument("--net", choices=("cnn", "lam"), default="cnn", help="the probe network (see above)")
    parser.add_argument("--lam-config", type=Path, default=SPEEDRUN_LAM, help="the LAM stage config of --net lam")
    args = parser.parse_args(argv)
    if not 0 <= args.crop <= RESOLUTION:
        parser.error(f"--crop must be in [0, {RESOLUTION}], got {args.crop}")
    if not 2 <= args.frames <= args.clip_frames:
        parser.error(f"--frames must be in [2, --clip-frames {args.clip_frames}]")
    torch.manual_seed(args.seed)
    table = torch.tensor(grouping_table("coinrun", args.grouping))
    classes = int(table.max()) + 1
    k, crop = args.frames, args.crop
    try:
        net = LAMProbe(args.lam_config, crop or RESOLUTION, classes) if args.net == "lam" else CNNProbe(k, classes)
    except ValueError as e:  # e.g. a crop the LAM's patch size does not divide
        parser.error(f"--net lam, --crop {crop}, --lam-config {args.lam_config}: {e}")
    train_frames, train_actions = load(args.train, 100_000, args.clip_frames)
    val_frames, val_actions = load(args.val, 100_000, args.clip_frames)
    print(f"{len(train_frames)} training clips, {len(val_frames)} held out", flush=True)
    opt = torch.optim.AdamW(net.parameters(), args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step = 0
    while (time.time() - t0 < args.seconds) if args.seconds else (step < args.steps):
        clips = torch.randint(0, len(train_frames), (args.batch_size,), generator=g)
        t = int(torch.randint(k - 2, args.clip_frames - 1, (1,), generator=g))
        x = window(train_frames[clips], t, k, crop)
        if args.net == "lam":  # every transition of the window is labelled (the encoder is causal in time)
            y = table[train_actions[clips, t - k + 2 : t + 1]]
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        else:
            loss = F.cross_entropy(net(x), table[train_actions[clips, t]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        step += 1
    print(f"{step} steps in {time.time() - t0:.0f} s", flush=True)
    net.eval()
    counts = torch.zeros(classes, classes, dtype=torch.long)
    with torch.no_grad():
        for t in range(k - 2, args.clip_frames - 1):
            for i in range(0, len(val_frames), 64):
                logits = net(window(val_frames[i : i + 64], t, k, crop))
                pred = (logits[:, -1] if args.net == "lam" else logits).argmax(-1)  # the window's last transition
                counts += contingency(pred, table[val_actions[i : i + 64, t]], classes, classes)
    n = int(counts.sum())
    accuracy = float(counts.diag().sum()) / n
    majority = float(counts.sum(0).max()) / n
    print(
        f"{args.net}, frames {k}, crop {crop or 'none'}, {args.grouping} classes: {n} held-out transitions, "
        f"accuracy {accuracy:.3f} (majority class {majority:.3f}), "
        f"NMI {nmi_from_contingency(counts):.3f} (chance {nmi_chance(counts):.3f})"
    )


if __name__ == "__main__":
    main()

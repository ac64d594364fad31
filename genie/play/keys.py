"""Which latent actions the arrow keys drive: the ones whose effects differ most, by the way they move.

A world's latent actions have no names. To make the arrow keys useful without a human labelling them,
``genie play`` steps each action a couple of times from a prompt, then

1. picks the (up to) four actions whose resulting frames differ most from each other and from the start
   frame (largest sum of mean absolute differences), so the arrows drive actions that do something, and
   never two near-identical ones;
2. assigns them to up/down/left/right by where the change moves: the centroid of ``|frame_k - frame_0|``
   moves with a moving object (half its velocity per step: the changed region spans the old and the new
   position), so its drift between step 1 and step k is a direction. The assignment maximises the total
   agreement between drifts and arrow directions over all orderings.

When nothing moves coherently (total drift under half a pixel), the chosen actions keep their index
order. It is a heuristic: the page shows the mapping, and ``genie play --arrows U,D,L,R`` overrides it.

Dimension keys: A actions, K steps, H W pixels, C channels.
"""

from __future__ import annotations

import itertools

import numpy as np

ARROWS = ("ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight")
# image coordinates (x right, y down) of each arrow's direction
DIRECTIONS = np.array([(0.0, -1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, 0.0)])


def change_centroid(before_HWC: np.ndarray, after_HWC: np.ndarray) -> np.ndarray | None:
    """(x, y) centroid of where two frames differ, weighted by the difference; None when they are equal."""
    diff_HW = np.abs(after_HWC.astype(np.float32) - before_HWC.astype(np.float32)).sum(-1)
    total = diff_HW.sum()
    if total <= 0:
        return None
    ys, xs = np.indices(diff_HW.shape)
    return np.array([(xs * diff_HW).sum() / total, (ys * diff_HW).sum() / total])


def drift(rollout_KHWC: np.ndarray) -> np.ndarray:
    """Direction an action moves things: change centroid after the last step minus after the first (x, y).

    Args:
        rollout_KHWC: the start frame followed by K >= 2 frames of the same action, uint8 (K+1, H, W, C).
    """
    first = change_centroid(rollout_KHWC[0], rollout_KHWC[1])
    last = change_centroid(rollout_KHWC[0], rollout_KHWC[-1])
    if first is None or last is None:
        return np.zeros(2)
    return last - first


def most_distinct(effects_AHWC: np.ndarray, k: int, start_HWC: np.ndarray | None = None) -> list[int]:
    """Indices of the k actions whose effect frames are furthest apart (and, given ``start_HWC``, from it).

    The score of a set is the sum of its pairwise mean absolute differences, plus each member's difference
    from the start frame when given: actions that change nothing count as the start itself, so a set of
    actions that all do something wins over one with a no-op in it.
    """
    A = len(effects_AHWC)
    k = min(k, A)
    flat_AP = effects_AHWC.reshape(A, -1).astype(np.float32)
    dist_AA = np.abs(flat_AP[:, None] - flat_AP[None]).mean(-1)
    own_A = np.zeros(A) if start_HWC is None else np.abs(flat_AP - start_HWC.reshape(1, -1)).mean(-1)
    score = lambda c: dist_AA[np.ix_(c, c)].sum() / 2 + own_A[list(c)].sum()
    if A <= 16:
        return sorted(max(itertools.combinations(range(A), k), key=score))
    chosen = [int(own_A.argmax())]  # many actions: greedy farthest-point selection
    while len(chosen) < k:
        rest = [a for a in range(A) if a not in chosen]
        chosen.append(max(rest, key=lambda a: dist_AA[a, chosen].sum() + own_A[a]))
    return sorted(chosen)


def arrow_actions(rollouts_AKHWC: np.ndarray) -> dict[str, int]:
    """Map arrow keys to latent actions from one rollout per action.

    Args:
        rollouts_AKHWC: for every action a, the start frame then K >= 2 frames of action a, uint8.

    Returns:
        ``{"ArrowUp": a, ...}`` for min(4, A) arrows (fewer actions: fewer arrows mapped).
    """
    A = len(rollouts_AKHWC)
    chosen = most_distinct(rollouts_AKHWC[:, -1], 4, start_HWC=rollouts_AKHWC[0, 0])
    drifts = np.stack([drift(rollouts_AKHWC[a]) for a in chosen])  # (k, 2)
    arrows = list(range(len(chosen)))
    if np.linalg.norm(drifts, axis=1).sum() >= 0.5 and A > 1:
        # the ordering of the chosen actions over the arrows that best agrees with their drifts
        arrows = max(
            itertools.permutations(range(len(DIRECTIONS)), len(chosen)),
            key=lambda perm: sum(float(drifts[i] @ DIRECTIONS[perm[i]]) for i in range(len(chosen))),
        )
    mapping = {ARROWS[arrow]: chosen[i] for i, arrow in enumerate(arrows)}
    return {k: mapping[k] for k in ARROWS if k in mapping}  # up, down, left, right order


def parse_arrows(text: str, num_actions: int) -> dict[str, int]:
    """``"2,0,3,1"`` (up, down, left, right) -> mapping; one-line ValueError for anything else."""
    try:
        ids = [int(a) for a in text.split(",")]
    except ValueError:
        raise ValueError(f"--arrows must be 4 comma-separated actions (up,down,left,right), got {text!r}") from None
    if len(ids) != 4 or not all(0 <= a < num_actions for a in ids):
        raise ValueError(f"--arrows must be 4 actions in 0..{num_actions - 1} (up,down,left,right), got {text!r}")
    return dict(zip(ARROWS, ids, strict=True))

"""What every dynamics kind shares: the config fields and checks, the action conditioning and the neighbour mix.

Dimension keys: B batch, T frames, P tokens per frame as the transformer sees them, N image tokens per frame
(h * w), D width, A latent actions, X the action embedding's width (4 D for FiLM, D otherwise).

Each dynamics kind (``maskgit`` in :mod:`genie.models.dynamics`, ``causal`` in :mod:`genie.models.causal`) is its
own model module with its own config class; the fields they have in common are checked here once
(:func:`check_common`), and the action enters every kind the same way (:func:`condition_input`,
:func:`condition_output`): FiLM or addition on the tokens of the frame the action leads to.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

DYNAMICS_KINDS = ("maskgit", "causal")
ACTION_SOURCES = ("latent", "true")
FILM_INIT_STD = 0.3  # initial spread of the action's scales/shifts: strong enough to matter from step 0


def check_common(cfg: Any, conditionings: tuple[str, ...]) -> None:
    """ValueError naming the field for the fields every dynamics config has (``conditionings``: the kind's own)."""
    if cfg.action_conditioning not in conditionings:
        raise ValueError(f"action_conditioning must be one of {conditionings}, got {cfg.action_conditioning!r}")
    if cfg.action_source not in ACTION_SOURCES:
        raise ValueError(f"action_source must be one of {ACTION_SOURCES}, got {cfg.action_source!r}")
    if cfg.width % cfg.num_heads or (cfg.width // cfg.num_heads) % 2:
        raise ValueError(f"width {cfg.width} / num_heads {cfg.num_heads} must be an even integer")
    if cfg.spatial_context < 0:
        raise ValueError(f"spatial_context must be >= 0, got {cfg.spatial_context}")


def action_embedding(num_ids: int, width: int, film: bool) -> nn.Embedding:
    """The action table: per id, FiLM's (input scale, input shift, output scale, output shift) or one vector."""
    embed = nn.Embedding(num_ids, 4 * width if film else width)
    nn.init.normal_(embed.weight, std=0.02)
    if film:  # scales spread from the start (multiplicative: zero would be "no conditioning"), shifts small
        with torch.no_grad():
            embed.weight[:, :width].normal_(std=FILM_INIT_STD)
            embed.weight[:, 2 * width : 3 * width].normal_(std=FILM_INIT_STD)
    return embed


def condition_input(x_BTPD: Tensor, a_BTX: Tensor, conditioning: str) -> Tensor:
    """Apply each frame's action to its tokens: FiLM (scale, shift) or addition. ("prepend" is the caller's.)"""
    if conditioning == "film":
        scale, shift = a_BTX[..., : 2 * x_BTPD.shape[-1]].chunk(2, dim=-1)
        return x_BTPD * (1 + scale[:, :, None]) + shift[:, :, None]
    return x_BTPD + a_BTX[:, :, None, :]


def condition_output(h_BTPD: Tensor, a_BTX: Tensor, conditioning: str) -> Tensor:
    """FiLM's second (scale, shift) on the transformer's output before the head; other conditionings: as is."""
    if conditioning != "film":
        return h_BTPD
    D = h_BTPD.shape[-1]
    scale, shift = a_BTX[..., 2 * D :].chunk(2, dim=-1)
    return h_BTPD * (1 + scale[:, :, None]) + shift[:, :, None]


def neighbour_conv(width: int, context: int) -> nn.Conv2d | None:
    """The ``spatial_context`` convolution over a frame's token grid ((2c+1)^2, residual), or None for 0."""
    if context <= 0:
        return None
    conv = nn.Conv2d(width, width, kernel_size=2 * context + 1, padding=context)
    nn.init.normal_(conv.weight, std=0.02 / (2 * context + 1))
    nn.init.zeros_(conv.bias)
    return conv


def mix_neighbours(conv: nn.Conv2d | None, x_BTND: Tensor, grid_size: int) -> Tensor:
    """Add each token's neighbourhood (the convolution over the (h, w) grid) to its embedding: (B, T, N, D)."""
    if conv is None:
        return x_BTND
    B, T = x_BTND.shape[:2]
    grid = rearrange(x_BTND, "b t (h w) d -> (b t) d h w", h=grid_size)
    return x_BTND + rearrange(conv(grid), "(b t) d h w -> b t (h w) d", b=B, t=T)

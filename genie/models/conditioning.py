"""What every dynamics kind shares: the config fields and checks, the action conditioning and the neighbour mix.

Dimension keys: B batch, T frames, P tokens per frame as the transformer sees them, N image tokens per frame
(h * w), D width, A latent actions, X the action embedding's width (4 D for FiLM, D otherwise).

Each dynamics kind (``maskgit`` in :mod:`genie.models.dynamics`, ``causal`` in :mod:`genie.models.causal`) is its
own model module with its own config class; the fields they have in common are checked here once
(:func:`check_common`), and the action enters every kind the same way (:func:`condition_input`,
:func:`condition_output`): FiLM or addition on the tokens of the frame the action leads to.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig

from genie.models.blocks import STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel

DYNAMICS_KINDS = ("maskgit", "causal", "diffusion")
ACTION_SOURCES = ("latent", "true")
FILM_INIT_STD = 0.3  # initial spread of the action's scales/shifts: strong enough to matter from step 0


@strict
class DynamicsCommonConfig(PreTrainedConfig):
    """The fields every dynamics kind's config has (each kind's config class adds its own and its ``kind``)."""

    conditionings: ClassVar[tuple[str, ...]] = ("film", "add")  # the kind's action_conditioning choices

    num_codes: int = 1024  # V: the tokenizer's codebook size
    grid_size: int = 16  # h = w: the tokenizer's token grid (N = grid_size^2 tokens per frame)
    num_actions: int = 8  # A: the LAM's number of latent actions
    num_frames: int = 16  # temporal attention window (= training clip length); generation slides past it
    width: int = 512  # D
    depth: int = 12  # ST blocks
    num_heads: int = 8  # attention heads (width / num_heads must be even, for RoPE)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    action_conditioning: str = "film"  # "film" (scale+shift of the frame's tokens and outputs), "add" (+ "prepend")
    # what the action ids are: "latent" (the LAM's latent actions, the Genie world) or "true" (the data's own discrete
    # actions from actions.npy, ids 0..num_actions-1: an upper bound that tells the LAM's errors from the dynamics
    # model's, as GenieRedux-G; such a world is stepped with the environment's actions, and has no use for its LAM)
    action_source: str = "latent"
    dropout: float = 0.0
    qk_norm: bool = True
    # each token's input also mixes in its neighbours' embeddings (a (2c+1)^2 convolution over the token grid,
    # residual); 0 is the plain Genie model (see genie/models/dynamics.py for why 1 is the default)
    spatial_context: int = 1

    def __post_init__(self, **kwargs):
        check_common(self, self.conditionings)
        super().__post_init__(**kwargs)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size**2


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


def at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 outputs in fp32 for a loss or for sampling; fp32/fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def action_embedding(num_ids: int, width: int, film: bool) -> nn.Embedding:
    """The action table: per id, FiLM's (input scale, input shift, output scale, output shift) or one vector.
    Initialised by :func:`init_action_embedding` (a separate call, so a model keeps its order of random draws)."""
    return nn.Embedding(num_ids, 4 * width if film else width)


def check_actions(actions: Tensor, B: int, T: int) -> None:
    """Actions of a (B, T)-frame clip: ids (B, T-1) long, or weights over the actions (B, T-1, A) float.

    Weights are what a LAM trained through the dynamics loss gives (``DynamicsStage(lam_training="joint")``): a
    straight-through one-hot, equal to the chosen id's one-hot in the forward pass, whose gradient reaches the LAM.
    """
    if actions.shape[:2] != (B, T - 1) or actions.ndim != (3 if actions.is_floating_point() else 2):
        expected = f"ids (B, T-1) = {(B, T - 1)} or weights (B, T-1, A)"
        raise ValueError(f"actions must be {expected}, got {tuple(actions.shape)}")


def embed_actions(embed: nn.Embedding, actions: Tensor) -> Tensor:
    """The action table's rows: ids (...) long -> (..., X), or weights (..., A') float -> their mix of the first A'
    rows (a one-hot gives exactly its id's row; gradient flows to the weights)."""
    if not actions.is_floating_point():
        return embed(actions)
    table_AX = embed.weight[: actions.shape[-1]]
    return actions.to(table_AX.dtype) @ table_AX


def lead_with_no_action(actions: Tensor, num_actions: int) -> Tensor:
    """The action leading to each frame: (B, T-1) -> (B, T) with "no action" (id A) for a clip's first frame; weights
    (B, T-1, A) -> (B, T, A+1), the first frame one-hot on A."""
    B = actions.shape[0]
    if not actions.is_floating_point():
        return torch.cat([actions.new_full((B, 1), num_actions), actions], dim=1)
    weights = torch.cat([actions, actions.new_zeros(*actions.shape[:2], 1)], dim=-1)  # (B, T-1, A+1)
    none = torch.zeros_like(weights[:, :1])
    none[..., num_actions] = 1
    return torch.cat([none, weights], dim=1)


def init_action_embedding(embed: nn.Embedding, width: int, film: bool) -> None:
    nn.init.normal_(embed.weight, std=0.02)
    if film:  # scales spread from the start (multiplicative: zero would be "no conditioning"), shifts small
        with torch.no_grad():
            embed.weight[:, :width].normal_(std=FILM_INIT_STD)
            embed.weight[:, 2 * width : 3 * width].normal_(std=FILM_INIT_STD)


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
    """The ``spatial_context`` convolution over a frame's token grid ((2c+1)^2, residual), or None for 0.
    Initialised by :func:`init_neighbours`."""
    return nn.Conv2d(width, width, kernel_size=2 * context + 1, padding=context) if context > 0 else None


def init_neighbours(conv: nn.Conv2d | None) -> None:
    if conv is not None:  # small: the mix starts as a nudge to each token's own embedding
        nn.init.normal_(conv.weight, std=0.02 / conv.kernel_size[0])
        nn.init.zeros_(conv.bias)


def mix_neighbours(conv: nn.Conv2d | None, x_BTND: Tensor, grid_size: int) -> Tensor:
    """Add each token's neighbourhood (the convolution over the (h, w) grid) to its embedding: (B, T, N, D)."""
    if conv is None:
        return x_BTND
    B, T = x_BTND.shape[:2]
    grid = rearrange(x_BTND, "b t (h w) d -> (b t) d h w", h=grid_size)
    return x_BTND + rearrange(conv(grid), "(b t) d h w -> b t (h w) d", b=B, t=T)


class DynamicsBase(GeniePreTrainedModel):
    """What every dynamics kind's model has: the action count and its ST stack built from the common fields."""

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    def make_stack(self, tokens: int, frames: int, causal_tokens: int = 0) -> STTransformer:
        """The ST transformer over ``tokens`` per frame and a window of ``frames``, of the config's size."""
        cfg = self.config
        return STTransformer(
            STTransformerConfig(
                width=cfg.width,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                num_spatial_tokens=tokens,
                causal_tokens=causal_tokens,
                max_frames=frames,
                dropout=cfg.dropout,
                qk_norm=cfg.qk_norm,
            )
        )

"""Dynamics model: MaskGIT over the ST transformer, predicting the next frame's tokens from the past and an action.

Dimension keys:
    B: batch size
    T: frames
    N: tokens per frame (h * w of the tokenizer's grid)
    D: width
    V: tokenizer codebook size (token ids 0..V-1; id V is the MASK token)
    A: number of latent actions

Inputs are token ids z_1..z_T (from the frozen tokenizer) and latent actions a_1..a_{T-1} (from the
frozen LAM, no gradient), ``a_t`` being the action between frame t and frame t+1. Frame t+1 is
conditioned on ``a_t``, in one of two ways (``action_conditioning``):

- ``"prepend"``: every frame gets one extra token in front of its N tokens: the embedding of the action
  that led to it (frame 1 gets a learned "no action" embedding). Spatial attention lets every token of
  the frame read it. Jasmine found this essential on CoinRun.
- ``"add"``: the action embedding is added to every token of the frame it leads to.

Training (MaskGIT): for each clip and each frame after the first, a mask rate r ~ U(0.5, 1) is drawn
and each token is replaced by MASK with probability r; the model predicts the original ids of masked
tokens (cross entropy). Temporal attention is causal, so frame t's prediction sees only frames <= t.

Generation (:class:`genie.models.sampler.MaskGITSampler`) fills one frame at a time, starting from all
MASK, over a few refinement steps, reading past frames from a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig

from genie.models.blocks import KVCache, STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel, register_auto

ACTION_CONDITIONINGS = ("prepend", "add")


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class DynamicsConfig(PreTrainedConfig):
    """Dynamics model hyper-parameters; exactly the model fields of ``config.json``."""

    model_type = "genie_dynamics"

    num_codes: int = 1024  # V: the tokenizer's codebook size
    grid_size: int = 16  # h = w: the tokenizer's token grid (N = grid_size^2 tokens per frame)
    num_actions: int = 8  # A: the LAM's number of latent actions
    num_frames: int = 16  # temporal attention window (= training clip length); generation slides past it
    width: int = 512  # D
    depth: int = 12  # ST blocks
    num_heads: int = 8  # attention heads (width / num_heads must be even, for RoPE)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    action_conditioning: str = "prepend"  # "prepend" (an action token per frame) or "add" (added embeddings)
    mask_rate_min: float = 0.5  # training mask rate is drawn from U(mask_rate_min, mask_rate_max)
    mask_rate_max: float = 1.0
    dropout: float = 0.0
    qk_norm: bool = True

    def __post_init__(self, **kwargs):
        if self.action_conditioning not in ACTION_CONDITIONINGS:
            raise ValueError(
                f"action_conditioning must be one of {ACTION_CONDITIONINGS}, got {self.action_conditioning!r}"
            )
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"width {self.width} / num_heads {self.num_heads} must be an even integer")
        if not 0.0 < self.mask_rate_min <= self.mask_rate_max <= 1.0:
            raise ValueError("need 0 < mask_rate_min <= mask_rate_max <= 1")
        super().__post_init__(**kwargs)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_size**2

    @property
    def mask_id(self) -> int:
        return self.num_codes

    @property
    def extra_tokens(self) -> int:
        """Tokens per frame in front of the N image tokens (1 action token when prepending)."""
        return 1 if self.action_conditioning == "prepend" else 0


@dataclass
class DynamicsOutput:
    """Result of :meth:`DynamicsModel.forward`."""

    logits: Tensor  # (B, T, N, V) next-token logits at every position
    loss: Tensor  # () cross entropy over masked tokens
    accuracy: Tensor  # () top-1 accuracy over masked tokens
    mask: Tensor  # (B, T, N) bool, True where the input was masked


class DynamicsModel(GeniePreTrainedModel):
    """Genie's MaskGIT dynamics model (see the module docstring)."""

    config_class = DynamicsConfig
    main_input_name = "tokens"

    def __init__(self, config: DynamicsConfig):
        super().__init__(config)
        D = config.width
        self.token_embed = nn.Embedding(config.num_codes + 1, D)  # + MASK
        # actions 0..A-1, and A = "no action" (the first frame of a clip)
        self.action_embed = nn.Embedding(config.num_actions + 1, D)
        self.transformer = STTransformer(
            STTransformerConfig(
                width=D,
                depth=config.depth,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                num_spatial_tokens=config.tokens_per_frame + config.extra_tokens,
                max_frames=config.num_frames,
                dropout=config.dropout,
                qk_norm=config.qk_norm,
            )
        )
        self.head = nn.Linear(D, config.num_codes)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.action_embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.post_init()

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    def frame_actions(self, actions_BT: Tensor, first_frame_has_action: bool) -> Tensor:
        """Action index leading to each frame: (B, T') -> (B, T), "no action" (A) for a clip's first frame."""
        if first_frame_has_action:
            return actions_BT
        none = actions_BT.new_full((actions_BT.shape[0], 1), self.config.num_actions)
        return torch.cat([none, actions_BT], dim=1)

    def embed(self, tokens_BTN: Tensor, lead_actions_BT: Tensor) -> Tensor:
        """Token ids (MASK allowed) and the action leading to each frame -> transformer input (B, T, N', D)."""
        x_BTND = self.token_embed(tokens_BTN)
        a_BTD = self.action_embed(lead_actions_BT)
        if self.config.action_conditioning == "prepend":
            return torch.cat([a_BTD[:, :, None, :], x_BTND], dim=2)  # (B, T, 1 + N, D)
        return x_BTND + a_BTD[:, :, None, :]

    def logits_from(self, h_BTND: Tensor) -> Tensor:
        """Transformer output -> logits over the V codes of the N image tokens: (B, T, N, V)."""
        return self.head(h_BTND[:, :, self.config.extra_tokens :])

    def step_logits(
        self,
        tokens_BTN: Tensor,
        lead_actions_BT: Tensor,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Logits for frames given as ids (MASK allowed), optionally after cached past frames: (B, T, N, V)."""
        h = self.transformer(self.embed(tokens_BTN, lead_actions_BT), cache=cache, update_cache=update_cache)
        return self.logits_from(h)

    def random_mask(self, shape_BTN: tuple[int, int, int], device: torch.device, generator=None) -> Tensor:
        """MaskGIT training mask: frame 1 clean; each later frame masked at its own rate ~ U(min, max)."""
        B, T, N = shape_BTN
        lo, hi = self.config.mask_rate_min, self.config.mask_rate_max
        rate_BT1 = lo + (hi - lo) * torch.rand(B, T, 1, device=device, generator=generator)
        mask_BTN = torch.rand(B, T, N, device=device, generator=generator) < rate_BT1
        mask_BTN[:, 0] = False
        return mask_BTN

    def forward(self, tokens: Tensor, actions: Tensor, mask: Tensor | None = None) -> DynamicsOutput:
        """Masked-token prediction loss for a clip.

        Args:
            tokens: (B, T, h, w) or (B, T, N) long token ids from the tokenizer.
            actions: (B, T-1) long latent actions; ``actions[:, t]`` leads from frame t to frame t+1.
            mask: optional (B, T, N) bool mask to use instead of a random MaskGIT mask.

        Returns:
            DynamicsOutput with the cross entropy over masked tokens.
        """
        tokens_BTN = tokens.flatten(2) if tokens.ndim == 4 else tokens
        B, T, N = tokens_BTN.shape
        if actions.shape != (B, T - 1):
            raise ValueError(f"actions must be (B, T-1) = {(B, T - 1)}, got {tuple(actions.shape)}")
        mask_BTN = self.random_mask((B, T, N), tokens_BTN.device) if mask is None else mask
        inputs_BTN = tokens_BTN.masked_fill(mask_BTN, self.config.mask_id)
        logits_BTNV = self.step_logits(inputs_BTN, self.frame_actions(actions, first_frame_has_action=False))
        picked = logits_BTNV[mask_BTN].float()  # (M, V) masked positions only
        target = tokens_BTN[mask_BTN]
        if target.numel() == 0:
            zero = logits_BTNV.sum() * 0.0
            return DynamicsOutput(logits_BTNV, zero, zero.detach(), mask_BTN)
        loss = F.cross_entropy(picked, target)
        accuracy = (picked.argmax(-1) == target).float().mean()
        return DynamicsOutput(logits=logits_BTNV, loss=loss, accuracy=accuracy.detach(), mask=mask_BTN)


def to_grid(tokens_BTN: Tensor, grid_size: int) -> Tensor:
    """(B, T, N) -> (B, T, h, w)."""
    return rearrange(tokens_BTN, "b t (h w) -> b t h w", h=grid_size)


register_auto(DynamicsConfig, DynamicsModel)

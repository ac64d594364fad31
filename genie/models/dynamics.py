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
conditioned on ``a_t`` (frame 1 gets a learned "no action"), in one of three ways (``action_conditioning``):

- ``"film"`` (default): the action scales and shifts every token of the frame it leads to, at the input
  and again before the output head (feature-wise linear modulation).
- ``"prepend"``: every frame gets one extra token in front of its N tokens, the action's embedding;
  spatial attention lets every token read it. Jasmine found it much better than adding on CoinRun.
- ``"add"``: the action embedding is added to every token of the frame.

Measured on the synthetic sprites (tokens of the tiny tokenizer, true actions, width 64, depth 2, 1000
steps; the share of held-out frames whose sprite is predicted in its new cell, with the true vs random
actions): film 0.375 vs 0.102, prepend 0.055 vs 0.059, add 0.039 vs 0.035. So film is the default; the
other two had not started to use the action at that budget. Why: which cell the sprite enters depends on
the *product* of the action and the neighbourhood's content; a multiplicative conditioning represents
that product in one layer, an additive one (or one read through attention) has to build it first.

``spatial_context`` (default 1) adds a 3x3 convolution over each frame's token grid to the token
embeddings (residual), so "the sprite is in my left neighbour" is a feature of a token before any
attention. Without it (0, the plain Genie model) the same run reached 0.004: with temporal attention only
along one grid position and learned absolute spatial positions, that relation has to be learned first.

Training (MaskGIT): the first ``start`` frames of each clip are clean and the frames after them masked.
``start`` is 1 (the prompt frame), or, for a ``clean_prefix_prob`` share of the clips (default 0.5), a clean
prefix of 1..T-1 frames (uniform): generation always predicts a frame from clean past frames (its own, in
the KV cache), and without prefixes the model would never see a clean history longer than one frame. Each
masked frame gets its own rate r, and each of its tokens is replaced by MASK with probability r (at least one
token per frame): ``mask_schedule="cosine"`` (default) draws r = cos(pi/2 u), u ~ U(0, 1), MaskGIT's schedule,
so rates reach down to ~0 like the sampler's last refinement steps (r < 0.2 in 13 % of frames); ``"uniform"``
draws r ~ U(mask_rate_min, mask_rate_max) = U(0.5, 1), the regime before these options. Frames after the
first masked one are masked too, each at its own rate, rather than left out of the loss: causal attention
keeps them from touching the earlier frames' predictions, and they add training tokens (in 1xgpt's clean-
prefix batches as well). ``context_noise`` (default 0) replaces each unmasked input token by a different
random id with that probability, as 1xgpt does for robustness to the sampler's own mistakes; the targets stay
the true ids. The model predicts the original ids of masked tokens (cross entropy over masked positions
only). Temporal attention is causal, so frame t's prediction sees only frames <= t. With every option off
(uniform, 0, 0) the masks are the old ones for the same random state (but for a frame the old draw left
without any masked token, which now gets one: at rates >= 0.5, a chance of 2^-N per frame).

The defaults were measured on the synthetic sprites (the world learning test's chain: tiny tokenizer 400
steps, LAM 300, ``configs/tiny/dynamics.yaml`` 700 steps on the token shards; ``genie eval world``, 96
held-out clips, 1 prompt frame, greedy, 4 MaskGIT steps; dynamics seeds 0 / 1). ΔtPSNR(4) and mean PSNR over
4 steps (copying the prompt: 24.0 dB), mean PSNR over 10 steps (copying: 20.4 dB):

==================================  ===============  ==============  ===============
prefix, schedule, noise             ΔtPSNR(4) dB     PSNR 4 steps    PSNR 10 steps
==================================  ===============  ==============  ===============
0, uniform, 0 (before)              20.0 / 27.6      39.5 / 44.5     29.7 / 36.4
0, cosine, 0                        20.9 / 27.7      39.9 / 45.1     29.5 / 37.0
0.5, cosine, 0 (default)            22.3 / 27.6      41.5 / 44.6     32.0 / 36.4
0.5, uniform, 0                     12.2 / 21.7      33.7 / 40.1     24.0 / 31.0
0, uniform, 0.05                     8.8 / 16.5      30.7 / 36.1     20.5 / 26.1
0, cosine, 0.05                     12.1 / 24.2      31.9 / 42.2     21.2 / 33.0
0.5, cosine, 0.05                    9.3 / 19.1      26.8 / 36.5     20.1 / 28.7
0.5, uniform, 0.05                   0.0 / 18.1      15.4 / 36.1     13.8 / 27.3
==================================  ===============  ==============  ===============

The cosine schedule with clean prefixes wins on the mean of both seeds (ΔtPSNR(4) 24.9 vs 23.8 dB, 10-step
PSNR 34.2 vs 33.1), clearly on seed 0 and level on seed 1: a small gain next to the seed spread. Clean prefixes
with the uniform schedule lose (they only drop masked frames, and so training tokens); context noise loses
everywhere at this budget on these near-exact tokens, so it stays off (it may pay where the tokenizer and the
model err more, as on CoinRun: unmeasured).

Generation (:class:`genie.models.sampler.MaskGITSampler`) fills one frame at a time, starting from all
MASK, over a few refinement steps, reading past frames from a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, final

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn

from genie.models.blocks import KVCache
from genie.models.conditioning import (
    DynamicsBase,
    DynamicsCommonConfig,
    action_embedding,
    check_actions,
    condition_input,
    condition_output,
    embed_actions,
    init_action_embedding,
    init_neighbours,
    lead_with_no_action,
    mix_neighbours,
    neighbour_conv,
)
from genie.models.hub import register_auto

ACTION_CONDITIONINGS = ("prepend", "add", "film")
MASK_SCHEDULES = ("uniform", "cosine")


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class DynamicsConfig(DynamicsCommonConfig):
    """MaskGIT dynamics model hyper-parameters (with the common fields of every kind, DynamicsCommonConfig in
    genie/models/conditioning.py); exactly the model fields of ``config.json``."""

    model_type = "genie_dynamics"
    conditionings: ClassVar[tuple[str, ...]] = ACTION_CONDITIONINGS  # "prepend": an action token per frame

    kind: Literal["maskgit"] = "maskgit"  # the dynamics kind (genie/models/kinds.py): masked-token prediction
    # training mask rate of a masked frame: "cosine" draws r = cos(pi/2 u), u ~ U(0, 1) (MaskGIT's schedule: rates
    # down to ~0, as in the sampler's last steps); "uniform" draws r ~ U(mask_rate_min, mask_rate_max) (the regime
    # before these options, with 0.5 and 1; min/max are used by "uniform" only). Defaults measured: module docstring
    mask_schedule: str = "cosine"
    mask_rate_min: float = 0.5
    mask_rate_max: float = 1.0
    # share of training clips that keep a clean prefix of random length (1..T-1 frames, uniform) and mask only the
    # frames after it (as generation, which always has clean past frames); the others mask every frame after the first
    clean_prefix_prob: float = 0.5
    # probability that each unmasked input token of a training clip is replaced by a different random id (targets
    # stay the true ids; loss only on masked tokens): robustness to the sampler's own errors in past frames (1xgpt).
    # Off by default: 0.05 cost 3-13 dB of ΔtPSNR(4) on the sprites at the measured budget (module docstring)
    context_noise: float = 0.0

    def __post_init__(self, **kwargs):
        if not 0.0 < self.mask_rate_min <= self.mask_rate_max <= 1.0:
            raise ValueError("need 0 < mask_rate_min <= mask_rate_max <= 1")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {self.mask_schedule!r}")
        if not 0.0 <= self.clean_prefix_prob <= 1.0:
            raise ValueError(f"clean_prefix_prob must be in [0, 1], got {self.clean_prefix_prob}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"context_noise must be in [0, 1), got {self.context_noise}")
        super().__post_init__(**kwargs)

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


class DynamicsModel(DynamicsBase):
    """Genie's MaskGIT dynamics model (see the module docstring)."""

    config_class = DynamicsConfig
    main_input_name = "tokens"

    def __init__(self, config: DynamicsConfig):
        super().__init__(config)
        D = config.width
        self.token_embed = nn.Embedding(config.num_codes + 1, D)  # + MASK
        # actions 0..A-1, and A = "no action" (the first frame of a clip)
        film = config.action_conditioning == "film"
        # film: per action, (scale, shift) of the input tokens and (scale, shift) of the output features
        self.action_embed = action_embedding(config.num_actions + 1, D, film)
        self.transformer = self.make_stack(config.tokens_per_frame + config.extra_tokens, config.num_frames)
        self.head = nn.Linear(D, config.num_codes)
        self.neighbours = neighbour_conv(D, config.spatial_context)
        init_neighbours(self.neighbours)  # (this order of random draws keeps the weights of seeded runs as before)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_action_embedding(self.action_embed, D, film)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.post_init()

    def frame_actions(self, actions_BT: Tensor, first_frame_has_action: bool) -> Tensor:
        """Action index leading to each frame: (B, T') -> (B, T), "no action" (A) for a clip's first frame (weights
        (B, T', A) likewise, see :func:`~genie.models.conditioning.lead_with_no_action`)."""
        if first_frame_has_action:
            return actions_BT
        return lead_with_no_action(actions_BT, self.config.num_actions)

    def embed(self, tokens_BTN: Tensor, lead_actions_BT: Tensor) -> Tensor:
        """Token ids (MASK allowed) and the action leading to each frame -> transformer input (B, T, N', D)."""
        x_BTND = mix_neighbours(self.neighbours, self.token_embed(tokens_BTN), self.config.grid_size)
        a_BTX = embed_actions(self.action_embed, lead_actions_BT)  # (B, T, 4D) for film
        if self.config.action_conditioning == "prepend":
            return torch.cat([a_BTX[:, :, None, :], x_BTND], dim=2)  # (B, T, 1 + N, D)
        return condition_input(x_BTND, a_BTX, self.config.action_conditioning)

    def logits_from(self, h_BTND: Tensor, lead_actions_BT: Tensor | None = None) -> Tensor:
        """Transformer output -> logits over the V codes of the N image tokens: (B, T, N, V)."""
        h_BTND = h_BTND[:, :, self.config.extra_tokens :]
        if self.config.action_conditioning == "film":
            assert lead_actions_BT is not None
            h_BTND = condition_output(h_BTND, embed_actions(self.action_embed, lead_actions_BT), "film")
        return self.head(h_BTND)

    def step_logits(
        self,
        tokens_BTN: Tensor,
        lead_actions_BT: Tensor,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Logits for frames given as ids (MASK allowed), optionally after cached past frames: (B, T, N, V)."""
        h = self.transformer(self.embed(tokens_BTN, lead_actions_BT), cache=cache, update_cache=update_cache)
        return self.logits_from(h, lead_actions_BT)

    def random_mask(self, shape_BTN: tuple[int, int, int], device: torch.device, generator=None) -> Tensor:
        """MaskGIT training mask (see the module docstring): True where a token is replaced by MASK.

        Each clip's first ``start`` frames are clean: ``start`` = 1, or for a ``clean_prefix_prob`` share of
        clips a clean prefix of 1..T-1 frames (uniform). Every later frame is masked at its own rate from
        ``mask_schedule``, with at least one masked token. Draws (in this order, the first two as before these
        options existed, so with them off the masks are the old ones): rates (B, T, 1), token draws (B, T, N),
        then, only when ``clean_prefix_prob > 0`` and T > 2, which clips keep a prefix (B) and its length (B).
        """
        B, T, N = shape_BTN
        cfg = self.config
        u_BT1 = torch.rand(B, T, 1, device=device, generator=generator)
        if cfg.mask_schedule == "cosine":
            rate_BT1 = torch.cos(math.pi / 2 * u_BT1)  # u in [0, 1): rate in (0, 1]
        else:
            rate_BT1 = cfg.mask_rate_min + (cfg.mask_rate_max - cfg.mask_rate_min) * u_BT1
        draw_BTN = torch.rand(B, T, N, device=device, generator=generator)
        mask_BTN = draw_BTN < rate_BT1
        # at least one masked token per masked frame, without another draw: the token with the lowest draw
        mask_BTN |= draw_BTN == draw_BTN.amin(dim=-1, keepdim=True)
        start_B = torch.ones(B, dtype=torch.long, device=device)
        if cfg.clean_prefix_prob > 0 and T > 2:
            prefixed_B = torch.rand(B, device=device, generator=generator) < cfg.clean_prefix_prob
            length_B = torch.randint(1, T, (B,), device=device, generator=generator)
            start_B = torch.where(prefixed_B, length_B, start_B)
        clean_BT = torch.arange(T, device=device) < start_B[:, None]
        return mask_BTN & ~clean_BT[:, :, None]

    def corrupt_context(self, inputs_BTN: Tensor, mask_BTN: Tensor, generator=None) -> Tensor:
        """Replace each unmasked input token by a different random id with probability ``context_noise``."""
        p = self.config.context_noise
        if p <= 0:
            return inputs_BTN
        V = self.config.num_codes
        hit_BTN = (torch.rand(inputs_BTN.shape, device=inputs_BTN.device, generator=generator) < p) & ~mask_BTN
        shift_BTN = torch.randint(1, V, inputs_BTN.shape, device=inputs_BTN.device, generator=generator)
        return torch.where(hit_BTN, (inputs_BTN + shift_BTN) % V, inputs_BTN)

    def forward(self, tokens: Tensor, actions: Tensor, mask: Tensor | None = None) -> DynamicsOutput:
        """Masked-token prediction loss for a clip.

        Args:
            tokens: (B, T, h, w) or (B, T, N) long token ids from the tokenizer.
            actions: (B, T-1) long latent actions; ``actions[:, t]`` leads from frame t to frame t+1. Or weights
                (B, T-1, A) float: a straight-through one-hot from a LAM trained through this loss.
            mask: optional (B, T, N) bool mask to use instead of a random MaskGIT mask; with it the unmasked
                tokens are not corrupted (``context_noise`` is part of the random training objective only).

        Returns:
            DynamicsOutput with the cross entropy over masked tokens.
        """
        tokens_BTN = tokens.flatten(2) if tokens.ndim == 4 else tokens
        B, T, N = tokens_BTN.shape
        check_actions(actions, B, T)
        if mask is None:  # the training objective: random mask, corrupted context
            mask_BTN = self.random_mask((B, T, N), tokens_BTN.device)
            inputs_BTN = self.corrupt_context(tokens_BTN, mask_BTN).masked_fill(mask_BTN, self.config.mask_id)
        else:  # a given mask (evaluation): the context exactly as given
            mask_BTN = mask
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

    def next_frame_output(self, tokens: Tensor, actions: Tensor) -> DynamicsOutput:
        """Teacher-forced next frame: every token of the last frame masked, all earlier frames clean and true.

        Its ``accuracy`` is the share of the last frame's tokens whose most likely id is the true one (what
        ``genie eval world`` reports as teacher-forced token accuracy, there through the sampler's cache).
        """
        tokens_BTN = tokens.flatten(2) if tokens.ndim == 4 else tokens
        mask_BTN = torch.zeros(tokens_BTN.shape, dtype=torch.bool, device=tokens_BTN.device)
        mask_BTN[:, -1] = True
        return self(tokens_BTN, actions, mask=mask_BTN)


def to_grid(tokens_BTN: Tensor, grid_size: int) -> Tensor:
    """(B, T, N) -> (B, T, h, w)."""
    return rearrange(tokens_BTN, "b t (h w) -> b t h w", h=grid_size)


register_auto(DynamicsConfig, DynamicsModel)

"""Causal dynamics model: next-token prediction over each frame's tokens in raster order, over the ST transformer.

Dimension keys:
    B: batch size
    T: frames of a clip;  S = T - 1 slots (one per predicted frame)
    N: tokens per frame (h * w of the tokenizer's grid)
    P: tokens per slot as the transformer sees them (2 N: the context frame, then the frame being predicted)
    D: width
    V: tokenizer codebook size (token ids 0..V-1; id V is BOS, the "start of frame" input)
    A: number of latent actions

The model factorises a frame as p(z_t | past) = prod_n p(z_{t,n} | z_{t,<n}, past, a_{t-1}) and is trained with
teacher forcing (cross entropy on every token of every frame after the first). Generation samples one token at a
time, reading keys/values from caches.

Layout. Slot t (t = 1 .. T-1) is one "frame" of the ST transformer with P = 2 N tokens:

    [ z_{t-1, 0} .. z_{t-1, N-1} | BOS, z_{t, 0} .. z_{t, N-2} ]
      context half: the last known    generation half: the frame being predicted, shifted right by one;
      frame, whole                    output n predicts z_{t, n}

The context half attends bidirectionally within itself and causally across slots (temporal attention, so the
history reaches back ``num_frames - 1`` frames); the generation half attends to the whole context half and
causally to itself (raster order) and takes no part in temporal attention (``STTransformerConfig.causal_tokens``,
genie/models/blocks.py). So every token being predicted sees the whole previous frame, the earlier frames through
the context half, and the tokens of its own frame before it. The simpler layout of one ST "frame" per video frame
with causal spatial attention (Jasmine's) cannot do that: with spatial-then-temporal factorisation, position n
only ever reads positions <= n of earlier frames, so anything entering a cell from the right or from below (a
sprite moving left, a platform scrolling in) is invisible when that cell is predicted. The price here is twice
the tokens per predicted frame: a training step costs about twice a MaskGIT step of the same width and depth.

The action a_{t-1} (from frame t-1 to frame t) conditions every token of slot t, as in the MaskGIT model
(:mod:`genie.models.conditioning`: FiLM by default, or addition); ``spatial_context`` mixes each context token's
grid neighbours into its embedding (the generation half is not mixed: a neighbour to the right or below is a
token not generated yet).

Generation (:class:`CausalSampler`): for each new frame, the context half of its slot (the last frame and the
action) runs once, writing its temporal keys/values into the ring cache of past slots
(:class:`~genie.models.blocks.RingKVCache`, the same ring the MaskGIT sampler uses) and its spatial keys/values
into the frame cache (:class:`~genie.models.blocks.FrameKVCache`); then each of the N tokens is one forward of a
single token against the frame cache. A frame costs N small sequential steps instead of MaskGIT's few full-frame
steps: exact likelihood-ordered sampling, paid for in latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, final

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn

from genie.models.blocks import FrameKVCache, RingKVCache
from genie.models.conditioning import (
    DynamicsBase,
    DynamicsCommonConfig,
    action_embedding,
    at_least_fp32,
    check_actions,
    condition_input,
    condition_output,
    embed_actions,
    init_action_embedding,
    init_neighbours,
    mix_neighbours,
    neighbour_conv,
)
from genie.models.hub import register_auto

CAUSAL_CONDITIONINGS = ("film", "add")  # no "prepend": an action token would be one more token to order


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class CausalDynamicsConfig(DynamicsCommonConfig):
    """Causal dynamics model hyper-parameters (with the common fields of every kind, DynamicsCommonConfig in
    genie/models/conditioning.py: there ``num_frames`` is the training clip length T, and temporal attention spans
    its T - 1 slots; ``spatial_context`` mixes the context halves only); exactly the model fields of ``config.json``."""

    model_type = "genie_causal_dynamics"
    conditionings: ClassVar[tuple[str, ...]] = CAUSAL_CONDITIONINGS

    kind: Literal["causal"] = "causal"  # the dynamics kind: next-token prediction in raster order

    def __post_init__(self, **kwargs):
        if self.num_frames < 2:
            raise ValueError(
                f"num_frames must be >= 2 (a frame to predict from and one to predict), got {self.num_frames}"
            )
        super().__post_init__(**kwargs)

    @property
    def bos_id(self) -> int:
        """The input id in front of a frame's first token."""
        return self.num_codes


@dataclass
class CausalOutput:
    """Result of :meth:`CausalDynamicsModel.forward`."""

    logits: Tensor  # (B, T-1, N, V) logits of frames 1..T-1, token n given tokens < n
    loss: Tensor  # () cross entropy over every token of frames 1..T-1
    accuracy: Tensor  # () top-1 accuracy over the same tokens


class CausalDynamicsModel(DynamicsBase):
    """Next-token dynamics model (see the module docstring)."""

    config_class = CausalDynamicsConfig
    main_input_name = "tokens"

    def __init__(self, config: CausalDynamicsConfig):
        super().__init__(config)
        D, N = config.width, config.tokens_per_frame
        self.token_embed = nn.Embedding(config.num_codes + 1, D)  # + BOS
        self.action_embed = action_embedding(config.num_actions, D, config.action_conditioning == "film")
        self.transformer = self.make_stack(2 * N, config.num_frames - 1, causal_tokens=N)  # T - 1 slots of 2N
        self.head = nn.Linear(D, config.num_codes)
        self.neighbours = neighbour_conv(D, config.spatial_context)
        init_neighbours(self.neighbours)
        init_action_embedding(self.action_embed, D, config.action_conditioning == "film")
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.post_init()

    # -- pieces shared by training and generation ------------------------------------------------------

    def embed_context(self, frames_BSN: Tensor, a_BSX: Tensor) -> Tensor:
        """Context halves: the known frames' ids (B, S, N) under their slots' actions -> (B, S, N, D)."""
        x_BSND = mix_neighbours(self.neighbours, self.token_embed(frames_BSN), self.config.grid_size)
        return condition_input(x_BSND, a_BSX, self.config.action_conditioning)

    def embed_generation(self, inputs_BSL: Tensor, a_BSX: Tensor) -> Tensor:
        """Generation-half inputs (BOS or the previous token's id, (B, S, L)) -> (B, S, L, D)."""
        return condition_input(self.token_embed(inputs_BSL), a_BSX, self.config.action_conditioning)

    def logits_from(self, h_BSLD: Tensor, a_BSX: Tensor) -> Tensor:
        """Generation-half outputs -> logits over the V codes (B, S, L, V)."""
        return self.head(condition_output(h_BSLD, a_BSX, self.config.action_conditioning))

    # -- training ------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, actions: Tensor) -> CausalOutput:
        """Teacher-forced next-token loss of a clip.

        Args:
            tokens: (B, T, h, w) or (B, T, N) long token ids from the tokenizer.
            actions: (B, T-1) long actions; ``actions[:, t]`` leads from frame t to frame t+1 (or weights
                (B, T-1, A), see :func:`~genie.models.conditioning.check_actions`).

        Returns:
            CausalOutput with the cross entropy over every token of frames 1..T-1.
        """
        tokens_BTN = tokens.flatten(2) if tokens.ndim == 4 else tokens
        B, T, N = tokens_BTN.shape
        check_actions(actions, B, T)
        if T < 2:
            raise ValueError("a clip needs at least 2 frames (one to predict from, one to predict)")
        # -- slots: context = frames 0..T-2, targets = frames 1..T-1 (shifted right behind BOS) --
        context_BSN, target_BSN = tokens_BTN[:, :-1], tokens_BTN[:, 1:]
        bos_BS1 = target_BSN.new_full((B, T - 1, 1), self.config.bos_id)
        inputs_BSN = torch.cat([bos_BS1, target_BSN[:, :, :-1]], dim=2)
        a_BSX = embed_actions(self.action_embed, actions)
        # -- the stack over (B, S, 2N, D) --
        x_BSPD = torch.cat([self.embed_context(context_BSN, a_BSX), self.embed_generation(inputs_BSN, a_BSX)], dim=2)
        h_BSPD = self.transformer(x_BSPD)
        logits_BSNV = self.logits_from(h_BSPD[:, :, N:], a_BSX)
        # -- loss on every predicted token --
        flat = at_least_fp32(logits_BSNV.flatten(0, 2))
        target = target_BSN.flatten()
        loss = F.cross_entropy(flat, target)
        accuracy = (flat.argmax(-1) == target).float().mean()
        return CausalOutput(logits=logits_BSNV, loss=loss, accuracy=accuracy.detach())

    def next_frame_output(self, tokens: Tensor, actions: Tensor) -> CausalOutput:
        """Teacher-forced last frame: loss and accuracy of its tokens given the true earlier frames and tokens."""
        out = self(tokens, actions)
        last_BNV = at_least_fp32(out.logits[:, -1])
        target_BN = (tokens.flatten(2) if tokens.ndim == 4 else tokens)[:, -1]
        loss = F.cross_entropy(last_BNV.flatten(0, 1), target_BN.flatten())
        accuracy = (last_BNV.argmax(-1) == target_BN).float().mean()
        return CausalOutput(logits=out.logits[:, -1:], loss=loss, accuracy=accuracy.detach())

    # -- generation (the caches' side; see CausalSampler) ---------------------------------------------

    def context_step(self, frame_BN: Tensor, action_B: Tensor, cache: RingKVCache, frame_cache: FrameKVCache) -> None:
        """Open the slot after ``frame_BN``: its context half through the stack, appended to the ring of past slots
        and written into the frame cache the new frame's tokens read."""
        a_B1X = self.action_embed(action_B[:, None])
        self.transformer(self.embed_context(frame_BN[:, None], a_B1X), cache=cache, frame_cache=frame_cache)

    def token_logits(self, inputs_BL: Tensor, offset: int, action_B: Tensor, frame_cache: FrameKVCache) -> Tensor:
        """Logits (B, L, V) of tokens offset+1 .. offset+L of the open slot's frame from their inputs (B, L) (BOS or
        the token before each), given the slot's context and generation tokens before ``offset`` in the cache."""
        a_B1X = self.action_embed(action_B[:, None])
        x_B1LD = self.embed_generation(inputs_BL[:, None], a_B1X)
        N = self.config.tokens_per_frame
        h_B1LD = self.transformer(x_B1LD, frame_cache=frame_cache, offset=N + offset)
        return self.logits_from(h_B1LD, a_B1X)[:, 0]


class CausalSampler:
    """Frame-by-frame, token-by-token sampler of a :class:`CausalDynamicsModel` (the MaskGIT sampler's interface).

    Usage::

        sampler = CausalSampler(model, SamplerConfig(temperature=1.0))
        sampler.reset(context_tokens_BTN, context_actions_BT)
        next_BN = sampler.next_frame(actions_B, generator=g)

    Of the :class:`~genie.models.sampler.SamplerConfig` fields, ``temperature`` applies (0: the most likely token);
    ``steps`` and ``unmask`` are MaskGIT's and ignored; the caches are always used; ``compile`` is refused (the
    token step is not compiled yet).
    """

    def __init__(self, model: CausalDynamicsModel, config=None):
        from genie.models.sampler import SamplerConfig

        self.model = model
        self.config = config or SamplerConfig()
        if self.config.compile:
            raise ValueError("compile is not available for the causal dynamics kind yet: drop --compile")
        if not self.config.use_cache:
            raise ValueError("the causal sampler always reads its KV caches: drop use_cache=False / nocache")
        self.cache: RingKVCache | None = None
        self.frame_cache: FrameKVCache | None = None
        self.last_BN: Tensor | None = None  # the newest frame, the context of the next slot
        self.open_action_B: Tensor | None = None  # the action of the slot opened for the next frame, if any
        self.history_BTN: Tensor | None = None  # a window of the frames so far, for callers to read

    @property
    def window(self) -> int:
        return self.model.config.num_frames

    @torch.no_grad()
    def reset(self, tokens_BTN: Tensor, actions_BT: Tensor | None = None) -> None:
        """Start new sequences from T >= 1 context frames and the T-1 actions between them."""
        from genie.models.sampler import context_of

        tokens_BTN, actions_BT = context_of(tokens_BTN, actions_BT)
        T = tokens_BTN.shape[1]
        self.cache = self.model.transformer.make_cache(ring=True)
        self.frame_cache = FrameKVCache(self.model.config.depth)
        self.open_action_B = None
        # the slots of the context's own transitions (their targets are known: only their context halves run)
        for t in range(T - 1):
            self.model.context_step(tokens_BTN[:, t], actions_BT[:, t], self.cache, self.frame_cache)
        self.last_BN = tokens_BTN[:, -1]
        self.history_BTN = tokens_BTN[:, -self.window :]

    def _open(self, actions_B: Tensor) -> None:
        assert self.last_BN is not None and self.cache is not None and self.frame_cache is not None
        if self.open_action_B is None:
            self.model.context_step(self.last_BN, actions_B, self.cache, self.frame_cache)
            self.open_action_B = actions_B
        elif not torch.equal(self.open_action_B, actions_B):
            raise ValueError("the next frame was already asked for under other actions")

    def _check(self, actions_B: Tensor) -> None:
        if self.last_BN is None:
            raise RuntimeError("call reset(context) first")
        A = self.model.num_actions
        if actions_B.min() < 0 or actions_B.max() >= A:
            raise ValueError(f"actions must be in [0, {A}), got {actions_B.tolist()}")

    @torch.no_grad()
    def next_frame(self, actions_B: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample the next frame of every sequence under ``actions_B`` (B,) and append it: returns (B, N)."""
        from genie.models.sampler import sample_ids

        self._check(actions_B)
        self._open(actions_B)
        assert self.last_BN is not None
        B, N = self.last_BN.shape
        temperature = self.config.temperature
        frame_BN = torch.empty_like(self.last_BN)
        input_B1 = self.last_BN.new_full((B, 1), self.model.config.bos_id)
        for n in range(N):
            logits_BV = at_least_fp32(self.token_logits(input_B1, n, actions_B)[:, 0])
            u_B = torch.rand(B, device=logits_BV.device, generator=generator) if temperature > 0 else None
            frame_BN[:, n] = sample_ids(logits_BV, temperature, u_B)[0]
            input_B1 = frame_BN[:, n : n + 1]
        self.append(frame_BN, actions_B)
        return frame_BN

    def token_logits(self, inputs_BL: Tensor, offset: int, actions_B: Tensor) -> Tensor:
        assert self.frame_cache is not None
        return self.model.token_logits(inputs_BL, offset, actions_B, self.frame_cache)

    @torch.no_grad()
    def next_frame_logits(self, actions_B: Tensor, frame_BN: Tensor) -> Tensor:
        """Teacher forcing: logits (B, N, V) of the next frame's tokens, each given the true ones before it
        (``frame_BN``) and the context; follow with :meth:`append` of the true frame."""
        self._check(actions_B)
        self._open(actions_B)
        B = frame_BN.shape[0]
        bos_B1 = frame_BN.new_full((B, 1), self.model.config.bos_id)
        return self.token_logits(torch.cat([bos_B1, frame_BN[:, :-1]], dim=1), 0, actions_B)

    @torch.no_grad()
    def append(self, frame_BN: Tensor, actions_B: Tensor) -> None:
        """Commit a frame (sampled, or the true one for teacher forcing) reached under ``actions_B``."""
        self._check(actions_B)
        self._open(actions_B)
        assert self.history_BTN is not None
        self.last_BN, self.open_action_B = frame_BN, None
        self.history_BTN = torch.cat([self.history_BTN, frame_BN[:, None]], 1)[:, -self.window :]


register_auto(CausalDynamicsConfig, CausalDynamicsModel)

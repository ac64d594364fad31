"""MaskGIT sampling of a dynamics model, one frame at a time, with a cache of past frames.

Dimension keys: B batch, T frames, N tokens per frame, V codebook size.

For each new frame: start with every token MASK; at refinement step s of S, sample every masked token
(softmax with ``temperature``), then keep ``N * cos(pi/2 * (s+1)/S)`` tokens masked (the cosine
schedule) and fix the rest. Which ones get fixed is the ``unmask`` mode: ``"random"`` (the default:
confidence-only unmasking tends to copy the previous frame, as 1xgpt observed) or ``"confidence"``
(MaskGIT's: keep the tokens the model is surest of).

The cache: past frames only influence a new frame through temporal attention, whose keys/values of a
past frame never change (causal attention, relative RoPE positions). So past frames run through the
transformer once, their keys/values stay in a :class:`~genie.models.blocks.KVCache`, and every
refinement step costs one frame of compute. Once the context outgrows the training length the cache
slides: each layer attends to the last ``num_frames - 1`` frames (banded causal attention, so deeper
layers still see further back, as in sliding-window language models). ``use_cache=False`` recomputes
the whole history every step with the same banded attention; it gives the same frames for the same
generator and exists to test and benchmark the cache.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from genie.models.blocks import RingKVCache
from genie.models.dynamics import DynamicsModel

UNMASK_MODES = ("random", "confidence")


@dataclass
class SamplerConfig:
    """How frames are sampled."""

    steps: int = 25
    """MaskGIT refinement steps per frame (Genie: 25)."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    unmask: str = "random"
    """Which sampled tokens to fix at each step: random (default) or confidence."""
    use_cache: bool = True
    """Keep past frames' keys/values (a fixed-size ring) instead of recomputing the context each step."""
    keep_pixels: bool = True
    """Where a new frame's token equals the previous frame's token at the same place, keep that patch's pixels from
    the previous frame instead of decoding it (the World's rendering; token kinds only). What the model says stays
    unchanged then stays exactly as it was, down to the prompt's real pixels, instead of passing through the lossy
    decoder every step: a compositing mask over the previous frame, as in video prediction (Finn et al. 2016)."""
    compile: bool = False
    """``torch.compile`` the refinement step and the commit of a frame (one graph each, every shape fixed; on
    CUDA captured as CUDA graphs). Compiling takes seconds to a minute once; falls back to eager with a warning
    where it fails (e.g. no C++ compiler on a CPU machine)."""


def context_of(frames: Tensor, actions_BT: Tensor | None, grid: bool = True) -> tuple[Tensor, Tensor]:
    """A sampler's context, checked: ids (B, T, N) (``grid``: also (B, T, h, w), flattened) or latents (B, T, N, Z)
    (``grid=False``), and the T-1 actions between the frames (None: none, for a one-frame context)."""
    if grid and frames.ndim == 4:
        frames = frames.flatten(2)
    B, T = frames.shape[:2]
    if actions_BT is None:
        actions_BT = torch.zeros(B, 0, dtype=torch.long, device=frames.device)
    if actions_BT.shape != (B, T - 1):
        raise ValueError(f"context of {T} frames needs actions of shape {(B, T - 1)}, got {tuple(actions_BT.shape)}")
    return frames, actions_BT


def cosine_masked(num_tokens: int, step: int, steps: int) -> int:
    """Tokens still masked after refinement ``step`` (0-based) of ``steps``: N cos(pi/2 (s+1)/S)."""
    return int(math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / steps)))


class MaskGITSampler:
    """Stateful frame-by-frame sampler for a batch of sequences.

    Usage::

        sampler = MaskGITSampler(model, SamplerConfig(steps=10))
        sampler.reset(context_tokens_BTN, context_actions_BT)   # T context frames, T-1 actions
        next_BN = sampler.next_frame(actions_B, generator=g)      # (B, N) token ids
    """

    def __init__(self, model: DynamicsModel, config: SamplerConfig | None = None):
        self.model = model
        self.config = config or SamplerConfig()
        if self.config.unmask not in UNMASK_MODES:
            raise ValueError(f"unmask must be one of {UNMASK_MODES}, got {self.config.unmask!r}")
        if self.config.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.config.steps}")
        if self.config.compile and not self.config.use_cache:
            raise ValueError("compile needs use_cache: the compiled step reads past frames from the ring cache")
        self.cache: RingKVCache | None = None
        self._counts: dict[int, Tensor] = {}  # still-masked counts as device tensors, for compiled steps
        self._refine, self._commit = self.refine, self.commit
        if self.config.compile:
            self._refine, self._commit = compile_step(self.refine), compile_step(self.commit)
        self.history_BTN: Tensor | None = None  # frames so far (all of them without the cache)
        self.lead_BT: Tensor | None = None  # the action leading to each frame so far

    @property
    def window(self) -> int:
        return self.model.config.num_frames

    # -- context --------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self, tokens_BTN: Tensor, actions_BT: Tensor | None = None) -> None:
        """Start new sequences from T >= 1 context frames and the T-1 actions between them."""
        tokens_BTN, actions_BT = context_of(tokens_BTN, actions_BT)
        self.history_BTN = tokens_BTN
        self.lead_BT = self.model.frame_actions(actions_BT, first_frame_has_action=False)
        self.cache = None
        if self.config.use_cache:
            # the whole context goes through once (banded attention, as in generation); the cache then
            # keeps the keys/values of its last num_frames - 1 frames, all any later frame can attend to
            self.cache = self.model.transformer.make_cache(ring=True)
            self.model.step_logits(self.history_BTN, self.lead_BT, cache=self.cache, update_cache=True)

    # -- one frame ------------------------------------------------------------------------------------

    def _logits(self, frame_BN: Tensor, lead_B: Tensor) -> Tensor:
        """Logits (B, N, V) for the frame being generated, given the context so far."""
        if self.cache is not None:
            return self.model.step_logits(frame_BN[:, None], lead_B[:, None], cache=self.cache)[:, 0]
        assert self.history_BTN is not None and self.lead_BT is not None
        # reference path: the whole history again (banded causal attention gives each layer the same
        # reach as the cache), so its cost grows with the rollout length
        tokens = torch.cat([self.history_BTN, frame_BN[:, None]], 1)
        lead = torch.cat([self.lead_BT, lead_B[:, None]], 1)
        return self.model.step_logits(tokens, lead)[:, -1]

    @torch.no_grad()
    def next_frame(self, actions_B: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample the next frame of every sequence under ``actions_B`` (B,) and append it: returns (B, N)."""
        if self.history_BTN is None:
            raise RuntimeError("call reset(context) first")
        A = self.model.num_actions
        if actions_B.min() < 0 or actions_B.max() >= A:
            raise ValueError(f"actions must be in [0, {A}), got {actions_B.tolist()}")
        B, _, N = self.history_BTN.shape
        device = self.history_BTN.device
        frame_BN = torch.full((B, N), self.model.config.mask_id, dtype=torch.long, device=device)
        masked_BN = torch.ones(B, N, dtype=torch.bool, device=device)
        cfg = self.config
        for s in range(cfg.steps):
            # the step's random numbers are drawn here, outside the (compiled) step, from the caller's generator
            u_sample_BN = torch.rand(B, N, device=device, generator=generator) if cfg.temperature > 0 else None
            u_rank_BN = torch.rand(B, N, device=device, generator=generator) if cfg.unmask == "random" else None
            n_masked = self._still_masked(s)
            frame_BN, masked_BN = self._refine(frame_BN, masked_BN, actions_B, n_masked, u_sample_BN, u_rank_BN)
        self.append(frame_BN, actions_B)
        return frame_BN

    def _still_masked(self, step: int) -> Tensor | int:
        """Tokens left masked after ``step``: a python int, or for compiled steps a device tensor (no recompiles)."""
        n = cosine_masked(self.model.config.tokens_per_frame, step, self.config.steps)
        if not self.config.compile:
            return n
        if n not in self._counts:
            self._counts[n] = torch.tensor(n, device=self.model.token_embed.weight.device)
        return self._counts[n]

    def refine(
        self,
        frame_BN: Tensor,
        masked_BN: Tensor,
        actions_B: Tensor,
        still_masked: Tensor | int,
        u_sample_BN: Tensor | None,
        u_rank_BN: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """One MaskGIT refinement step of the frame being made: (frame, masked) -> (frame, masked), each (B, N)."""
        logits_BNV = self._logits(frame_BN, actions_B).float()
        return choose_tokens(
            logits_BNV, frame_BN, masked_BN, still_masked, self.config.temperature, u_sample_BN, u_rank_BN
        )

    def commit(self, frame_BN: Tensor, actions_B: Tensor) -> None:
        """Write a finished frame's keys/values into the ring cache and advance it."""
        assert self.cache is not None
        self.model.step_logits(frame_BN[:, None], actions_B[:, None], cache=self.cache, update_cache=True)

    @torch.no_grad()
    def masked_logits(self, actions_B: Tensor) -> Tensor:
        """Logits (B, N, V) for a fully masked next frame under ``actions_B``: the one-step prediction."""
        if self.history_BTN is None:
            raise RuntimeError("call reset(context) first")
        B, _, N = self.history_BTN.shape
        frame_BN = torch.full((B, N), self.model.config.mask_id, dtype=torch.long, device=self.history_BTN.device)
        return self._logits(frame_BN, actions_B)

    @torch.no_grad()
    def next_frame_logits(self, actions_B: Tensor, frame_BN: Tensor | None = None) -> Tensor:
        """Teacher forcing, the interface every kind's sampler has: logits (B, N, V) of the next frame. MaskGIT's is
        the one-step prediction of a fully masked frame (:meth:`masked_logits`); the true frame is not read."""
        return self.masked_logits(actions_B)

    @torch.no_grad()
    def append(self, frame_BN: Tensor, actions_B: Tensor) -> None:
        """Commit a frame (sampled, or the true one for teacher forcing) reached under ``actions_B`` to the context."""
        assert self.history_BTN is not None and self.lead_BT is not None
        if self.cache is not None:
            self._commit(frame_BN, actions_B)
            # the cache holds what the model needs; keep only a window of ids for callers to read
            keep = self.window
        else:
            keep = None
        self.history_BTN = torch.cat([self.history_BTN, frame_BN[:, None]], 1)
        self.lead_BT = torch.cat([self.lead_BT, actions_B[:, None]], 1)
        if keep is not None:
            self.history_BTN, self.lead_BT = self.history_BTN[:, -keep:], self.lead_BT[:, -keep:]


def compile_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` a sampler step (CUDA: mode "reduce-overhead", i.e. CUDA graphs); eager if compiling fails.

    The first call compiles; a failure there (a CPU machine without a C++ compiler, an unsupported backend) warns
    once and runs ``fn`` eagerly from then on, so a world never stops stepping because it could not be compiled.
    On CUDA each call begins a new CUDA-graph step and its tensor outputs are cloned: a replay reuses the graph's
    output memory, and a caller keeps frames (and the next step reads the last one) past the next replay.
    (The CUDA path is written to PyTorch's CUDA-graph rules but has not yet run on a GPU: scripts/gpu_realtime.sh.)
    """
    compiled: Callable[..., Any] | None = None
    failed = cuda = False

    def step(*args: Any) -> Any:
        nonlocal compiled, failed, cuda
        if failed:
            return fn(*args)
        if compiled is None:
            cuda = any(isinstance(a, Tensor) and a.is_cuda for a in args)
            compiled = torch.compile(fn, dynamic=False, mode="reduce-overhead" if cuda else None)
        try:
            if not cuda:
                return compiled(*args)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(*args)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else (None if out is None else out.clone())
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            failed = True
            warnings.warn(f"torch.compile of the sampler step failed, running eagerly: {error}", stacklevel=2)
            return fn(*args)

    return step


def sample_ids(logits_BNV: Tensor, temperature: float, u_BN: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One id per position from float logits (..., V): by inverse CDF with the uniforms ``u_BN`` (...) when
    ``temperature > 0``, else the most likely. Returns the ids (...) and the probabilities (..., V) they came from."""
    V = logits_BNV.shape[-1]
    if temperature > 0:
        assert u_BN is not None
        probs_BNV = torch.softmax(logits_BNV / temperature, dim=-1)
        cdf_BNV = probs_BNV.cumsum(-1)
        # inverse CDF: the first id whose cumulative probability passes u (one uniform per token)
        sampled_BN = (cdf_BNV < u_BN[..., None] * cdf_BNV[..., -1:]).sum(-1).clamp_(max=V - 1)
    else:
        probs_BNV = torch.softmax(logits_BNV, dim=-1)
        sampled_BN = logits_BNV.argmax(-1)
    return sampled_BN, probs_BNV


def choose_tokens(
    logits_BNV: Tensor,
    frame_BN: Tensor,
    masked_BN: Tensor,
    still_masked: Tensor | int,
    temperature: float,
    u_sample_BN: Tensor | None = None,
    u_rank_BN: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample every masked token, then fix all but the ``still_masked`` lowest-scored ones.

    Args:
        logits_BNV: (B, N, V) float logits of the frame being made.
        frame_BN: (B, N) ids so far (MASK where masked).
        masked_BN: (B, N) bool, True where still masked.
        still_masked: tokens per frame left masked after this step (an int or a 0-dim tensor).
        temperature: softmax temperature; 0 takes the most likely id.
        u_sample_BN: (B, N) uniforms in [0, 1) for sampling (inverse CDF), when ``temperature > 0``.
        u_rank_BN: (B, N) uniforms giving each token's score for ``unmask="random"``; None scores by confidence
            (the sampled id's probability).

    Returns:
        frame_BN, masked_BN after the step. Every shape is fixed and nothing is read back to the host, so one
        compiled graph serves every step.
    """
    sampled_BN, probs_BNV = sample_ids(logits_BNV, temperature, u_sample_BN)
    score_BN = probs_BNV.gather(-1, sampled_BN[..., None])[..., 0] if u_rank_BN is None else u_rank_BN
    # known tokens are never re-masked: give them the top score; the lowest still_masked scores stay masked
    score_BN = score_BN.masked_fill(~masked_BN, float("inf"))
    rank_BN = score_BN.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = lowest score
    stay_BN = rank_BN < still_masked
    frame_BN = torch.where(masked_BN & ~stay_BN, sampled_BN, frame_BN)
    return frame_BN, masked_BN & stay_BN


@torch.no_grad()
def generate(
    model: DynamicsModel,
    context_BTN: Tensor,
    context_actions_BT: Tensor | None,
    actions_BF: Tensor,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Roll out F frames after a context under the given actions: returns (B, F, N) token ids."""
    sampler = MaskGITSampler(model, config)
    sampler.reset(context_BTN, context_actions_BT)
    frames = [sampler.next_frame(actions_BF[:, f], generator) for f in range(actions_BF.shape[1])]
    return torch.stack(frames, dim=1)

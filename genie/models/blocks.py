"""Spatiotemporal (ST) transformer: the building block shared by the tokenizer, the LAM and the dynamics model.

Dimension keys (used as suffixes on tensor names, nanoGPT/Shazeer style):
    B: batch size
    T: frames (time)
    H, W: pixels (height, width)
    C: channels
    N: tokens per frame (h * w patches, plus any extra per-frame tokens a model prepends)
    D: width (model dimension)
    V: codebook size
    A: number of (latent) actions
    L: attention sequence length (N for spatial attention, T for temporal attention)
    S: key/value sequence length (past + new frames when a KV cache is used)
    K: attention heads;  E: head dim (D = K * E)

An ST block is: spatial self-attention inside each frame (over its N tokens), then *causal* temporal
self-attention across frames at each spatial position, then an MLP; all pre-norm with residuals.
That factorisation costs O(T N^2 + N T^2) instead of O((T N)^2) for full attention.

Temporal positions. Spatial positions are a learned embedding (N, D) added at the stack input. Temporal
positions use rotary embeddings (RoPE) on the temporal attention's queries and keys, indexed by the
*absolute* frame index. RoPE makes attention depend only on the distance between frames, so:
  * a KV cache stays valid forever: a past frame's keys never need recomputing when new frames arrive,
  * attention can slide: temporal attention only looks back ``max_frames - 1`` frames (a banded causal
    mask), so a model trained on clips of ``max_frames`` frames sees the same relative distances when it
    generates frame 100 as it did in training, and the cache only keeps the last ``max_frames - 1`` frames.
A learned absolute temporal table would instead either cap generation at ``max_frames`` or force
re-encoding the whole window every step (its positions shift as the window slides).

With clips of at most ``max_frames`` frames (training), the band is the plain causal mask and SDPA runs
its fused ``is_causal=True`` path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genie.models import cpu_ops
from genie.models.cpu_ops import Linear


@dataclass
class STTransformerConfig:
    """Hyper-parameters of an :class:`STTransformer` stack."""

    width: int = 512  # D: model width
    depth: int = 8  # number of ST blocks
    num_heads: int = 8  # attention heads (width must be divisible by it)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    num_spatial_tokens: int = 256  # N: tokens per frame (size of the learned spatial position table)
    max_frames: int = 16  # temporal attention window: a frame attends to itself and max_frames-1 past frames
    dropout: float = 0.0  # dropout on attention weights and on residual branches (training only)
    qk_norm: bool = True  # RMSNorm on per-head queries and keys (stabilises attention logits, as in Genie)
    rope_base: float = 10000.0  # RoPE base for temporal positions
    bias: bool = True  # biases in linear layers and LayerNorms
    # the last causal_tokens tokens of each frame are generated one by one (the causal dynamics kind): each attends
    # to every leading token of its frame and to the trailing ones before it (raster order), no leading token
    # attends to them, and they take no part in temporal attention. 0: every token attends to every token.
    causal_tokens: int = 0


@dataclass
class KVCache:
    """Per-layer keys/values of past frames for the temporal attention of an :class:`STTransformer`.

    Spatial attention is within-frame and needs no cache. For temporal attention, layer ``i`` stores
    ``keys[i]`` / ``values[i]`` of shape (B*N, K, S_past, E): the (RoPE-rotated) keys and values of the last
    ``S_past <= max_frames - 1`` frames, which is all any future frame can attend to.

    Usage::

        cache = model.make_cache()
        for frame_BTND in frames:            # (B, 1, N, D) each
            out = model(frame_BTND, cache=cache)   # appends this frame's K/V and advances the cache

    ``model(x, cache=cache, update_cache=False)`` reads the cache without changing it (e.g. the MaskGIT
    steps that refine one frame several times before committing it).
    """

    num_layers: int
    max_frames: int  # attention window in frames; the cache keeps at most max_frames - 1 past frames
    keys: list[Tensor | None] = field(default_factory=list)  # per layer, (B*N, K, S_past, E)
    values: list[Tensor | None] = field(default_factory=list)  # per layer, (B*N, K, S_past, E)
    num_frames: int = 0  # absolute index of the next frame (= frames appended so far)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def past_len(self) -> int:
        """Number of past frames currently held (the same in every layer)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def extend(self, layer: int, k_new: Tensor, v_new: Tensor, update: bool = True) -> tuple[Tensor, Tensor]:
        """Past + new keys/values of ``layer`` for attention; if ``update``, store them (cut to the window).

        Args:
            layer: layer index.
            k_new, v_new: (B*N, K, T_new, E) keys/values of the new frames.
            update: append the new frames to the cache.

        Returns:
            k, v: (B*N, K, S_past + T_new, E).
        """
        k_past, v_past = self.keys[layer], self.values[layer]
        k = k_new if k_past is None else torch.cat([k_past, k_new], dim=2)
        v = v_new if v_past is None else torch.cat([v_past, v_new], dim=2)
        if update:
            self.keys[layer], self.values[layer] = self._truncate(k), self._truncate(v)
        return k, v

    def truncate(self, max_past: int | None = None) -> None:
        """Drop all but the last ``max_past`` frames (default: ``max_frames - 1``, the attention reach)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self._truncate(self.keys[i], max_past)
                self.values[i] = self._truncate(self.values[i], max_past)

    def reset(self) -> None:
        """Forget everything (start a new episode)."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.num_frames = 0

    def _truncate(self, x: Tensor, max_past: int | None = None) -> Tensor:
        keep = self.max_frames - 1 if max_past is None else max_past
        # slicing is a view; no copy is made until the next append concatenates
        return x[:, :, max(0, x.shape[2] - keep) :]


@dataclass
class RingKVCache:
    """A fixed-size KV cache for generating one frame at a time: the fast step's cache (static shapes).

    :class:`KVCache` concatenates every new frame's keys/values onto the past ones, so its tensors change size
    and every refinement step allocates. This cache preallocates, per layer, a ring of W = ``max_frames`` slots
    of shape (B*N, K, W, E) and writes frame f into slot f mod W: the W - 1 past frames a new frame can attend to
    plus the new frame itself. Every tensor keeps its shape and address from the first frame on, and the frame
    index is a tensor, so a generation step is one fixed computation, which ``torch.compile`` turns into one
    graph (on CUDA, one captured CUDA graph) with no recompilation as generation moves on.

    Keys are stored *before* RoPE and rotated at attention time by their distance to the new frame (slot of frame
    f' gets position W - 1 - (f - f'), the new frame W - 1): the same attention as rotating by absolute indices,
    since RoPE only sees differences, with tables of W rows however long generation runs. Softmax does not care
    about the order of keys, so the ring's order needs no rolling; empty and stale slots are masked out.
    Frames are fed one at a time (:meth:`STTransformer.forward` splits longer inputs).
    """

    num_layers: int
    max_frames: int  # W: ring slots = the attention window (the new frame and max_frames - 1 past frames)
    keys: list[Tensor | None] = field(default_factory=list)  # per layer, (B*N, K, W, E), un-rotated
    values: list[Tensor | None] = field(default_factory=list)  # per layer, (B*N, K, W, E)
    frame: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # index of the frame being made
    # absolute frame index held by each slot, (W,); a large negative number while empty (masked out)
    slot_frame: Tensor | None = None

    EMPTY = -(2**40)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
        if self.slot_frame is None:
            self.slot_frame = torch.full((self.max_frames,), self.EMPTY, dtype=torch.long)

    @property
    def num_frames(self) -> int:
        """Frames committed so far (a host read: not for the inside of a compiled step)."""
        return int(self.frame)

    def to(self, device: torch.device) -> RingKVCache:
        """Move the (still empty) frame counters to ``device``; the slots are allocated where the first frame runs."""
        self.frame, self.slot_frame = self.frame.to(device), self.slot_frame.to(device)
        return self

    def claim(self) -> Tensor:
        """Mark the new frame's slot (f mod W) as frame f; returns the slot, a (1,) long tensor."""
        slot = (self.frame % self.max_frames).view(1)
        self.slot_frame.index_copy_(0, slot, self.frame.view(1))
        return slot

    def window(self) -> tuple[Tensor, Tensor]:
        """RoPE positions (W,) of the slots relative to the new frame (the new frame: W - 1), and the (1, W)
        mask of the slots it may attend (frames f - W + 1 .. f)."""
        dist_W = self.frame - self.slot_frame  # 0 for the new frame, W-1 for the oldest it sees
        allowed_1W = (dist_W < self.max_frames)[None]
        return (self.max_frames - 1 - dist_W).clamp(min=0), allowed_1W

    def write(self, layer: int, slot: Tensor, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new frame's (B*N, K, 1, E) keys/values in ``slot``; returns the layer's whole ring."""
        if self.keys[layer] is None:
            shape = (*k_new.shape[:2], self.max_frames, k_new.shape[-1])
            self.keys[layer] = k_new.new_zeros(shape)
            self.values[layer] = v_new.new_zeros(shape)
            if k_new.device.type == "cuda":  # CUDA graphs keep these addresses instead of copying the inputs
                torch._dynamo.mark_static_address(self.keys[layer])
                torch._dynamo.mark_static_address(self.values[layer])
        self.keys[layer].index_copy_(2, slot, k_new.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(2, slot, v_new.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]

    def begin_frame(self, cos_WE: Tensor, sin_WE: Tensor) -> None:
        """Before a forward of the new frame: claim its slot and set the rotations every layer uses.

        ``cos_WE`` / ``sin_WE`` are the RoPE tables of positions 0 .. W-1.
        """
        self.slot = self.claim()
        pos_W, self.allowed_1W = self.window()
        W = self.max_frames
        self.rope_q = (cos_WE[W - 1 :], sin_WE[W - 1 :])  # (1, E): the new frame sits at position W - 1
        self.rope_k = (cos_WE.index_select(0, pos_W), sin_WE.index_select(0, pos_W))  # (W, E), one row per slot

    def advance(self) -> None:
        """Commit the new frame: the next one is f + 1."""
        self.frame.add_(1)


@dataclass
class FrameKVCache:
    """Per-layer keys/values of the spatial attention of the frame being generated token by token.

    For a stack with ``causal_tokens`` (see :class:`STTransformerConfig`): the frame's leading tokens run once and
    write their keys/values at positions 0 .. P0-1, then each generated token writes its own at its position and
    attends to everything before it. Layer ``i`` holds ``keys[i]`` / ``values[i]`` of shape (B, K, P, E), allocated
    at the first write; positions past the newest token hold stale values from the previous frame, which the
    causal mask never lets a query read, so a new frame needs no clearing.
    """

    num_layers: int
    keys: list[Tensor | None] = field(default_factory=list)  # per layer, (B, K, P, E)
    values: list[Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    def write(self, layer: int, offset: int, k_new: Tensor, v_new: Tensor, P: int) -> tuple[Tensor, Tensor]:
        """Store (B, K, L, E) keys/values of positions offset .. offset+L-1; returns the layer's (B, K, P, E)."""
        if self.keys[layer] is None or self.keys[layer].shape[0] != k_new.shape[0]:
            shape = (*k_new.shape[:2], P, k_new.shape[-1])
            self.keys[layer], self.values[layer] = k_new.new_zeros(shape), v_new.new_zeros(shape)
        L = k_new.shape[2]
        self.keys[layer][:, :, offset : offset + L] = k_new
        self.values[layer][:, :, offset : offset + L] = v_new
        return self.keys[layer], self.values[layer]


def spatial_mask(P: int, leading: int, device: torch.device) -> Tensor:
    """(P, P) bool, True where token i may attend token j in a frame whose last P - ``leading`` tokens are
    generated one by one: every token reads the leading ones, a generated token also reads itself and the
    generated tokens before it."""
    i, j = torch.arange(P, device=device)[:, None], torch.arange(P, device=device)[None]
    return (j < leading) | ((j <= i) & (i >= leading))


def rope_cos_sin(
    start: int, T: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """RoPE tables for frames start .. start+T-1.

    Angles are formed in float64 on the CPU (exact for large frame indices, and MPS has no float64), then
    moved to ``device`` as float32 (float64 for float64 models).

    Returns:
        cos, sin: each (T, E).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (E/2,)
    positions_T = torch.arange(start, start + T, dtype=torch.float64)
    angles_TE = torch.outer(positions_T, inv_freq).repeat(1, 2)  # (T, E), the two halves share angles
    # float64 models (exactness tests) keep float64 tables; everything else gets float32
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return angles_TE.cos().to(device, dtype), angles_TE.sin().to(device, dtype)


# Cached RoPE tables cover frames 0 .. at most this many (E = 64: 4 MiB of fp32 cos + sin per device); a stack
# generating past it (hours of play) builds each forward's rows instead, as the tables grow with the frame index.
ROPE_CACHE_MAX_FRAMES = 8192


def apply_rope(x: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:
    """Rotate (..., T, E) by the RoPE tables (T, E) ("rotate half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_TE + torch.cat([-x2, x1], dim=-1) * sin_TE


def temporal_mask(q_start: int, T: int, k_start: int, S: int, max_frames: int, device: torch.device) -> Tensor:
    """Boolean (T, S) mask, True where a query frame may attend a key frame: causal and within the window.

    Queries are frames q_start .. q_start+T-1 and keys frames k_start .. k_start+S-1 (absolute indices).
    """
    dist_TS = torch.arange(q_start, q_start + T, device=device)[:, None] - torch.arange(
        k_start, k_start + S, device=device
    )
    return (dist_TS >= 0) & (dist_TS < max_frames)


class QKNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype: under bf16 autocast the fused kernel needs both in bf16
    (with an fp32 weight PyTorch falls back to the unfused path and warns; seen on an H200).

    On the CPU the input is made contiguous first: torch 2.13's CPU ``rms_norm`` takes a slow path on strided
    per-head views (13.8 ms against 0.1 ms for a (512, 4, 3, 24) tensor, forward alone). (The attention layers
    do not call this on the CPU: they split, normalise and rotate q and k in one node, ``qkv_heads_fast``.)
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            x = x.contiguous()
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head self-attention over the L axis of (B', L, D) with fused qkv, QK-norm and SDPA."""

    def __init__(self, config: STTransformerConfig):
        super().__init__()
        assert config.width % config.num_heads == 0, "width must be divisible by num_heads"
        assert (config.width // config.num_heads) % 2 == 0, "head dim must be even (RoPE)"
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        head_dim = config.width // config.num_heads
        self.qkv = Linear(config.width, 3 * config.width, bias=config.bias)  # one matmul for q, k, v
        self.proj = Linear(config.width, config.width, bias=config.bias)
        self.proj.is_residual_proj = True  # scaled init, see STTransformer._init_module
        self.q_norm = QKNorm(head_dim, eps=1e-6) if config.qk_norm else nn.Identity()
        self.k_norm = QKNorm(head_dim, eps=1e-6) if config.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv_heads(self, x_BLD: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Project and split into (QK-normalised, then RoPE-rotated if ``rope``) heads: q, k, v each (B', K, L, E),
        all in v's dtype (bf16 under autocast; the norms and rotations themselves run in fp32 on the CPU)."""
        qkv_BLX = self.qkv(x_BLD)  # X = 3 * D
        cpu = cpu_ops.qkv_heads(qkv_BLX, self.num_heads, self.q_norm, self.k_norm, rope)  # the CPU kernels' seam
        if cpu is not None:
            return cpu
        qkv = rearrange(qkv_BLX, "b l (three k e) -> three b k l e", three=3, k=self.num_heads)
        # unbind, not qkv[0], qkv[1], qkv[2]: each index's backward zero-fills a full (3, B', K, L, E) gradient
        # (measured on the CPU: ~2.5 ms per attention layer, ~15% of a reference-config training step)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.to(v.dtype), k.to(v.dtype), v  # norms may run in fp32 under autocast; keys are cached like values

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """SDPA of (B', K, L, E) queries on (B', K, S, E) keys/values, then the output projection: (B', L, D)."""
        dropout = self.dropout if self.training else 0.0
        y = cpu_ops.attention(q, k, v, mask, causal, dropout)  # the CPU kernels' seam
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return self.resid_dropout(self.proj(rearrange(y, "b k l e -> b l (k e)")))


class SpatialAttention(Attention):
    """Attention among the tokens of each frame: bidirectional, or with ``causal_tokens`` the mask of
    :func:`spatial_mask` (generated tokens in raster order)."""

    def __init__(self, config: STTransformerConfig):
        super().__init__(config)
        self.num_tokens = config.num_spatial_tokens
        self.leading = config.num_spatial_tokens - config.causal_tokens

    def forward(
        self, x_BTND: Tensor, frame_cache: FrameKVCache | None = None, layer: int = 0, offset: int = 0
    ) -> Tensor:
        """(B, T, L, D) tokens offset .. offset+L-1 of each frame -> (B, T, L, D). With ``frame_cache`` (one frame,
        T = 1) their keys/values are stored and the queries also read the frame's earlier tokens from it."""
        T, L = x_BTND.shape[1], x_BTND.shape[2]
        q, k, v = self.qkv_heads(rearrange(x_BTND, "b t n d -> (b t) n d"))
        mask = None
        if frame_cache is not None:
            k, v = frame_cache.write(layer, offset, k, v, self.num_tokens)
            mask = spatial_mask(self.num_tokens, self.leading, q.device)[offset : offset + L]
        elif self.leading < self.num_tokens:
            mask = spatial_mask(L, self.leading, q.device)
        y_BLD = self.attend(q, k, v, mask=mask)
        return rearrange(y_BLD, "(b t) n d -> b t n d", t=T)


class TemporalAttention(Attention):
    """Causal, windowed attention across frames at each spatial position, with RoPE and an optional KV cache."""

    def __init__(self, config: STTransformerConfig):
        super().__init__(config)
        self.max_frames = config.max_frames

    def forward(
        self,
        x_BTND: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        start: int = 0,
        cache: KVCache | RingKVCache | None = None,
        layer: int = 0,
        update_cache: bool = True,
    ) -> Tensor:
        """(B, T, N, D) frames start .. start+T-1 -> (B, T, N, D); see :meth:`STTransformer.forward`."""
        N = x_BTND.shape[2]
        if isinstance(cache, RingKVCache):  # one new frame against the ring (RingKVCache.begin_frame ran)
            q, k, v = self.qkv_heads(rearrange(x_BTND, "b t n d -> (b n) t d"))  # (B*N, K, 1, E), not rotated
            keys, values = cache.write(layer, cache.slot, k, v)  # (B*N, K, W, E)
            q = apply_rope(q, *cache.rope_q).to(v.dtype)
            keys = apply_rope(keys, *cache.rope_k).to(v.dtype)
            y_BLD = self.attend(q, keys, values, mask=cache.allowed_1W)
            return rearrange(y_BLD, "(b n) t d -> b t n d", n=N)
        # (B*N, K, T, E) each; keys are cached rotated
        q, k, v = self.qkv_heads(rearrange(x_BTND, "b t n d -> (b n) t d"), rope)
        T = q.shape[2]
        if cache is not None:
            k, v = cache.extend(layer, k, v, update_cache)  # (B*N, K, S_past + T, E)
        S_past = k.shape[2] - T
        mask, causal = None, False
        if S_past == 0 and self.max_frames >= T:
            causal = True  # plain causal mask: fused SDPA path (the training case)
        elif S_past == 0 or T > 1 or S_past >= self.max_frames:
            mask = temporal_mask(start, T, start - S_past, S_past + T, self.max_frames, q.device)
        # else: one new frame and every cached frame is within its window -> attend to all, no mask
        y_BLD = self.attend(q, k, v, mask=mask, causal=causal)  # (B*N, T, D)
        return rearrange(y_BLD, "(b n) t d -> b t n d", n=N)


class MLP(nn.Module):
    def __init__(self, config: STTransformerConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.width)
        self.fc = Linear(config.width, hidden, bias=config.bias)
        self.proj = Linear(hidden, config.width, bias=config.bias)
        self.proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class STBlock(nn.Module):
    """Pre-norm ST block: x += SpatialAttn(LN(x)); x += CausalTemporalAttn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, config: STTransformerConfig):
        super().__init__()
        self.norm_spatial = nn.LayerNorm(config.width, bias=config.bias)
        self.spatial = SpatialAttention(config)
        self.norm_temporal = nn.LayerNorm(config.width, bias=config.bias)
        self.temporal = TemporalAttention(config)
        self.norm_mlp = nn.LayerNorm(config.width, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x_BTND: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        start: int = 0,
        cache: KVCache | RingKVCache | None = None,
        layer: int = 0,
        update_cache: bool = True,
        frame_cache: FrameKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        """(B, T, L, D) -> (B, T, L, D). See :meth:`STTransformer.forward` for the cache arguments."""
        x_BTND = x_BTND + self.spatial(self.norm_spatial(x_BTND), frame_cache, layer, offset)
        # temporal attention for the leading tokens only (all of them without causal_tokens)
        n = min(x_BTND.shape[2], self.spatial.leading - offset)
        if n == x_BTND.shape[2]:
            x_BTND = x_BTND + self.temporal(self.norm_temporal(x_BTND), rope, start, cache, layer, update_cache)
        elif n > 0:
            lead_BTND, rest_BTND = x_BTND[:, :, :n], x_BTND[:, :, n:]
            lead_BTND = lead_BTND + self.temporal(
                self.norm_temporal(lead_BTND), rope, start, cache, layer, update_cache
            )
            x_BTND = torch.cat([lead_BTND, rest_BTND], dim=2)
        return x_BTND + self.mlp(self.norm_mlp(x_BTND))


class STTransformer(nn.Module):
    """Stack of :class:`STBlock` with a learned spatial position embedding, temporal RoPE and a final norm.

    Attributes:
        gradient_checkpointing: when True (and training without a cache) each block's activations are
            recomputed in backward instead of stored. Also toggled by transformers'
            ``gradient_checkpointing_enable()`` on the HF models that contain this stack.
    """

    def __init__(self, config: STTransformerConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.pos_spatial_ND = nn.Parameter(torch.zeros(config.num_spatial_tokens, config.width))
        self.blocks = nn.ModuleList([STBlock(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width, bias=config.bias)
        self.apply(self._init_module)
        nn.init.normal_(self.pos_spatial_ND, std=0.02)
        # RoPE tables of frames 0 .. L-1, by (device, table dtype): rows are sliced out, not rebuilt every forward.
        # A plain attribute, not a buffer: outside the state dict, and FSDP (which flattens and shards buffers of
        # its units) never sees it. Cleared by .to() and friends (see _apply); deepcopy copies it along.
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _init_module(self, module: nn.Module) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections shrunk by the number of residual branches so
        # the residual stream's variance does not grow with depth (3 branches per block).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                std /= math.sqrt(3 * self.config.depth)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> STTransformer:
        # .to() / .cuda() / .double() / FSDP's moves: tables on the old device (or of the old dtype) would only
        # hold memory there; the next forward builds the ones it needs
        self._rope_cache.clear()
        return super()._apply(fn, recurse)

    def rope(self, start: int, T: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE tables (cos, sin), each (T, E), for frames start .. start+T-1 of inputs of ``dtype`` on ``device``.

        Rows of a cached table of frames 0 .. L-1 (L a power of two, at least ``max_frames``, grown as generation
        moves on), bitwise the rows :func:`rope_cos_sin` builds for the same frames.
        """
        head_dim, base = self.config.width // self.config.num_heads, self.config.rope_base
        end = start + T
        if torch.compiler.is_compiling() or end > ROPE_CACHE_MAX_FRAMES:
            # compiled: a few constant ops inductor folds, and no module state mutated inside the graph
            return rope_cos_sin(start, T, head_dim, base, device, dtype)
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # rope_cos_sin's choice
        key = (device, table_dtype)
        tables = self._rope_cache.get(key)
        if tables is None or tables[0].shape[0] < end:
            length = min(ROPE_CACHE_MAX_FRAMES, max(self.config.max_frames, 1 << (end - 1).bit_length()))
            # ordinary tensors even when the first forward runs under inference mode (Lightning's validation,
            # sanity check included): a training step saves them for backward, which inference tensors refuse
            with torch.inference_mode(False):
                tables = rope_cos_sin(0, length, head_dim, base, device, table_dtype)
            self._rope_cache[key] = tables
        cos, sin = tables
        return cos[start:end], sin[start:end]

    def make_cache(self, ring: bool = False) -> KVCache | RingKVCache:
        """An empty KV cache for incremental (frame-by-frame) inference with this stack; ``ring``: a
        :class:`RingKVCache` (fixed shapes, one frame per forward: the fast generation step)."""
        if ring:
            device = self.pos_spatial_ND.device
            return RingKVCache(num_layers=self.config.depth, max_frames=self.config.max_frames).to(device)
        return KVCache(num_layers=self.config.depth, max_frames=self.config.max_frames)

    def forward(
        self,
        x_BTND: Tensor,
        cache: KVCache | RingKVCache | None = None,
        update_cache: bool = True,
        frame_cache: FrameKVCache | None = None,
        offset: int = 0,
    ) -> Tensor:
        """Run the stack.

        Args:
            x_BTND: (B, T, N, D) input tokens (N must equal ``config.num_spatial_tokens``, but with ``frame_cache``).
            cache: optional KV cache holding earlier frames of the same sequences. The T frames given are
                then frames ``cache.num_frames ... cache.num_frames + T - 1`` of the sequence.
            update_cache: append these frames to ``cache`` and advance it (False: read-only use).
            frame_cache: with ``config.causal_tokens``, the spatial keys/values of the frame being generated
                (:class:`FrameKVCache`); ``x_BTND`` is then (B, 1, L, D), that frame's tokens ``offset`` ..
                ``offset + L - 1``: its leading tokens (offset 0, with the temporal ``cache``), or generated ones.
            offset: see ``frame_cache``.

        Returns:
            (B, T, N, D) outputs. Frame t never depends on later frames; each layer looks back at most
            ``max_frames - 1`` frames (the full forward and the cached incremental forward agree exactly).
        """
        T, L = x_BTND.shape[1], x_BTND.shape[2]
        if isinstance(cache, RingKVCache):
            return self._ring_forward(x_BTND, cache, update_cache, frame_cache)
        start = cache.num_frames if cache is not None else 0
        x_BTND = x_BTND + self.pos_spatial_ND[offset : offset + L].to(x_BTND.dtype)  # (L, D) broadcast over (B, T)
        rope = self.rope(start, T, x_BTND.device, x_BTND.dtype)  # all layers
        ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if ckpt:
                x_BTND = checkpoint(block, x_BTND, rope, start, use_reentrant=False)
            else:
                x_BTND = block(x_BTND, rope, start, cache, i, update_cache, frame_cache, offset)
        if cache is not None and update_cache:
            cache.num_frames += T
        return self.norm(x_BTND)

    def _ring_forward(
        self, x_BTND: Tensor, cache: RingKVCache, update_cache: bool, frame_cache: FrameKVCache | None = None
    ) -> Tensor:
        """:meth:`forward` over a :class:`RingKVCache`: frame by frame, nothing read from the host. With
        ``frame_cache``: one frame's leading tokens (see :meth:`forward`)."""
        T, L = x_BTND.shape[1], x_BTND.shape[2]
        if T > 1:
            if not update_cache or frame_cache is not None:
                raise ValueError("a RingKVCache takes several frames only when they are appended (update_cache)")
            return torch.cat([self._ring_forward(x_BTND[:, t : t + 1], cache, True) for t in range(T)], dim=1)
        x_BTND = x_BTND + self.pos_spatial_ND[:L].to(x_BTND.dtype)
        cache.begin_frame(*self.rope(0, self.config.max_frames, x_BTND.device, x_BTND.dtype))
        for i, block in enumerate(self.blocks):
            x_BTND = block(x_BTND, None, 0, cache, i, update_cache, frame_cache)
        if update_cache:
            cache.advance()
        return self.norm(x_BTND)

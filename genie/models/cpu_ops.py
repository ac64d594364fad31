"""Faster CPU versions of the ST transformer's hot ops: a linear layer, QK RMSNorm and RoPE, short attention.

Dimension keys:
    M: rows (all leading dims of the input flattened)
    I: input features;  O: output features
    E: features normalised / rotated (the head dim)
    G: attention heads of all sequences (B' * K);  L: query length;  S: key length

Why these exist: on the 2-core CPU this project's CI runs on, a training step of the issue-8 reference model
(width 128, 4 heads, MLP 512, 8 frames of 64 tokens, batch 8) was 0.49 s in fp32 and 0.39 s under bf16
autocast, and a profile put the time in three places that PyTorch's generic CPU paths handle poorly:

* **fp32 matrix products.** ``F.linear`` in fp32 calls MKL's SGEMM, which on the AMD EPYC (Zen 5) CPU runs at
  ~195 GFLOP/s, while oneDNN's fp32 inner product, which PyTorch ships for inductor
  (``torch.ops.mkldnn._linear_pointwise``), runs the same shapes at ~450 GFLOP/s. :class:`Linear` uses it for
  the forward product and the input gradient, and for the weight gradient (a long reduction over M, where
  oneDNN is weakest, ~280 GFLOP/s) it puts the smaller of O, I on the output's rows. All fp32 math.
* **QK RMSNorm and RoPE.** Autograd runs ``F.rms_norm`` on the CPU as ~6 forward and ~12 backward elementwise
  ops over (B', K, L, E) tensors, and ``x * cos + cat(-x2, x1) * sin`` as 5 passes each way plus a mixed-dtype
  multiply under bf16; :func:`qkv_heads_fast` does the head split, both norms and both rotations as one
  autograd node with a hand-written backward, in fp32 (:func:`apply_rope_fast`, 3 passes each way, rotates
  without a norm).
* **Attention over short sequences.** PyTorch's CPU flash kernel is built for long sequences; for the ST
  transformer's 64 tokens a frame and 8-16 frames, :func:`short_attention` (batched products, probabilities
  kept for backward) is 1.5-3x faster, and in bf16, where the flash kernel is slower than in fp32, 3-8x.

Each is used only for CPU tensors (and outside ``torch.compile``, which fuses these itself); on a GPU the
model calls ``F.linear``, the fused ``F.rms_norm`` kernel and the plain RoPE. The ST transformer reaches them
through one seam, :func:`qkv_heads` and :func:`attention` (each answers None where PyTorch's op is the path), and
:class:`Linear`; ``blocks.py`` itself holds one path, the reference math. ``GENIE_CPU_OPS=0`` switches them all off.

Do they earn their place on every CPU family? fp32 training steps of issue 8's reference config, on/off
(``genie bench train``, 15 steps, two runs each, alternated): on a 2-core AMD EPYC Zen 3 (AVX2, no AVX-512;
2026-12-06) tokenizer 0.80 / 0.91 s against 0.83 / 0.90 off, LAM 0.85 / 0.98 against 0.98 / 0.96, dynamics
0.45 / 0.52 against 0.50 / 0.53: even to ~5% faster. On a 2-core Intel Xeon with AMX (issue 18) the tokenizer ran
0.68 s on, 0.73 off. The bf16 paths were tuned on a Zen 5 EPYC with AVX-512 BF16 (docs/architecture.md,
"Measured"); the Zen 3 machine has no native bf16 at all (a bf16 step took 13.5 s against 0.87 fp32, with the
paths on or off), so they are unmeasured elsewhere. Each matches its reference to
fp32 rounding in value and gradient (short attention in bf16: to bf16 rounding; tests/models/test_cpu_ops.py).
Speed before -> after is in docs/architecture.md ("Measured").
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def enabled() -> bool:
    """``GENIE_CPU_OPS=0`` switches every path of this module off (PyTorch's own ops run), to measure what they gain."""
    return os.environ.get("GENIE_CPU_OPS", "1") != "0"


def use_cpu_ops(x: Tensor) -> bool:
    """Whether ``x`` should take this module's CPU paths: an fp32 or bf16 CPU tensor, in eager mode.

    (float64 models, used by exactness tests, keep PyTorch's own ops.)
    """
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling()
        and enabled()
    )


# ---- the seam: what the ST transformer's attention calls (genie/models/blocks.py) -----------------------------


def qkv_heads(
    qkv_BLX: Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module, rope: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The CPU path of ``Attention.qkv_heads``: heads q, k, v (B', K, L, E) from the fused projection (B', L, 3D),
    QK-normalised and rotated; None where PyTorch's ops are the path (not a CPU tensor, compiling, switched off)."""
    if not use_cpu_ops(qkv_BLX):
        return None
    if isinstance(q_norm, nn.RMSNorm):
        # one autograd node for the split, both norms and both rotations
        return qkv_heads_fast(qkv_BLX, num_heads, q_norm.weight, k_norm.weight, q_norm.eps, rope)
    q, k, v = rearrange(qkv_BLX, "b l (three k e) -> three b k l e", three=3, k=num_heads).unbind(0)
    if rope is not None:  # no QK norm: the rotation alone
        q, k = apply_rope_fast(q, *rope).to(v.dtype), apply_rope_fast(k, *rope).to(v.dtype)
    return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout: float) -> Tensor | None:
    """The CPU path of the ST transformer's attention (B', K, L, E) -> (B', K, L, E) in v's dtype, or None where
    ``F.scaled_dot_product_attention`` as called is the path.

    bf16 short sequences take :func:`short_attention`; longer bf16 ones run PyTorch's CPU flash kernel in fp32,
    which is 2-3x faster there than in bf16 (forward + backward, (512, 4, 8, 32) temporal: 7.6 vs 4.8 ms;
    (64, 4, 64, 32) spatial: 16.5 vs 5.7 ms; autocast would cast it back, so it is switched off around the call).
    """
    if dropout == 0.0 and short_attention_applies(q, k, v):
        return short_attention(q, k, v, mask, causal)
    # (also while compiling: inductor calls the same flash kernel)
    if not (v.device.type == "cpu" and enabled() and torch.bfloat16 in (q.dtype, k.dtype, v.dtype)):
        return None
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, dropout_p=dropout
        )
    return y.to(v.dtype)


# ---- linear ---------------------------------------------------------------------------------------------


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's CPU inner product (x86 builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm(x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None = None) -> Tensor:
    """x_MI @ w_OI^T (+ b_O) with oneDNN: (M, I), (O, I) -> (M, O). The inputs may be strided views."""
    return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, b_O, "none", [], "")


def _save(ctx, x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None) -> None:
    ctx.save_for_backward(x_MI, w_OI)
    ctx.has_bias = b_O is not None


def _linear_grads(ctx, dy_MO: Tensor, mm) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dx, dW, db of y = x W^T + b from dy, with ``mm`` (an oneDNN product) for the two products."""
    x_MI, w_OI = ctx.saved_tensors
    dy_MO = dy_MO.contiguous()
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = mm(dy_MO, w_OI.t())  # (M, O) @ (O, I)
    if ctx.needs_input_grad[1]:
        out_features, in_features = w_OI.shape
        # dW = dy^T x: oneDNN is fastest with the smaller side on the output's rows
        dw = mm(dy_MO.t(), x_MI.t()) if out_features <= in_features else mm(x_MI.t(), dy_MO.t()).t()
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy_MO.sum(0)
    return dx, dw, db


class _OneDNNLinear(torch.autograd.Function):
    """Eager mode: y = x W^T + b with oneDNN products in forward and backward (~3% faster per training step
    than going through the registered op below, whose dispatch costs ~60 us a call)."""

    @staticmethod
    def forward(ctx, x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None) -> Tensor:  # noqa: D102
        _save(ctx, x_MI, w_OI, b_O)
        return _mm(x_MI, w_OI, b_O)

    @staticmethod
    def backward(ctx, dy_MO: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: D102
        return _linear_grads(ctx, dy_MO, _mm)


@torch.library.custom_op("genie::onednn_mm", mutates_args=())
def onednn_mm(x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None = None) -> Tensor:
    """The same product as a registered op (``torch.ops.genie.onednn_mm``) with its own backward, for
    ``torch.compile``: it stays one opaque kernel call instead of being traced into oneDNN (which inductor
    cannot lower) or replaced by MKL's slower SGEMM."""
    return _mm(x_MI, w_OI, b_O)


@onednn_mm.register_fake
def _onednn_mm_fake(x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None = None) -> Tensor:
    return x_MI.new_empty((x_MI.shape[0], w_OI.shape[0]))


onednn_mm.register_autograd(
    lambda ctx, dy_MO: _linear_grads(ctx, dy_MO, onednn_mm),
    setup_context=lambda ctx, inputs, output: _save(ctx, *inputs),
)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with the oneDNN fp32 path for CPU tensors outside autocast: (..., I) -> (..., O).

    Under CPU bf16 autocast PyTorch already routes ``F.linear`` to oneDNN's bf16 kernels. Inputs of fewer
    than 512 rows (e.g. generating one frame) keep ``F.linear``: there the call overhead, not the product,
    dominates (measured: `genie bench sample` at the issue-8 reference size is no faster on oneDNN).
    """
    if (  # also while compiling: onednn_mm is an opaque op to inductor
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.dim() >= 2
        and x.numel() >= 512 * x.shape[-1]  # small products (generation, batch 1) are call-overhead bound
        and onednn_available()
    ):
        x_MI = x.reshape(-1, x.shape[-1]).contiguous()
        product = onednn_mm if torch.compiler.is_compiling() else _OneDNNLinear.apply
        return product(x_MI, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose fp32 CPU products run on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# ---- RMSNorm ----------------------------------------------------------------------------------------------


def _normalise_(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x / rms(x) over the last dim, in place: returns (n, r) with n = x * r and r = 1 / rms, (..., 1)."""
    E = x.shape[-1]
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(E).add_(eps).rsqrt_()
    return x.mul_(r), r


def _normalise_backward(dn: Tensor, n: Tensor, r: Tensor) -> Tensor:
    """Gradient w.r.t. x of n = x * r(x), given dn: r * (dn - n * mean(dn * n)) (3 passes)."""
    dot = torch.linalg.vecdot(dn, n, dim=-1).unsqueeze(-1)  # (..., 1)
    return torch.addcmul(dn, n, dot, value=-1.0 / n.shape[-1]).mul_(r)


# ---- RoPE -------------------------------------------------------------------------------------------------


def _rotate(x: Tensor, a: Tensor, b: Tensor, sign: float) -> Tensor:
    """x * a + sign * rotate_half(x) * b, rotate_half(x) = cat(-x2, x1), tables broadcast: 3 passes over x.

    With a = cos, b = sin this is RoPE (sign 1) or its transpose, the inverse rotation (sign -1).
    """
    h = x.shape[-1] // 2
    out = x * a
    out[..., :h].addcmul_(x[..., h:], b[..., :h], value=-sign)
    out[..., h:].addcmul_(x[..., :h], b[..., h:], value=sign)
    return out


class _RoPE(torch.autograd.Function):
    """Rotary embedding with its transpose (the inverse rotation) as the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(cos_TE, sin_TE)
        return _rotate(x, cos_TE, sin_TE, 1.0)

    @staticmethod
    def backward(ctx, dz: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        cos_TE, sin_TE = ctx.saved_tensors
        # the halves of cos/sin are equal, so the transpose of the rotation is the rotation by -angle
        return _rotate(dz, cos_TE, sin_TE, -1.0), None, None


def apply_rope_fast(x: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> Tensor:
    """RoPE of (..., T, E) by (T, E) tables ("rotate half" layout, equal halves), in the tables' dtype."""
    return _RoPE.apply(x.to(cos_TE.dtype), cos_TE, sin_TE)


# ---- QK RMSNorm + RoPE in one node ----------------------------------------------------------------------


def _rope_tables(w_SE: Tensor, cos_TE: Tensor, sin_TE: Tensor) -> tuple[Tensor, Tensor]:
    """Fold per-head-dim weights into the RoPE tables: rope(n * w) = n * A + rotate_half(n) * B.

    rotate_half(n * w) = cat(-n2 w2, n1 w1) = rotate_half(n) * cat(w2, w1), so A = w * cos and
    B = cat(w2, w1) * sin. Shapes: w (S, E) for the S = 2 stacked tensors (queries, keys); out (S, T, E).
    """
    swapped_SE = torch.cat(w_SE.chunk(2, dim=-1)[::-1], dim=-1)
    return w_SE[:, None] * cos_TE, swapped_SE[:, None] * sin_TE


class _QKVHeads(torch.autograd.Function):
    """The fused qkv projection's output (B', L, 3 * K * E) -> heads q, k, v, each contiguous (B', K, L, E) in the
    projection's dtype, q and k RMS-normalised (own weights) and RoPE-rotated in fp32.

    The backward writes the projection's gradient straight into its (B', L, 3 * K * E) layout: autograd's own
    split would stack the three head gradients and then copy them again to undo the head transpose.
    """

    @staticmethod
    def forward(ctx, qkv_BLX, num_heads, w_q, w_k, eps, cos_TE, sin_TE):  # noqa: D102
        Bp, L, X = qkv_BLX.shape
        heads = qkv_BLX.view(Bp, L, 3, num_heads, X // (3 * num_heads)).permute(2, 0, 3, 1, 4)  # (3, B', K, L, E)
        x = torch.empty(heads[:2].shape, dtype=torch.float32, device=qkv_BLX.device)  # (2, B', K, L, E)
        x.copy_(heads[:2])  # one strided read + cast for queries and keys
        # z = rope(rms_norm(x) * w), queries and keys stacked
        E = x.shape[-1]
        n, r = _normalise_(x, eps)  # in place; r (2, B', K, L, 1)
        w_SE = torch.stack((w_q, w_k)).float()  # (2, E)
        if cos_TE is None:
            w_b = w_SE.view(2, 1, 1, 1, E)
            z = n * w_b
            ctx.save_for_backward(n, r, w_b)
        else:
            a, b = _rope_tables(w_SE, cos_TE.float(), sin_TE.float())  # (2, T, E) each
            z = _rotate(n, a.view(2, 1, 1, *a.shape[1:]), b.view(2, 1, 1, *b.shape[1:]), 1.0)
            ctx.save_for_backward(n, r, w_SE.view(2, 1, 1, 1, E), cos_TE.float(), sin_TE.float())
        ctx.rope = cos_TE is not None
        if z.dtype == qkv_BLX.dtype:
            q, k = z.unbind(0)
        else:
            q, k = z[0].to(qkv_BLX.dtype), z[1].to(qkv_BLX.dtype)
        ctx.shape = heads.shape
        return q, k, heads[2].contiguous()

    @staticmethod
    def backward(ctx, dq, dk, dv):  # noqa: D102
        _, Bp, K, L, E = ctx.shape
        given = next(d for d in (dv, dq, dk) if d is not None)  # (ctx.saved_tensors may be read only once)
        alloc = torch.empty if dq is not None and dk is not None else torch.zeros
        dz = alloc((2, Bp, K, L, E), dtype=torch.float32, device=given.device)
        for i, d in enumerate((dq, dk)):
            if d is not None:
                dz[i].copy_(d)
        if ctx.rope:
            n, r, w_b, cos_TE, sin_TE = ctx.saved_tensors
            g = _rotate(dz, cos_TE, sin_TE, -1.0)  # grad w.r.t. n * w (the transposed rotation)
        else:
            n, r, w_b = ctx.saved_tensors
            g = dz
        dw = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw = (g * n).reshape(2, -1, E).sum(1)  # (2, E)
        dx = _normalise_backward(g * w_b, n, r)  # (2, B', K, L, E)
        dqkv = torch.empty((Bp, L, 3, K, E), dtype=given.dtype, device=given.device)
        dheads = dqkv.permute(2, 0, 3, 1, 4)  # (3, B', K, L, E) view
        dheads[:2].copy_(dx)
        if dv is None:
            dheads[2].zero_()
        else:
            dheads[2].copy_(dv)
        dw_q, dw_k = (None, None) if dw is None else dw.unbind(0)
        return dqkv.view(Bp, L, 3 * K * E), None, dw_q, dw_k, None, None, None


def qkv_heads_fast(
    qkv_BLX: Tensor,
    num_heads: int,
    w_q: Tensor,
    w_k: Tensor,
    eps: float | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused qkv projection into heads; RMSNorm q and k (own weights), then RoPE if given: one autograd node.

    Args:
        qkv_BLX: (B', L, 3 * K * E) the projection's output ([q | k | v], each head-major), fp32 or bf16.
        num_heads: K.
        w_q, w_k: (E,) RMSNorm weights.
        eps: RMSNorm epsilon (None: fp32's machine epsilon).
        rope: optional (cos, sin) tables, each (L, E).

    Returns:
        q, k, v: each (B', K, L, E) contiguous, in ``qkv_BLX``'s dtype (q and k computed in fp32). The same
        values as ``apply_rope(F.rms_norm(q, (E,), w_q, eps), *rope)`` for q, likewise k, and v as split.
    """
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    cos, sin = rope if rope is not None else (None, None)
    return _QKVHeads.apply(qkv_BLX, num_heads, w_q, w_k, eps, cos, sin)


# ---- short-sequence attention -----------------------------------------------------------------------------

# Largest L * S (query x key length) that takes :func:`short_attention`: its probabilities (B', K, L, S) are kept
# for backward, which at L = S = 128 is 16x the size of q. Measured forward + backward on the 2-core CPU, bf16
# (B' K = 256, E = 32): L = S = 64: 1.7 ms against 5.4 ms for PyTorch's flash attention in fp32 (18 ms in bf16);
# L = S = 128: 6.2 ms against 15 ms; at L = S = 256 the two are even (49 vs 50 ms).
SHORT_ATTENTION_MAX_LS = 128 * 128


def short_attention_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`short_attention` is the CPU attention for these (B', K, L|S, E) tensors: bf16, short.

    fp32 keeps PyTorch's kernel. There the short path only gains on very short keys (temporal attention, 8 keys:
    2.6 against 3.9 ms; at 64 tokens the two are even), about 3% of a reference fp32 step, and changing fp32
    rounding moves this project's seed-sensitive CPU learning tests and demo (the robot fine-tune test's rollout
    PSNR went from 17.0 to 13.7 dB with it), which all train in fp32.
    """
    if not (use_cpu_ops(v) and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return False
    return q.shape[-2] * k.shape[-2] <= SHORT_ATTENTION_MAX_LS


class _ShortAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) v for short sequences, every tensor in q's dtype (the softmax and its
    backward accumulate in fp32 internally), probabilities (G, L, S) kept for backward.

    Works on (G, L, E) x (G, S, E), G = B' * K heads.
    """

    @staticmethod
    def forward(ctx, q_GLE, k_GSE, v_GSE, allowed_LS, scale):  # noqa: D102
        s_GLS = torch.baddbmm(q_GLE.new_empty(()), q_GLE, k_GSE.transpose(1, 2), beta=0.0, alpha=scale)
        if allowed_LS is not None:
            s_GLS.masked_fill_(~allowed_LS, float("-inf"))
        p_GLS = torch.softmax(s_GLS, dim=-1)
        ctx.save_for_backward(q_GLE, k_GSE, v_GSE, p_GLS)
        ctx.scale = scale
        return torch.bmm(p_GLS, v_GSE)

    @staticmethod
    def backward(ctx, dy_GLE):  # noqa: D102
        q_GLE, k_GSE, v_GSE, p_GLS = ctx.saved_tensors
        dy_GLE = dy_GLE.contiguous()
        dv = torch.bmm(p_GLS.transpose(1, 2), dy_GLE)  # (G, S, E)
        dp_GLS = torch.bmm(dy_GLE, v_GSE.transpose(1, 2))
        # softmax backward, ds = p * (dp - <dp, p>), one fused pass (fp32 accumulation for bf16)
        ds_GLS = torch._softmax_backward_data(dp_GLS, p_GLS, -1, p_GLS.dtype)
        dq = torch.baddbmm(q_GLE.new_empty(()), ds_GLS, k_GSE, beta=0.0, alpha=ctx.scale)  # (G, L, E)
        dk = torch.baddbmm(q_GLE.new_empty(()), ds_GLS.transpose(1, 2), q_GLE, beta=0.0, alpha=ctx.scale)
        return dq, dk, dv, None, None


def short_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Attention for short sequences on the CPU, as ``F.scaled_dot_product_attention`` (no dropout).

    PyTorch's CPU flash attention works in blocks sized for long sequences; at the ST transformer's lengths
    (64 tokens per frame, 8-16 frames) plain batched products with the probabilities kept are up to 1.5x faster
    in fp32 and 3-8x faster in bf16, which the flash kernel runs slower than fp32. In bf16 the scores and
    probabilities are bf16 (the softmax and its backward accumulate in fp32), as in attention written out under
    autocast.

    Args:
        q: (B', K, L, E) queries;  k, v: (B', K, S, E) keys and values, all one dtype.
        mask: optional boolean (L, S), True where a query may attend a key (every row needs one True).
        causal: mask with the causal (upper-left aligned, as SDPA's ``is_causal``) triangle instead.

    Returns:
        (B', K, L, E), in q's dtype.
    """
    *lead, L, E = q.shape
    S = k.shape[-2]
    if causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril_()
    with torch.autocast("cpu", enabled=False):  # the inputs share a dtype already; keep the products in it
        y_GLE = _ShortAttention.apply(q.reshape(-1, L, E), k.reshape(-1, S, E), v.reshape(-1, S, E), mask, E**-0.5)
    return y_GLE.view(*lead, L, E)

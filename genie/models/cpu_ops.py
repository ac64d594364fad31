"""Faster CPU versions of the ST transformer's hot ops: a linear layer, QK RMSNorm and RoPE.

Dimension keys:
    M: rows (all leading dims of the input flattened)
    I: input features;  O: output features
    E: features normalised / rotated (the head dim)

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
  multiply under bf16; :func:`qk_norm_rope_fast` does both norms and both rotations as one autograd node with
  a hand-written backward, in fp32 (:func:`apply_rope_fast`, 3 passes each way, rotates without a norm).

Each is used only for CPU tensors (and outside ``torch.compile``, which fuses these itself); on a GPU the
model calls ``F.linear``, the fused ``F.rms_norm`` kernel and the plain RoPE. Each matches its reference to
fp32 rounding in value and gradient (tests/models/test_cpu_ops.py). Speed before -> after is in
docs/architecture.md ("Measured").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def use_cpu_ops(x: Tensor) -> bool:
    """Whether ``x`` should take this module's CPU paths: an fp32 or bf16 CPU tensor, in eager mode.

    (float64 models, used by exactness tests, keep PyTorch's own ops.)
    """
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()


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


class _QKNormRoPE(torch.autograd.Function):
    """z = rope(rms_norm(x) * w) for queries and keys stacked as one (2, B', K, L, E) fp32 tensor."""

    @staticmethod
    def forward(ctx, q, k, w_q, w_k, eps, cos_TE, sin_TE):  # noqa: D102
        E = q.shape[-1]
        x = torch.empty((2, *q.shape), dtype=torch.float32, device=q.device)  # (2, B', K, L, E)
        x[0].copy_(q)  # one strided read + cast per tensor
        x[1].copy_(k)
        n, r = _normalise_(x, eps)  # in place; r (2, ..., 1)
        w_SE = torch.stack((w_q, w_k)).float()  # (2, E)
        lead = (1,) * (q.dim() - 2)  # broadcast over B', K
        if cos_TE is None:
            w_b = w_SE.view(2, *lead, 1, E)
            z = n * w_b
            ctx.save_for_backward(n, r, w_b)
        else:
            a, b = _rope_tables(w_SE, cos_TE.float(), sin_TE.float())  # (2, T, E) each
            z = _rotate(n, a.view(2, *lead, *a.shape[1:]), b.view(2, *lead, *b.shape[1:]), 1.0)
            ctx.save_for_backward(n, r, w_SE.view(2, *lead, 1, E), cos_TE.float(), sin_TE.float())
        ctx.rope = cos_TE is not None
        ctx.in_dtypes = (q.dtype, k.dtype)
        return z

    @staticmethod
    def backward(ctx, dz):  # noqa: D102
        if ctx.rope:
            n, r, w_b, cos_TE, sin_TE = ctx.saved_tensors
            g = _rotate(dz, cos_TE, sin_TE, -1.0)  # grad w.r.t. n * w (the transposed rotation)
        else:
            n, r, w_b = ctx.saved_tensors
            g = dz
        dw = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw = (g * n).reshape(2, -1, n.shape[-1]).sum(1)  # (2, E)
        dx = _normalise_backward(g * w_b, n, r)  # (2, B', K, L, E)
        dq, dk = dx[0].to(ctx.in_dtypes[0]), dx[1].to(ctx.in_dtypes[1])
        return dq, dk, None if dw is None else dw[0], None if dw is None else dw[1], None, None, None


def qk_norm_rope_fast(
    q: Tensor,
    k: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    eps: float | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """RMSNorm of queries and keys (own weights), then RoPE if given, as one autograd node.

    Args:
        q, k: (B', K, L, E) any strides, fp32 or bf16.
        w_q, w_k: (E,) RMSNorm weights.
        eps: RMSNorm epsilon (None: fp32's machine epsilon).
        rope: optional (cos, sin) tables, each (L, E).

    Returns:
        q, k: (B', K, L, E) float32. Same values as ``apply_rope(F.rms_norm(q, (E,), w_q, eps), *rope)``.
    """
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    cos, sin = rope if rope is not None else (None, None)
    return _QKNormRoPE.apply(q, k, w_q, w_k, eps, cos, sin).unbind(0)

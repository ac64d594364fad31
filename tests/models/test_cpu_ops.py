"""The CPU fast paths (genie/models/cpu_ops.py) against PyTorch's reference ops: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from genie.models import cpu_ops
from genie.models.blocks import apply_rope, rope_cos_sin

pytestmark = pytest.mark.skipif(not cpu_ops.onednn_available(), reason="PyTorch built without oneDNN")


def graph_names(t):
    """Names of the autograd nodes behind ``t``."""
    names, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return names


def grads(fn, *tensors):
    """Output of ``fn`` and the gradients of a fixed random projection of it w.r.t. ``tensors``."""
    out = fn(*tensors)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * probe).sum(), tensors))


@pytest.mark.parametrize("shape,out_features,bias", [((6, 100, 48), 96, True), ((600, 128), 40, False)])
def test_linear_matches_f_linear(shape, out_features, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    w = torch.randn(out_features, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    args = (x, w, b) if bias else (x, w)
    fast = grads(lambda *a: cpu_ops.linear(*a), *args)
    ref = grads(lambda *a: F.linear(*a), *args)
    assert any("OneDNN" in n for n in graph_names(fast[0]))  # the fast path ran
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_linear_takes_plain_path_for_few_rows_under_autocast_and_for_float64():
    w = torch.randn(3, 8, requires_grad=True)
    assert not any("OneDNN" in n for n in graph_names(cpu_ops.linear(torch.randn(4, 8), w)))  # 4 rows
    x = torch.randn(600, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_ops.linear(x, w).dtype == torch.bfloat16  # autocast's own bf16 linear
    y = cpu_ops.linear(x.double(), w.double())
    assert y.dtype == torch.float64 and not any("OneDNN" in n for n in graph_names(y))
    torch.testing.assert_close(y, F.linear(x.double(), w.double()))


def test_linear_module_keeps_nn_linear_state_dict():
    a, b = torch.nn.Linear(8, 4), cpu_ops.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(600, 8)
    torch.testing.assert_close(a(x), b(x))


def test_rope_matches_reference():
    cos, sin = rope_cos_sin(3, 6, 16, 10000.0, torch.device("cpu"))
    x = torch.randn(5, 2, 6, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fast = grads(lambda x: cpu_ops.apply_rope_fast(x, cos, sin), x)
    ref = grads(lambda x: apply_rope(x, cos, sin), x)
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads_match_split_norm_rope(with_rope, dtype):
    """One node for the head split, both norms and both rotations == rearrange + rms_norm + RoPE, in value and in
    every gradient (including v's and the unused-output case)."""
    g = torch.Generator().manual_seed(0)
    K, L, E = 3, 7, 16
    qkv = torch.randn(6, L, 3 * K * E, generator=g).to(dtype).requires_grad_()  # (B', L, 3 K E) as projected
    w_q = (1 + 0.1 * torch.randn(E, generator=g)).requires_grad_()
    w_k = (1 + 0.1 * torch.randn(E, generator=g)).requires_grad_()
    rope = rope_cos_sin(2, L, E, 10000.0, torch.device("cpu")) if with_rope else None

    def fast(qkv, w_q, w_k):
        q, k, v = cpu_ops.qkv_heads_fast(qkv, K, w_q, w_k, 1e-6, rope)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert q.dtype == k.dtype == v.dtype == dtype
        return torch.stack((q.float(), k.float(), v.float()))

    def ref(qkv, w_q, w_k):
        q, k, v = qkv.view(6, L, 3, K, E).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.rms_norm(q.float(), (E,), w_q, 1e-6), F.rms_norm(k.float(), (E,), w_k, 1e-6)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return torch.stack((q.to(dtype).float(), k.to(dtype).float(), v.float()))

    out_fast, *grads_fast = grads(fast, qkv, w_q, w_k)
    out_ref, *grads_ref = grads(ref, qkv, w_q, w_k)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert grads_fast[0].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, r in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, r.to(a.dtype), **tol)
    # only k used: q's and v's parts of the projection's gradient are zero
    _, k, _ = cpu_ops.qkv_heads_fast(qkv, K, w_q, w_k, 1e-6, rope)
    (dqkv,) = torch.autograd.grad(k.float().sum(), qkv)
    parts = dqkv.view(6, L, 3, K, E)
    assert parts[:, :, 0].abs().max() == 0 and parts[:, :, 2].abs().max() == 0 and parts[:, :, 1].abs().max() > 0


def _attention_inputs(dtype, L, S, G=(3, 2), E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*G, L, E, generator=g)
    k, v = (torch.randn(*G, S, E, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("masking", ["none", "causal", "window"])
def test_short_attention_matches_sdpa_fp32(masking):
    """Values and q/k/v gradients equal SDPA's, with no mask, the causal mask and a windowed (cache) mask."""
    L, S = (5, 9) if masking == "window" else (7, 7)
    mask = None
    if masking == "window":  # 4 cached + 5 new frames, window of 6 frames (as TemporalAttention builds it)
        dist = torch.arange(4, 9)[:, None] - torch.arange(0, 9)
        mask = (dist >= 0) & (dist < 6)
    causal = masking == "causal"
    inputs = _attention_inputs(torch.float32, L, S)
    fast = grads(lambda q, k, v: cpu_ops.short_attention(q, k, v, mask, causal), *inputs)
    ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), *inputs)
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_short_attention_bf16_is_close_to_fp32():
    """bf16 inputs: within bf16 rounding of the fp32 result, in value and gradients (and bf16 throughout)."""
    inputs = _attention_inputs(torch.bfloat16, 64, 64, G=(4, 2), E=32)
    fast = grads(lambda q, k, v: cpu_ops.short_attention(q, k, v), *inputs)
    ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *[t.float() for t in inputs])
    for a, r in zip(fast, ref, strict=True):
        assert a.dtype == torch.bfloat16
        err = (a.float() - r).abs().max() / r.abs().max()
        assert err < 2e-2, err


def test_short_attention_applies_only_where_it_is_faster():
    def qkv(dtype, L, S):
        return torch.zeros(2, 4, L, 32, dtype=dtype), *(torch.zeros(2, 4, S, 32, dtype=dtype) for _ in range(2))

    assert cpu_ops.short_attention_applies(*qkv(torch.bfloat16, 64, 64))  # spatial, 8x8 tokens
    assert cpu_ops.short_attention_applies(*qkv(torch.bfloat16, 128, 128))
    assert not cpu_ops.short_attention_applies(*qkv(torch.bfloat16, 256, 256))  # flash attention wins
    assert not cpu_ops.short_attention_applies(*qkv(torch.float32, 8, 8))  # fp32 keeps SDPA
    assert not cpu_ops.short_attention_applies(*qkv(torch.float64, 8, 8))  # exactness tests keep SDPA
    q, k, v = qkv(torch.bfloat16, 8, 8)
    assert not cpu_ops.short_attention_applies(q.float(), k, v)  # mixed dtypes


def test_attention_layer_takes_short_path_on_cpu_and_sdpa_with_dropout():
    """The ST block's attention: no dropout -> the short path (same output as SDPA); dropout in training -> SDPA."""
    from genie.models.blocks import Attention, STTransformerConfig

    attn = Attention(STTransformerConfig(width=32, num_heads=2, dropout=0.0)).to(torch.bfloat16)
    q, k, v = _attention_inputs(torch.bfloat16, 6, 6, G=(3, 2))
    with torch.no_grad():
        y = attn.attend(q, k, v, causal=True)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
        torch.testing.assert_close(y, attn.proj(ref.transpose(1, 2).reshape(3, 6, 32)), rtol=2e-2, atol=2e-2)
    attn.dropout = 0.5
    attn.train()
    names = graph_names(attn.attend(q, k, v, causal=True))
    assert not any("ShortAttention" in n for n in names)
    attn.eval()
    assert any("ShortAttention" in n for n in graph_names(attn.attend(q, k, v, causal=True)))


def test_genie_cpu_ops_0_switches_every_path_off_and_the_math_stays(monkeypatch):
    from genie.models.blocks import STTransformer, STTransformerConfig

    torch.manual_seed(0)
    model = STTransformer(STTransformerConfig(width=32, depth=2, num_heads=2, num_spatial_tokens=9, max_frames=4))
    x = torch.randn(2, 4, 9, 32)
    q = torch.randn(2, 2, 9, 16, dtype=torch.bfloat16)
    assert cpu_ops.attention(q, q, q, None, False, 0.0) is not None  # bf16 on the CPU: the short-sequence kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_bf16 = model(x)
    fast = model(x)
    monkeypatch.setenv("GENIE_CPU_OPS", "0")
    assert not cpu_ops.use_cpu_ops(x) and cpu_ops.attention(q, q, q, None, False, 0.0) is None
    assert cpu_ops.qkv_heads(torch.randn(2, 9, 96), 2, model.blocks[0].spatial.q_norm, None, None) is None
    torch.testing.assert_close(model(x), fast, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x), fast_bf16, atol=0.05, rtol=0.05)

"""The CPU fast paths (genie/models/cpu_ops.py) against PyTorch's reference ops: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from genie.models import cpu_ops
from genie.models.blocks import apply_rope, rope_cos_sin

pytestmark = pytest.mark.skipif(not cpu_ops.onednn_available(), reason="PyTorch built without oneDNN")


def graph_names(t):
    """Names of the autograd nodes behind ``t``."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
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
def test_qk_norm_rope_matches_separate_ops(with_rope, dtype):
    """One node for both norms and rotations == rms_norm then RoPE, in value and every gradient."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 3, 4, 7, 16, generator=g).to(dtype).requires_grad_()  # (B', 3, K, L, E) as projected
    w_q = (1 + 0.1 * torch.randn(16, generator=g)).requires_grad_()
    w_k = (1 + 0.1 * torch.randn(16, generator=g)).requires_grad_()
    rope = rope_cos_sin(2, 7, 16, 10000.0, torch.device("cpu")) if with_rope else None

    def fast(qkv, w_q, w_k):
        return torch.stack(cpu_ops.qk_norm_rope_fast(qkv[:, 0], qkv[:, 1], w_q, w_k, 1e-6, rope))

    def ref(qkv, w_q, w_k):
        q = F.rms_norm(qkv[:, 0].float(), (16,), w_q, 1e-6)
        k = F.rms_norm(qkv[:, 1].float(), (16,), w_k, 1e-6)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return torch.stack((q, k))

    out_fast, *grads_fast = grads(fast, qkv, w_q, w_k)
    out_ref, *grads_ref = grads(ref, qkv, w_q, w_k)
    assert out_fast.dtype == torch.float32 and grads_fast[0].dtype == dtype
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, r in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, r.to(a.dtype), **tol)


def test_onednn_linear_survives_torch_compile():
    """Under torch.compile the op stays one opaque call with its own backward: same values and gradients."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 32, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    compiled = torch.compile(lambda x, w, b: torch.nn.functional.gelu(cpu_ops.linear(x, w, b)), backend="aot_eager")
    fast = grads(compiled, x, w, b)
    ref = grads(lambda x, w, b: torch.nn.functional.gelu(F.linear(x, w, b)), x, w, b)
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    torch._dynamo.reset()

"""Tests of the ST transformer: shapes, temporal causality, the KV cache (incl. sliding window), SDPA paths."""

import pytest
import torch
import torch.nn.functional as F

from genie.models.blocks import STTransformer, STTransformerConfig, apply_rope, rope_cos_sin, temporal_mask

torch.set_num_threads(2)

B, N, D = 2, 6, 32


def make_model(depth: int = 2, max_frames: int = 8, **kw) -> STTransformer:
    torch.manual_seed(0)
    cfg = STTransformerConfig(width=D, depth=depth, num_heads=4, num_spatial_tokens=N, max_frames=max_frames, **kw)
    return STTransformer(cfg).eval()


def test_shapes_and_grad():
    model = make_model().train()
    x_BTND = torch.randn(B, 5, N, D, requires_grad=True)
    y_BTND = model(x_BTND)
    assert y_BTND.shape == (B, 5, N, D)
    y_BTND.square().mean().backward()
    assert x_BTND.grad is not None and x_BTND.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("T, max_frames", [(6, 8), (10, 4)])  # plain causal, and sliding window
def test_temporal_causality(T, max_frames):
    model = make_model(max_frames=max_frames)
    x = torch.randn(B, T, N, D)
    t = T // 2
    x2 = x.clone()
    x2[:, t] += torch.randn(B, N, D)
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :t], y2[:, :t], atol=0, rtol=0)  # the past never sees the future
    # the changed frame and the later frames within its window move
    assert (y[:, t : t + max_frames] - y2[:, t : t + max_frames]).abs().amax(dim=(0, 2, 3)).min() > 1e-4


def test_sliding_window_limits_reach():
    # one layer: frame t sees frames t-max_frames+1 .. t only
    model = make_model(depth=1, max_frames=3)
    x = torch.randn(B, 8, N, D)
    x2 = x.clone()
    x2[:, 2] += torch.randn(B, N, D)
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    changed = (y - y2).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [False, False, True, True, True, False, False, False]


@pytest.mark.parametrize(
    "T, max_frames, chunks",
    [
        (7, 8, [1] * 7),  # frame by frame, within the window
        (7, 8, [3, 1, 2, 1]),  # multi-frame chunks with a cache (masked path)
        (12, 4, [1] * 12),  # frame by frame past the window: the cache slides
        (12, 4, [5, 2, 1, 4]),  # chunks longer than what the cache holds
    ],
)
def test_kv_cache_matches_full_forward(T, max_frames, chunks):
    model = make_model(depth=3, max_frames=max_frames)
    x = torch.randn(B, T, N, D)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache()
        outs, t = [], 0
        for n in chunks:
            outs.append(model(x[:, t : t + n], cache=cache))
            t += n
            assert cache.num_frames == t
            assert cache.past_len == min(t, max_frames - 1)  # only what future frames can reach is kept
            assert cache.keys[0].shape == (B * N, 4, cache.past_len, D // 4)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_read_only_cache_step():
    # MaskGIT refines a frame several times against the same cache before committing it
    model = make_model()
    x = torch.randn(B, 4, N, D)
    with torch.no_grad():
        cache = model.make_cache()
        model(x[:, :3], cache=cache)
        k_before = [k.clone() for k in cache.keys]
        peek = model(x[:, 3:], cache=cache, update_cache=False)
        assert cache.num_frames == 3 and all(torch.equal(a, b) for a, b in zip(k_before, cache.keys, strict=True))
        commit = model(x[:, 3:], cache=cache)
        full = model(x)
    torch.testing.assert_close(peek, commit, atol=0, rtol=0)
    torch.testing.assert_close(commit, full[:, 3:], atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.num_frames == 0 and cache.past_len == 0


@pytest.mark.parametrize("max_frames", [4, 16])
def test_ring_cache_matches_full_forward(max_frames):
    # the fast step's fixed-size cache: a context, then frames one at a time (each refined read-only first), well past
    # the window; float64, since the ring sums its keys in slot order and rotates them by relative positions
    model = make_model(depth=3, max_frames=max_frames).double()
    x = torch.randn(B, 11, N, D, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(ring=True)
        outs = [model(x[:, :3], cache=cache)]
        keys = cache.keys[0]
        for t in range(3, 11):
            peek = model(x[:, t : t + 1], cache=cache, update_cache=False)
            assert cache.num_frames == t
            outs.append(model(x[:, t : t + 1], cache=cache))
            torch.testing.assert_close(peek, outs[-1], atol=0, rtol=0)
        assert cache.keys[0] is keys and keys.shape == (B * N, 4, max_frames, D // 4)  # fixed buffers, one address
        with pytest.raises(ValueError, match="update_cache"):
            model(x[:, :2], cache=cache, update_cache=False)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=1e-12)


def test_cache_truncate():
    model = make_model(max_frames=8)
    with torch.no_grad():
        cache = model.make_cache()
        model(torch.randn(B, 6, N, D), cache=cache)
    cache.truncate(2)
    assert cache.past_len == 2 and cache.num_frames == 6


def test_sdpa_paths(monkeypatch):
    """Training clips take the fused causal path (SDPA's, or the CPU short-sequence attention's); one cached frame
    needs no mask."""
    from genie.models import cpu_ops

    calls = []
    sdpa, short = F.scaled_dot_product_attention, cpu_ops.short_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    def spy_short(q, k, v, mask=None, causal=False):
        calls.append((q.shape[2], k.shape[2], mask is not None, causal))
        return short(q, k, v, mask, causal)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(cpu_ops, "short_attention", spy_short)
    model = make_model(depth=1, max_frames=8)
    with torch.no_grad():
        model(torch.randn(B, 5, N, D))
        assert calls == [(N, N, False, False), (5, 5, False, True)]  # spatial: bidirectional; temporal: causal
        calls.clear()
        cache = model.make_cache()
        model(torch.randn(B, 2, N, D), cache=cache)
        model(torch.randn(B, 1, N, D), cache=cache)
        assert calls[-1] == (1, 3, False, False)  # 1 new frame over 2 cached + itself, no mask


def test_temporal_attention_matches_reference():
    """SDPA-based temporal attention equals a hand-written masked softmax attention (sliding window)."""
    model = make_model(depth=1, max_frames=3)
    attn = model.blocks[0].temporal
    T = 6
    x = torch.randn(B, T, N, D)
    with torch.no_grad():
        got = attn(x, rope_cos_sin(0, T, D // 4, 10000.0, x.device))
        q, k, v = attn.qkv_heads(x.permute(0, 2, 1, 3).reshape(B * N, T, D))
        cos, sin = rope_cos_sin(0, T, D // 4, 10000.0, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        logits = q @ k.transpose(-1, -2) / (D // 4) ** 0.5
        logits = logits.masked_fill(~temporal_mask(0, T, 0, T, 3, x.device), float("-inf"))
        y = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B * N, T, D)
        ref = attn.proj(y).reshape(B, N, T, D).permute(0, 2, 1, 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_grads():
    model = make_model().train()
    x = torch.randn(B, 4, N, D)
    model(x).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).square().mean().backward()
    for p, g in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # CPU rms_norm: unfused bf16 path
def test_bf16_autocast_runs():
    model = make_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(B, 4, N, D))
        cache = model.make_cache()
        model(torch.randn(B, 2, N, D), cache=cache)
        model(torch.randn(B, 1, N, D), cache=cache)
    assert torch.isfinite(y.float()).all()


def test_rope_relative():
    """RoPE scores depend only on the distance between frames (what makes the sliding cache exact)."""
    q, k = torch.randn(1, 8), torch.randn(1, 8)
    cos, sin = rope_cos_sin(0, 1000, 8, 10000.0, torch.device("cpu"))
    s1 = (apply_rope(q, cos[3:4], sin[3:4]) * apply_rope(k, cos[1:2], sin[1:2])).sum()
    s2 = (apply_rope(q, cos[903:904], sin[903:904]) * apply_rope(k, cos[901:902], sin[901:902])).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_qk_norm_hands_rms_norm_a_weight_in_the_input_dtype(monkeypatch):
    # with an fp32 weight and bf16 input, rms_norm on GPU bypasses its fused kernel (seen on an H200)
    from genie.models.blocks import QKNorm

    seen = []
    real = F.rms_norm

    def recording(x, shape, weight=None, eps=None):
        seen.append((x.dtype, weight.dtype))
        return real(x, shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", recording)
    norm = QKNorm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and seen[-1] == (torch.bfloat16, torch.bfloat16)
    assert norm.weight.dtype == torch.float32  # the parameter itself stays fp32
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x), real(x, (8,), norm.weight, norm.eps))


def test_rope_tables_are_cached_per_device_and_dtype(monkeypatch):
    """A forward reuses the stack's RoPE tables (built once), the outputs do not change, the state dict neither."""
    from genie.models import blocks

    builds = []
    build = blocks.rope_cos_sin
    monkeypatch.setattr(blocks, "rope_cos_sin", lambda *a, **kw: builds.append(a) or build(*a, **kw))
    model = make_model()
    keys = set(model.state_dict())
    x = torch.randn(B, 5, N, D)
    with torch.no_grad():
        first = model(x)
        tables = model._rope_cache[(x.device, torch.float32)]
        second = model(x)
    assert len(builds) == 1 and model._rope_cache[(x.device, torch.float32)] is tables  # the same table object
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert set(model.state_dict()) == keys and not any("rope" in k for k in keys)
    # the rows of the cached table are bitwise the ones built for those frames alone
    cos, sin = model.rope(3, 4, x.device, torch.float32)
    ref_cos, ref_sin = build(3, 4, D // 4, 10000.0, x.device)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # frame by frame with a KV cache, far past the table built first: it grows, and matches the full forward
    long_x = torch.randn(1, 40, N, D)
    with torch.no_grad():
        full = make_model(max_frames=8)(long_x)
        model = make_model(max_frames=8)
        cache = model.make_cache()
        steps = [model(long_x[:, t : t + 1], cache) for t in range(40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert model._rope_cache[(x.device, torch.float32)][0].shape[0] == 64


def test_rope_cache_follows_moves_and_copies():
    """.to() drops the tables (they are rebuilt for the new dtype); deepcopy works; inference-mode tables train."""
    import copy

    model = make_model().train()
    with torch.inference_mode():  # Lightning's validation (and sanity check) runs before the first training step
        model(torch.randn(B, 3, N, D))
    y = model(torch.randn(B, 3, N, D, requires_grad=True))
    y.square().mean().backward()  # the cached tables are saved for backward: they must not be inference tensors
    twin = copy.deepcopy(model)
    assert set(twin.state_dict()) == set(model.state_dict())
    model.double()
    assert not model._rope_cache
    with torch.no_grad():
        out = model(torch.randn(B, 3, N, D, dtype=torch.float64))
    assert out.dtype == torch.float64 and list(model._rope_cache) == [(torch.device("cpu"), torch.float64)]

"""Dynamics model and MaskGIT sampler: masking, conditioning, causality, and cache equivalence."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.sampler import MaskGITSampler, SamplerConfig, choose_tokens, cosine_masked, generate

OFF = {"clean_prefix_prob": 0.0, "mask_schedule": "uniform", "context_noise": 0.0}  # the regime before the options


def tiny(cond: str = "prepend", frames: int = 4, **options) -> DynamicsModel:
    torch.manual_seed(0)
    cfg = DynamicsConfig(
        **options,
        num_codes=64,
        grid_size=4,
        num_actions=4,
        num_frames=frames,
        width=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        action_conditioning=cond,
    )
    return DynamicsModel(cfg).eval()


def test_training_mask_keeps_first_frame_and_respects_rates():
    m = tiny(**OFF)
    mask = m.random_mask((64, 5, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert not mask[:, 0].any()
    rate = mask[:, 1:].float().mean().item()
    assert 0.6 < rate < 0.9  # E[U(0.5, 1)] = 0.75


def regime(frames: int = 6, **options) -> DynamicsModel:
    """A tiny model with the given training-regime options (``clean_prefix_prob``, ``mask_schedule`` ...)."""
    return tiny("film", frames, **options)


def old_random_mask(shape, generator, lo=0.5, hi=1.0):
    """The training mask as it was before the regime options (frame 1 clean, each later frame at U(lo, hi))."""
    B, T, N = shape
    rate = lo + (hi - lo) * torch.rand(B, T, 1, generator=generator)
    mask = torch.rand(B, T, N, generator=generator) < rate
    mask[:, 0] = False
    return mask


def clean_frames(mask):
    """Per clip, how many leading frames have no masked token (T if none is masked): (B,)."""
    any_masked = mask.any(-1)  # (B, T)
    first = any_masked.float().argmax(1)
    return torch.where(any_masked.any(1), first, torch.full_like(first, mask.shape[1]))


def test_options_off_reproduce_the_old_masks_and_inputs():
    m = regime(**OFF)
    shape = (64, 6, 16)
    new = m.random_mask(shape, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(new, old_random_mask(shape, torch.Generator().manual_seed(3)))
    # and forward draws nothing else: the same global RNG state gives the same loss as an explicit old mask
    tokens, actions = torch.randint(0, 64, (4, 6, 16)), torch.randint(0, 4, (4, 5))
    torch.manual_seed(7)
    out = m(tokens, actions)
    torch.manual_seed(7)
    old = old_random_mask((4, 6, 16), None)
    assert torch.equal(out.mask, old)
    assert torch.equal(out.loss, m(tokens, actions, mask=old).loss)


def test_clean_prefix_share_and_lengths():
    p, T = 0.3, 6
    m = regime(frames=T, clean_prefix_prob=p)
    mask = m.random_mask((4000, T, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    first = clean_frames(mask)
    assert (first >= 1).all() and (first <= T - 1).all()  # frame 1 always clean, something always masked
    # every frame from the first masked one on has masked tokens (at least one per masked frame)
    assert all(mask[b, first[b] :].any(-1).all() for b in range(0, 4000, 7))
    # a clean-prefix clip draws its length in 1..T-1: share with a longer clean start is p * (T-2)/(T-1)
    longer = (first > 1).float().mean().item()
    assert abs(longer - p * (T - 2) / (T - 1)) < 0.03
    counts = torch.bincount(first[first > 1], minlength=T)[2:]  # prefixes of 2..T-1 frames: equally likely
    assert counts.min() > 0.7 * counts.max()
    # off: never
    assert (clean_frames(regime(frames=T, **OFF).random_mask((4000, T, 16), torch.device("cpu"))) == 1).all()


def test_clean_prefix_loss_only_on_masked_tokens_after_the_prefix():
    """The gradient reaches logits only at masked positions, none of them at or before a clean prefix."""
    T, N, V = 6, 16, 64
    m = regime(frames=T, clean_prefix_prob=1.0, context_noise=0.1).train()
    tokens, actions = torch.randint(0, V, (32, T, N)), torch.randint(0, 4, (32, T - 1))
    captured = {}
    head = m.head.forward

    def keep(x):
        captured["logits"] = y = head(x)
        y.retain_grad()
        return y

    m.head.forward = keep
    torch.manual_seed(0)
    out = m(tokens, actions)
    out.loss.backward()
    first = clean_frames(out.mask)
    assert (first > 1).any() and (first == 1).any()  # both short and long prefixes drawn
    frame = torch.arange(T)[None, :, None]
    assert not (out.mask & (frame < first[:, None, None])).any()
    grad = captured["logits"].grad.abs().sum(-1)  # (B, T, N)
    assert torch.equal(grad > 0, out.mask)
    # the loss is the cross entropy of the true ids at exactly those positions
    want = torch.nn.functional.cross_entropy(out.logits[out.mask], tokens[out.mask])
    assert torch.allclose(out.loss, want)


def test_cosine_schedule_reaches_low_rates():
    m = regime(mask_schedule="cosine", clean_prefix_prob=0.0)
    mask = m.random_mask((2000, 6, 64), torch.device("cpu"), torch.Generator().manual_seed(0))
    rate = mask[:, 1:].float().mean(-1).flatten()  # per masked frame
    assert (rate >= 1 / 64).all()  # at least one masked token per masked frame
    low = (rate < 0.2).float().mean().item()
    assert 0.08 < low < 0.18  # P(cos(pi/2 u) < 0.2) = 1 - 2 acos(0.2) / pi = 0.128
    assert 0.6 < rate.mean().item() < 0.67  # E[cos(pi/2 u)] = 2 / pi
    uniform = regime(**OFF).random_mask((2000, 6, 64), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert uniform[:, 1:].float().mean(-1).min() > 0.3  # the old schedule never goes low


def test_context_noise_rate_targets_and_loss():
    V, p = 64, 0.1
    m = regime(context_noise=p)
    tokens = torch.randint(0, V, (256, 6, 16))
    mask = m.random_mask(tokens.shape, torch.device("cpu"), torch.Generator().manual_seed(0))
    noisy = m.corrupt_context(tokens, mask, torch.Generator().manual_seed(1))
    changed = noisy != tokens
    assert not (changed & mask).any()  # masked positions are left to the MASK fill
    assert abs(changed[~mask].float().mean().item() - p) < 0.01
    assert noisy.max() < V and noisy.min() >= 0
    assert torch.equal(regime(**OFF).corrupt_context(tokens, mask), tokens)  # off: untouched
    # in forward: the model reads corrupted context, the targets and the loss positions stay the true masked ids;
    # a given mask (evaluation) is never corrupted
    seen = {}
    embed = m.token_embed.forward
    m.token_embed.forward = lambda ids: (seen.__setitem__("ids", ids), embed(ids))[1]
    out = m(tokens[:8], torch.randint(0, 4, (8, 5)))
    ids = seen["ids"]
    assert torch.equal(ids == V, out.mask)  # MASK exactly at the loss positions
    assert (ids[~out.mask] != tokens[:8][~out.mask]).any()
    want = torch.nn.functional.cross_entropy(out.logits[out.mask], tokens[:8][out.mask])
    assert torch.allclose(out.loss, want)
    m(tokens[:8], torch.randint(0, 4, (8, 5)), mask=out.mask)
    assert torch.equal(seen["ids"], tokens[:8].masked_fill(out.mask, V))


def test_regime_options_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="mask_schedule"):
        regime(mask_schedule="linear")
    with pytest.raises(ValueError, match="clean_prefix_prob"):
        regime(clean_prefix_prob=1.5)
    with pytest.raises(ValueError, match="context_noise"):
        regime(context_noise=1.0)
    m = regime(clean_prefix_prob=0.25, mask_schedule="cosine", context_noise=0.02)
    m.save_pretrained(tmp_path)
    cfg = DynamicsModel.from_pretrained(tmp_path).config
    assert (cfg.clean_prefix_prob, cfg.mask_schedule, cfg.context_noise) == (0.25, "cosine", 0.02)


def test_next_frame_output_matches_the_samplers_teacher_forcing():
    """The stage's val/next_frame_accuracy and eval world's teacher-forced accuracy measure the same thing."""
    m = tiny("film", frames=4)
    tokens, actions = torch.randint(0, 64, (3, 4, 16)), torch.randint(0, 4, (3, 3))
    out = m.next_frame_output(tokens, actions)
    assert out.mask[:, -1].all() and not out.mask[:, :-1].any()
    sampler = MaskGITSampler(m, SamplerConfig(steps=1, temperature=0.0))
    sampler.reset(tokens[:, :3], actions[:, :2])
    pred = sampler.masked_logits(actions[:, 2]).argmax(-1)
    assert torch.equal(pred, out.logits[:, -1].argmax(-1))
    assert torch.isclose(out.accuracy, (pred == tokens[:, -1]).float().mean())


@pytest.mark.parametrize("cond", ["film", "prepend", "add"])
def test_loss_only_on_masked_tokens_and_causal(cond):
    m = tiny(cond)
    tokens = torch.randint(0, 64, (2, 4, 4, 4))
    actions = torch.randint(0, 4, (2, 3))
    out = m(tokens, actions)
    assert out.logits.shape == (2, 4, 16, 64) and torch.isfinite(out.loss)
    # causality: changing frame 3 and the action into it leaves frames 1..2's logits unchanged
    t2, a2 = tokens.clone(), actions.clone()
    t2[:, 3] = (t2[:, 3] + 1) % 64
    a2[:, 2] = (a2[:, 2] + 1) % 4
    mask = out.mask
    same = m(t2, a2, mask=mask)
    assert torch.allclose(same.logits[:, :3], out.logits[:, :3], atol=1e-5)


@pytest.mark.parametrize("cond", ["film", "prepend", "add"])
def test_action_changes_the_prediction(cond):
    m = tiny(cond)
    tokens = torch.randint(0, 64, (1, 3, 16))
    mask = torch.zeros(1, 3, 16, dtype=torch.bool)
    mask[:, 2] = True
    a = m(tokens, torch.tensor([[0, 0]]), mask=mask).logits[:, 2]
    b = m(tokens, torch.tensor([[0, 3]]), mask=mask).logits[:, 2]
    assert not torch.allclose(a, b)  # the action into frame 3 reaches its logits


def test_cosine_schedule_ends_fully_unmasked():
    assert [cosine_masked(16, s, 4) for s in range(4)] == [14, 11, 6, 0]


@pytest.mark.parametrize(
    "cond, mode", [("film", "random"), ("film", "confidence"), ("prepend", "confidence"), ("add", "random")]
)
def test_cache_gives_the_same_frames_as_recomputing(cond, mode):
    # float64: confidence ranks of near-equal probabilities must not flip on rounding differences
    m = tiny(cond, frames=4).double()
    ctx = torch.randint(0, 64, (2, 3, 16))
    ctx_actions = torch.randint(0, 4, (2, 2))
    future = torch.randint(0, 4, (2, 7))  # 3 + 7 frames: well past the 4-frame window (the cache slides)
    runs = [
        generate(
            m,
            ctx,
            ctx_actions,
            future,
            SamplerConfig(steps=4, unmask=mode, use_cache=c),
            torch.Generator().manual_seed(5),
        )
        for c in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, 7, 16) and runs[0].max() < 64  # no MASK left


def test_float32_cache_matches_with_default_sampler():
    m = tiny()
    ctx, ctx_actions, future = (
        torch.randint(0, 64, (2, 2, 16)),
        torch.randint(0, 4, (2, 1)),
        torch.randint(0, 4, (2, 5)),
    )
    a, b = (
        generate(m, ctx, ctx_actions, future, SamplerConfig(steps=3, use_cache=c), torch.Generator().manual_seed(0))
        for c in (True, False)
    )
    assert torch.equal(a, b)


def test_choose_tokens_samples_by_inverse_cdf_and_keeps_the_lowest_scores_masked():
    torch.manual_seed(0)
    B, N, V = 4, 2000, 3
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).expand(B, N, V)
    frame = torch.full((B, N), V, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    u = torch.rand(B, N)
    ids, still = choose_tokens(logits, frame, masked, 0, 1.0, u, torch.rand(B, N))
    assert not still.any()
    shares = torch.bincount(ids.flatten(), minlength=V).float() / ids.numel()
    torch.testing.assert_close(shares, torch.tensor([0.2, 0.5, 0.3]), atol=0.02, rtol=0)
    assert torch.equal(ids, (u >= 0.2).long() + (u >= 0.7).long())  # the first id whose CDF passes u
    # random unmasking: the n lowest scores of the still-masked tokens stay masked, known tokens stay known
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    masked = torch.tensor([[True, True, True, False]])
    frame = torch.tensor([[V, V, V, 2]])
    out, still = choose_tokens(torch.zeros(1, 4, V), frame, masked, 1, 0.0, None, scores)
    assert still.tolist() == [[False, True, False, False]] and out.tolist() == [[0, V, 0, 2]]
    # confidence: the least likely sampled token stays masked
    logits = torch.log(torch.tensor([[[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.1, 0.1, 0.8]]]))
    out, still = choose_tokens(logits, torch.full((1, 3), V), torch.ones(1, 3, dtype=torch.bool), 1, 0.0, None, None)
    assert still.tolist() == [[False, True, False]] and out.tolist() == [[0, V, 2]]


@pytest.mark.parametrize(
    "backend, temperature, unmask",
    [
        ("eager", 1.0, "confidence"),
        ("eager", 0.0, "random"),
        pytest.param("inductor", 1.0, "confidence", marks=pytest.mark.slow),  # ~35 s of C++ compiling on 2 cores
        pytest.param("inductor", 0.0, "random", marks=pytest.mark.slow),
    ],
)
def test_compiled_step_gives_the_reference_frames(monkeypatch, backend, temperature, unmask):
    """The fast step (torch.compile over the ring cache) against recomputing the whole history, same generator.

    Backend "eager": dynamo traces the step into one graph per function (what must hold for inductor and CUDA graphs:
    nothing graph-breaks, nothing recompiles as frames go by) and runs it without generating code; "inductor" is
    the real compile (slow)."""
    import torch._dynamo

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=backend, dynamic=False, fullgraph=True))
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = DynamicsConfig(num_codes=64, grid_size=4, num_actions=4, num_frames=4, width=32, depth=1, num_heads=2)
    m = DynamicsModel(cfg).eval().double()
    ctx, ctx_actions, future = (
        torch.randint(0, 64, (2, 2, 16)),
        torch.randint(0, 4, (2, 1)),
        torch.randint(0, 4, (2, 7)),  # 2 + 7 frames: past the 4-frame window, the ring wraps around
    )
    cfg = SamplerConfig(steps=3, temperature=temperature, unmask=unmask)
    sampler, g = MaskGITSampler(m, replace(cfg, compile=True)), torch.Generator().manual_seed(3)
    sampler.reset(ctx, ctx_actions)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the sampler step failed")  # no eager fallback
        frames = [sampler.next_frame(future[:, 0], g)]  # compiles the step and the commit
        with torch.compiler.set_stance("fail_on_recompile"):  # later frames and steps reuse the same graphs
            frames += [sampler.next_frame(future[:, f], g) for f in range(1, future.shape[1])]
    fast = torch.stack(frames, dim=1)
    ref = generate(m, ctx, ctx_actions, future, replace(cfg, use_cache=False), torch.Generator().manual_seed(3))
    assert torch.equal(fast, ref)
    with pytest.raises(ValueError, match="use_cache"):
        MaskGITSampler(m, replace(cfg, compile=True, use_cache=False))


def test_sampler_rejects_bad_actions_and_context():
    m = tiny()
    s = MaskGITSampler(m, SamplerConfig(steps=2))
    with pytest.raises(RuntimeError):
        s.next_frame(torch.tensor([0]))
    with pytest.raises(ValueError, match="actions of shape"):
        s.reset(torch.randint(0, 64, (1, 3, 16)), torch.zeros(1, 1, dtype=torch.long))
    s.reset(torch.randint(0, 64, (1, 1, 16)))
    with pytest.raises(ValueError, match="actions must be in"):
        s.next_frame(torch.tensor([4]))
    with pytest.raises(ValueError):
        MaskGITSampler(m, SamplerConfig(unmask="greedyish"))


def test_save_load_roundtrip(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    m2 = DynamicsModel.from_pretrained(tmp_path)
    tokens, actions = torch.randint(0, 64, (1, 3, 16)), torch.randint(0, 4, (1, 2))
    mask = torch.ones(1, 3, 16, dtype=torch.bool)
    assert torch.equal(m(tokens, actions, mask=mask).logits, m2(tokens, actions, mask=mask).logits)

"""Dynamics model and MaskGIT sampler: masking, conditioning, causality, and cache equivalence."""

from __future__ import annotations

import pytest
import torch

from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.sampler import MaskGITSampler, SamplerConfig, cosine_masked, generate


def tiny(cond: str = "prepend", frames: int = 4) -> DynamicsModel:
    torch.manual_seed(0)
    cfg = DynamicsConfig(
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
    m = tiny()
    mask = m.random_mask((64, 5, 16), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert not mask[:, 0].any()
    rate = mask[:, 1:].float().mean().item()
    assert 0.6 < rate < 0.9  # E[U(0.5, 1)] = 0.75


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

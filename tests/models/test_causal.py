"""Causal dynamics model and its sampler: what each token may read, and the caches against the full forward."""

from __future__ import annotations

import pytest
import torch

from genie.models.causal import CausalDynamicsConfig, CausalDynamicsModel, CausalSampler
from genie.models.sampler import SamplerConfig

V, G, A = 32, 3, 4  # codes, grid (N = 9), actions


def tiny(frames: int = 4, cond: str = "film", dtype=torch.float64, **options) -> CausalDynamicsModel:
    torch.manual_seed(0)
    cfg = CausalDynamicsConfig(
        num_codes=V,
        grid_size=G,
        num_actions=A,
        num_frames=frames,
        width=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        action_conditioning=cond,
        **options,
    )
    return CausalDynamicsModel(cfg).to(dtype).eval()


def clip(B: int = 2, T: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T, G * G), generator=g), torch.randint(0, A, (B, T - 1), generator=g)


def test_loss_is_on_every_token_after_the_first_frame():
    m = tiny()
    tokens, actions = clip()
    out = m(tokens, actions)
    assert out.logits.shape == (2, 3, G * G, V)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 2), tokens[:, 1:].flatten())
    assert torch.allclose(out.loss, expected)


@pytest.mark.parametrize("cond", ["film", "add"])
def test_a_token_reads_the_whole_previous_frame_and_only_earlier_tokens_of_its_own(cond):
    m = tiny(cond=cond)
    tokens, actions = clip(B=1)
    base = m(tokens, actions).logits
    # a later token of frame 2 changes nothing before it in frame 2, nor anything of frame 1
    t, n = 2, 5
    changed = tokens.clone()
    changed[0, t, n] = (changed[0, t, n] + 1) % V
    out = m(changed, actions).logits  # logits[:, s] are frame s + 1's
    diff = (out - base).abs().amax(-1)[0]  # (S, N)
    assert diff[: t - 1].max() == 0  # earlier frames
    assert diff[t - 1, : n + 1].max() == 0  # its own token and the ones before it
    assert diff[t - 1, n + 1 :].min() > 0  # the tokens after it read it
    assert diff[t].min() > 0  # the next frame reads all of it
    # the last token of frame 1 reaches the first token of frame 2 (Jasmine's layout could not)
    changed = tokens.clone()
    changed[0, 1, -1] = (changed[0, 1, -1] + 1) % V
    assert (m(changed, actions).logits - base)[0, 1, 0].abs().max() > 0


def test_the_action_changes_the_prediction():
    m = tiny()
    tokens, actions = clip()
    other = (actions + 1) % A
    assert not torch.allclose(m(tokens, actions).logits[:, -1], m(tokens, other).logits[:, -1])


@pytest.mark.parametrize("frames,context", [(4, 1), (4, 3), (3, 2)])
def test_teacher_forced_sampler_matches_the_full_forward_past_the_window(frames, context):
    """The caches (ring of past slots, frame cache of the open slot) give the full forward's logits all at once
    while the history fits the window, and token by token the same logits as all at once, past it too."""
    m = tiny(frames)
    T = frames + 3
    tokens, actions = clip(T=T)
    sampler = CausalSampler(m, SamplerConfig(temperature=0.0))
    sampler.reset(tokens[:, :context], actions[:, : context - 1])
    for f in range(context, T):
        lo = max(0, f - frames + 1)  # the window the full forward sees: frames lo..f
        full = m(tokens[:, lo : f + 1], actions[:, lo:f]).logits[:, -1]  # (B, N, V)
        a = actions[:, f - 1]
        got = sampler.next_frame_logits(a, tokens[:, f])
        if lo == 0:  # while the whole history fits the window, the cache equals the full forward
            torch.testing.assert_close(got, full, rtol=0, atol=1e-10)
        # one token at a time through the frame cache: the same logits
        inputs = torch.cat([torch.full((2, 1), V), tokens[:, f, :-1]], 1)
        one = torch.cat([sampler.token_logits(inputs[:, n : n + 1], n, a) for n in range(G * G)], 1)
        torch.testing.assert_close(one, got, rtol=0, atol=1e-10)
        sampler.append(tokens[:, f], a)


def test_greedy_sampling_follows_the_model_and_seeds_repeat():
    m = tiny(dtype=torch.float32)
    tokens, actions = clip(T=2)
    s = CausalSampler(m, SamplerConfig(temperature=0.0))
    s.reset(tokens[:, :1])
    a = actions[:, 0]
    frame = s.next_frame(a)
    # greedy: each token is the argmax given the tokens chosen before it
    full = m(torch.stack([tokens[:, 0], frame], 1), a[:, None]).logits[:, 0]
    assert torch.equal(full.argmax(-1), frame)
    draws = []
    for _ in range(2):
        s = CausalSampler(m, SamplerConfig(temperature=1.0))
        s.reset(tokens[:, :1])
        draws.append(s.next_frame(a, torch.Generator().manual_seed(5)))
    assert torch.equal(draws[0], draws[1])


def test_refusals():
    m = tiny()
    with pytest.raises(ValueError, match="compile"):
        CausalSampler(m, SamplerConfig(compile=True))
    with pytest.raises(ValueError, match="caches"):
        CausalSampler(m, SamplerConfig(use_cache=False))
    s = CausalSampler(m)
    with pytest.raises(RuntimeError, match="reset"):
        s.next_frame(torch.zeros(1, dtype=torch.long))
    s.reset(clip(B=1)[0][:, :1])
    with pytest.raises(ValueError, match="actions must be in"):
        s.next_frame(torch.tensor([A]))
    with pytest.raises(ValueError, match="action_conditioning"):
        CausalDynamicsConfig(action_conditioning="prepend")
    with pytest.raises(ValueError, match="num_frames"):
        CausalDynamicsConfig(num_frames=1)


def test_save_load_roundtrip(tmp_path):
    m = tiny(dtype=torch.float32)
    m.save_pretrained(tmp_path)
    back = CausalDynamicsModel.from_pretrained(tmp_path)
    assert back.config.kind == "causal"
    tokens, actions = clip()
    assert torch.equal(m(tokens, actions).logits, back(tokens, actions).logits)

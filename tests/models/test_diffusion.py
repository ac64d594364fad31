"""Diffusion dynamics model and its sampler: the noise regime, causality, and the cache against the full forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genie.models.diffusion import DiffusionDynamicsConfig, DiffusionDynamicsModel, DiffusionSampler
from genie.models.sampler import SamplerConfig

V, Z, G, A = 16, 8, 3, 4  # codes, code dim, grid (N = 9), actions


def tiny(frames: int = 4, dtype=torch.float64, **options) -> DiffusionDynamicsModel:
    torch.manual_seed(0)
    cfg = DiffusionDynamicsConfig(
        num_codes=V,
        code_dim=Z,
        grid_size=G,
        num_actions=A,
        num_frames=frames,
        width=32,
        depth=2,
        num_heads=2,
        **options,
    )
    model = DiffusionDynamicsModel(cfg).to(dtype).eval()
    with torch.no_grad():  # an untrained model predicts 0 (zero-initialised head): give it something to say
        model.latent_out.weight.normal_(std=0.1)
    return model


def codebook(dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(V, Z, generator=torch.Generator().manual_seed(1), dtype=dtype), dim=-1)


def clip(B: int = 2, T: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T, G * G), generator=g), torch.randint(0, A, (B, T - 1), generator=g)


def test_noise_levels_keep_the_first_frame_and_prefixes_clean():
    m = tiny(frames=6, clean_prefix_prob=0.5)
    t = m.noise_levels(4000, 6, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (t[:, 0] == 0).all() and ((t >= 0) & (t < 1)).all()
    clean = (t == 0).sum(1)  # leading clean frames (a later t is 0 with probability 0)
    share = (clean > 1).float().mean().item()
    assert abs(share - 0.5 * 4 / 5) < 0.04  # a prefix of 2..5 frames: 4 of the 5 prefix lengths 1..5
    assert ((t[:, 1:] > 0).float().mean() > 0.5).item()


def test_loss_is_the_error_of_the_noised_frames_only():
    m = tiny()
    ids, actions = clip()
    latents = F.embedding(ids, codebook())
    t = torch.tensor([[0.0, 0.0, 0.3, 0.9], [0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.manual_seed(3)
    out = m(latents, actions, noise_BT=t)
    x0 = latents * m.config.latent_scale
    err = (out.prediction * m.config.latent_scale - x0).pow(2).mean(dim=(2, 3))
    assert torch.allclose(out.loss, err[t > 0].mean())


def test_a_frame_reads_only_its_past():
    m = tiny()
    ids, actions = clip(B=1)
    latents = F.embedding(ids, codebook())
    t = torch.full((1, 4), 0.5, dtype=torch.float64)
    torch.manual_seed(0)
    base = m.denoise(latents, t, m.lead_actions(actions))
    changed = latents.clone()
    changed[0, 2] += 0.1
    out = m.denoise(changed, t, m.lead_actions(actions))
    assert torch.equal(out[:, :2], base[:, :2]) and not torch.allclose(out[:, 2:], base[:, 2:])
    other = m.denoise(latents, t, m.lead_actions((actions + 1) % A))
    assert not torch.allclose(other[:, 1], base[:, 1])  # the action leading to a frame conditions it


@pytest.mark.parametrize("context", [1, 3])
def test_cached_prediction_and_teacher_forcing_match_the_full_forward(context):
    m = tiny(frames=4)
    T = 6
    ids, actions = clip(T=T)
    book = codebook()
    latents = F.embedding(ids, book)
    s = DiffusionSampler(m, SamplerConfig(steps=1, temperature=0.0), codebook=book)
    s.reset(ids[:, :context], actions[:, : context - 1])
    for f in range(context, T):
        lo = max(0, f - 3)  # the window the full forward sees (4 frames)
        x = latents[:, lo : f + 1] * m.config.latent_scale
        x[:, -1] = 0.0  # the zero start at t = 1
        t = torch.zeros(2, f + 1 - lo, dtype=torch.float64)
        t[:, -1] = 1.0
        full = m.denoise(x, t, m.lead_actions(actions[:, lo:f]))[:, -1] / m.config.latent_scale
        if lo == 0:  # while the whole history fits the window, the cache equals the full forward
            torch.testing.assert_close(s.next_frame_prediction(actions[:, f - 1]), full, rtol=0, atol=1e-10)
        scores = s.next_frame_logits(actions[:, f - 1])
        assert scores.shape == (2, G * G, V)
        s.append(ids[:, f], actions[:, f - 1])  # true frames as ids, through the codebook


def test_sampling_is_seeded_and_one_step_at_temperature_0_is_the_prediction():
    m = tiny(dtype=torch.float32)
    ids, actions = clip(T=2)
    book = codebook(torch.float32)
    frames = []
    for _ in range(2):
        s = DiffusionSampler(m, SamplerConfig(steps=4, temperature=1.0), codebook=book)
        s.reset(ids[:, :1])
        frames.append(s.next_frame(actions[:, 0], torch.Generator().manual_seed(5)))
    assert torch.equal(frames[0], frames[1]) and frames[0].shape == (2, G * G, Z)
    s = DiffusionSampler(m, SamplerConfig(steps=1, temperature=0.0), codebook=book)
    s.reset(ids[:, :1])
    expected = s.next_frame_prediction(actions[:, 0])
    torch.testing.assert_close(s.next_frame(actions[:, 0]), expected)


def test_refusals_and_roundtrip(tmp_path):
    m = tiny(dtype=torch.float32)
    with pytest.raises(ValueError, match="compile"):
        DiffusionSampler(m, SamplerConfig(compile=True))
    s = DiffusionSampler(m)
    with pytest.raises(ValueError, match="codebook"):
        s.reset(clip()[0][:, :1])
    with pytest.raises(ValueError, match="action_conditioning"):
        DiffusionDynamicsConfig(action_conditioning="prepend")
    m.save_pretrained(tmp_path)
    back = DiffusionDynamicsModel.from_pretrained(tmp_path)
    assert back.config.kind == "diffusion"
    latents, actions = F.embedding(clip()[0], codebook(torch.float32)), clip()[1]
    t = torch.full((2, 4), 0.5)
    assert torch.equal(
        m.denoise(latents, t, m.lead_actions(actions)), back.denoise(latents, t, m.lead_actions(actions))
    )

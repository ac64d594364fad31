"""Tests of the latent action model: contract, causality, HF save/load, and collapse detection + recovery."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from data_prep.sprites import episode_rng, render_episode
from genie.models.hub import model_fields
from genie.models.lam import LAMConfig, LatentActionModel, LatentNorm

torch.set_num_threads(2)


def tiny_config(**kw) -> LAMConfig:
    base = dict(
        image_size=16,
        patch_size=4,
        num_frames=6,
        width=32,
        encoder_depth=2,
        decoder_depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        code_dim=8,
        num_actions=6,
        dead_code_threshold=5,
    )
    return LAMConfig(**(base | kw))


@pytest.fixture
def model() -> LatentActionModel:
    torch.manual_seed(0)
    m = LatentActionModel(tiny_config())
    m.train()
    m(random_frames(B=4, seed=9))  # initialise the latent normalisation from a batch, as training does
    return m.eval()


def random_frames(B=2, T=6, S=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, S, S, 3), dtype=torch.uint8, generator=g)


def sprite_clips(n: int, T: int = 6, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic controllable clips (a white square moved by 4 actions, one distractor): uint8 and actions."""
    frames, actions = [], []
    for i in range(n):
        f, a, _ = render_episode(episode_rng(seed, "train", i), T, size, 4, 1, step=4, sprite_size=4)
        frames.append(f)
        actions.append(a)
    return torch.from_numpy(np.stack(frames)), torch.from_numpy(np.stack(actions))


def test_shapes_and_pixel_conventions(model):
    frames = random_frames()
    out = model(frames)
    assert out.recon.shape == (2, 5, 16, 16, 3) and out.recon.dtype == torch.float32
    assert out.recon.min() >= 0 and out.recon.max() <= 1
    assert out.ids.shape == (2, 5) and out.ids.dtype == torch.long
    assert out.loss.ndim == 0 and torch.isclose(out.loss, out.recon_loss + out.vq_loss)
    assert 0 < out.usage <= 1 and out.perplexity >= 1
    ids = model.infer_actions(frames)
    assert torch.equal(ids, out.ids)
    assert torch.equal(model.infer_actions(frames.float() / 255), ids)  # uint8 and [0, 1] floats agree
    pred = model.predict_next(frames[:, :-1], ids)
    torch.testing.assert_close(pred, out.recon, atol=1e-6, rtol=0)
    assert model.num_actions == 6


def test_every_part_gets_gradient():
    torch.manual_seed(0)
    model = LatentActionModel(tiny_config()).train()
    model(random_frames()).loss.backward()
    for name in ("encoder_embed.conv.weight", "to_code.weight", "action_film.weight", "decoder_embed.conv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_straight_through_actions_are_the_ids_forward_and_reach_the_encoder_backward():
    """What a dynamics stage with lam_training=joint feeds its model: one-hots of the ids, with the gradient of a
    softmax over the codes' cosine similarities ."""
    torch.manual_seed(0)
    model = LatentActionModel(tiny_config()).train()
    out = model(random_frames(B=4))
    grads = []
    for temperature in (1.0, 0.1):
        model.zero_grad()
        weights = model.straight_through_actions(out, temperature)
        assert weights.shape == (4, 5, 6) and torch.equal(weights.detach(), F.one_hot(out.ids, 6).float())
        # a loss that prefers action 0 everywhere: only the straight-through path connects it to the model
        (-weights[..., 0].sum()).backward(retain_graph=True)
        grads.append(model.to_code.weight.grad.abs().sum().item())
        assert model.quantizer.codebook_VZ.grad.abs().sum() > 0
    assert grads[0] > 0 and grads[1] > 0


@pytest.mark.parametrize("kw", [dict(action_conditioning="add"), dict(patch_context=0, motion_input=False)])
def test_variants_run(kw):
    model = LatentActionModel(tiny_config(centre_frames=False, **kw))
    out = model(random_frames())
    out.loss.backward()
    assert out.ids.shape == (2, 5)


def test_config_validation():
    with pytest.raises(ValueError):
        tiny_config(image_size=18)  # not divisible by patch 4
    with pytest.raises(ValueError):
        tiny_config(width=36)  # 36 / 4 heads = 9, odd head dim
    with pytest.raises(ValueError):
        tiny_config(num_actions=1)
    with pytest.raises(ValueError):
        tiny_config(action_conditioning="concat")
    with pytest.raises(ValueError):
        tiny_config(patch_context=-1)


def test_encoder_is_causal(model):
    """The action of transition t -> t+1 depends on frames 1..t+1 only."""
    frames = random_frames()
    for t in range(1, 5):  # change frames t+1.. (0-based: frames after the transition t-1 -> t)
        changed = frames.clone()
        changed[:, t + 1 :] = random_frames(T=6 - t - 1, seed=t)
        z = model.encode_latents(model.patchify(frames.float() / 127.5 - 1))
        z2 = model.encode_latents(model.patchify(changed.float() / 127.5 - 1))
        torch.testing.assert_close(z[:, :t], z2[:, :t], atol=0, rtol=0)  # transitions into frames <= t
        assert not torch.allclose(z[:, t:], z2[:, t:])


def test_decoder_is_causal(model):
    """The prediction of frame t+1 depends on frames 1..t and action t only."""
    frames = random_frames(T=5)
    ids = torch.randint(0, 6, (2, 5), generator=torch.Generator().manual_seed(0))
    pred = model.predict_next(frames, ids)
    t = 2
    later_frames = frames.clone()
    later_frames[:, t + 1 :] = random_frames(T=5 - t - 1, seed=7)
    later_ids = ids.clone()
    later_ids[:, t + 1 :] = (ids[:, t + 1 :] + 1) % 6
    pred2 = model.predict_next(later_frames, later_ids)
    torch.testing.assert_close(pred[:, : t + 1], pred2[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(pred[:, t + 1 :], pred2[:, t + 1 :])
    # ... and the action it is given does matter
    other = ids.clone()
    other[:, t] = (ids[:, t] + 1) % 6
    pred3 = model.predict_next(frames, other)
    assert not torch.allclose(pred[:, t], pred3[:, t])
    torch.testing.assert_close(pred[:, :t], pred3[:, :t], atol=0, rtol=0)


def test_inference_is_per_clip(model):
    """In eval mode (inference) a clip's actions do not depend on the other clips of its batch."""
    a, b = random_frames(B=1, seed=1), random_frames(B=3, seed=2)
    alone = model.infer_actions(a)
    batched = model.infer_actions(torch.cat([a, b]))
    assert torch.equal(alone, batched[:1])
    both = torch.cat([a, b])[:, :-1]
    torch.testing.assert_close(model.predict_next(a[:, :-1], alone), model.predict_next(both, batched)[:1])


def test_latent_norm_removes_the_common_direction():
    """Latents sharing one direction (as an untrained encoder's do) come out spread over the sphere."""
    torch.manual_seed(0)
    z = torch.randn(1, 8) * 10 + 0.1 * torch.randn(64, 8)
    unit = torch.nn.functional.normalize(z, dim=-1)
    assert (unit @ unit.T).mean() > 0.95
    norm = LatentNorm(8).train()
    out = torch.nn.functional.normalize(norm(z), dim=-1)
    assert (out @ out.T).mean().abs() < 0.1
    assert torch.equal(norm(z[:1]), norm.eval()(z[:1]))  # a single latent uses the running statistics


def test_latent_norm_calibrates_exact_statistics_then_freezes():
    """Calibration measures the exact mean and (biased) variance of every latent it saw while training still uses
    batch statistics; frozen, training normalises as eval mode does, each latent on its own."""
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 8) * 3 + i for i in range(3)]  # (B, T-1, Z), each batch with its own mean
    norm = LatentNorm(8).train()
    norm(torch.randn(16, 8))  # batch phase: momentum running statistics
    assert norm.phase_name == "batch"
    norm.start_calibration()
    for z in batches:
        by_batch = torch.nn.functional.batch_norm(z.reshape(-1, 8), None, None, training=True).reshape(z.shape)
        torch.testing.assert_close(norm(z), by_batch)
    every = torch.cat([z.reshape(-1, 8) for z in batches])
    torch.testing.assert_close(norm.running_mean, every.mean(0))
    torch.testing.assert_close(norm.running_var, every.var(0, unbiased=False))
    assert int(norm.calibration_batches) == 3 and int(norm.calibration_latents) == 30
    norm.freeze()
    assert norm.phase_name == "frozen"
    frozen_mean = norm.running_mean.clone()
    z = torch.randn(4, 3, 8) + 5
    trained = norm(z)  # training mode, frozen: the fixed statistics, not this batch's
    assert torch.equal(norm.running_mean, frozen_mean)  # and nothing is updated
    torch.testing.assert_close(trained, norm.eval()(z), atol=0, rtol=0)
    torch.testing.assert_close(norm.as_in_training(z[:1]), norm(z[:1]), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="before any batch"):
        fresh = LatentNorm(8)
        fresh.start_calibration()
        fresh.freeze()


def test_frozen_statistics_make_training_and_eval_codes_equal(model):
    """``infer_actions(..., as_in_training=True)`` shows what training mode picks: before the freeze a clip's codes
    depend on its batch (here a lone clip: its own statistics), afterwards they are eval mode's."""
    frames = random_frames(B=1, seed=4)
    model.latent_norm.start_calibration()
    model.train()
    model(random_frames(B=4, seed=5))
    model.eval()
    eval_ids = model.infer_actions(frames)
    assert not torch.equal(model.infer_actions(frames, as_in_training=True), eval_ids)
    assert model.latent_norm.phase_name == "calibrating" and int(model.latent_norm.calibration_batches) == 1
    model.latent_norm.freeze()
    assert torch.equal(model.infer_actions(frames, as_in_training=True), eval_ids)
    assert int(model.latent_norm.calibration_batches) == 1  # inferring changed no statistics


def test_exports_without_the_phase_buffers_load_in_the_batch_phase(model, tmp_path):
    """Models exported (or checkpointed) before the latent normalisation had phases still load, strictly."""
    from safetensors.torch import load_file, save_file

    model.latent_norm.start_calibration()
    model.train()
    model(random_frames(B=4, seed=5))
    model.latent_norm.freeze()
    model.eval()
    model.save_pretrained(tmp_path)
    assert LatentActionModel.from_pretrained(tmp_path).latent_norm.phase_name == "frozen"
    old = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "calibration" not in k}
    del old["latent_norm.phase"]
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = LatentActionModel.from_pretrained(tmp_path)
    norm = loaded.latent_norm
    assert norm.phase_name == "batch" and int(norm.calibration_batches) == int(norm.calibration_latents) == 0
    torch.testing.assert_close(norm.running_mean, model.latent_norm.running_mean, atol=0, rtol=0)
    fresh = LatentActionModel(model.config)
    fresh.load_state_dict(old)  # a Lightning checkpoint's way in (strict)
    assert fresh.latent_norm.phase_name == "batch"


def _rank_batches(rank: int) -> list[torch.Tensor]:
    """The latents rank ``rank`` calibrates on: unequal sizes and distributions on the two ranks."""
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3 + rank, 4, generator=g) * (1 + rank) + step for step in range(2)]


def _calibrate_on_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        norm = LatentNorm(4).train()
        norm.start_calibration()
        for z in _rank_batches(rank):
            norm(z)
        torch.save(dict(norm.state_dict()), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_calibration_sums_over_ranks(tmp_path):
    """Under DDP every rank ends with the same statistics: the exact ones of all ranks' latents together."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_calibrate_on_rank, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    every = torch.cat([*_rank_batches(0), *_rank_batches(1)])
    for state in states:
        torch.testing.assert_close(state["running_mean"], every.mean(0))
        torch.testing.assert_close(state["running_var"], every.var(0, unbiased=False))
        assert int(state["calibration_latents"]) == every.shape[0] and int(state["calibration_batches"]) == 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_predict_next_rejects_out_of_range_actions(model):
    frames = random_frames(T=3)
    for bad in (-1, 6):
        ids = torch.zeros(2, 3, dtype=torch.long)
        ids[1, 2] = bad
        with pytest.raises(ValueError, match="action ids"):
            model.predict_next(frames, ids)
    model.predict_next(frames, torch.full((2, 3), 5))  # the largest valid id is fine
    with pytest.raises(ValueError, match="one action per frame"):
        model.predict_next(frames, torch.zeros(2, 2, dtype=torch.long))


def test_needs_two_frames(model):
    with pytest.raises(ValueError):
        model(random_frames(T=1))
    with pytest.raises(ValueError):
        model.infer_actions(random_frames(T=1))


def test_save_load_identical(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "genie_lam"
    for key, value in model_fields(model.config).items():
        assert saved[key] == value

    loaded = LatentActionModel.from_pretrained(tmp_path)
    assert not loaded.training
    for k, v in model.state_dict().items():  # includes the latent statistics and the quantizer's clock
        assert torch.equal(loaded.state_dict()[k], v), k
    frames = random_frames(seed=3)
    a, b = model(frames), loaded(frames)
    torch.testing.assert_close(a.recon, b.recon, atol=0, rtol=0)
    torch.testing.assert_close(a.ids, b.ids, atol=0, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
    ids = torch.randint(0, 6, (2, 6))
    torch.testing.assert_close(model.predict_next(frames, ids), loaded.predict_next(frames, ids), atol=0, rtol=0)

    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, LatentActionModel)
    torch.testing.assert_close(auto.infer_actions(frames), a.ids, atol=0, rtol=0)


def test_collapsed_codebook_is_detected_and_recovers():
    """Force every action code onto one vector: usage shows the collapse, dead-code restarts undo it."""
    torch.manual_seed(0)
    model = LatentActionModel(tiny_config(num_actions=8, dead_code_threshold=3))
    train, _ = sprite_clips(64, seed=0)
    held_out, _ = sprite_clips(16, seed=1)
    model.train()
    model(train[:16])  # latent statistics from real clips
    with torch.no_grad():
        model.quantizer.codebook_VZ.copy_(model.quantizer.codebook_VZ[:1].expand_as(model.quantizer.codebook_VZ))
    model.eval()
    collapsed = model(held_out)
    assert collapsed.usage.item() == pytest.approx(1 / 8)  # detected: one code for every transition
    assert model.infer_actions(held_out).unique().numel() == 1

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    usage = []
    for step in range(20):
        out = model(train[torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))])
        usage.append(out.usage.item())  # what the stage logs as train/usage
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    recovered = model(held_out)
    print(f"usage: collapsed {collapsed.usage.item():.3f}, training {usage}, held-out {recovered.usage.item():.3f}")
    assert usage[0] == pytest.approx(1 / 8)  # training reports the collapse too
    assert model.quantizer.num_restarts.item() >= 5  # dead codes were restarted ...
    assert sum(usage[-5:]) / 5 >= 0.5  # ... and stay in use (measured: 0.75-1.0)
    assert recovered.usage.item() > 1 / 8

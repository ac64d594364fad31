"""Tests of the vector quantizer: straight-through gradients, usage/perplexity, collapse recovery, DDP sync."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from genie.models.quantizer import VectorQuantizer

torch.set_num_threads(2)


def test_shapes_lookup_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=8).train()
    encoder = torch.nn.Linear(4, 8)
    z = encoder(torch.randn(3, 5, 4))
    out = vq(z)
    assert out.quantized.shape == (3, 5, 8) and out.ids.shape == (3, 5) and out.ids.dtype == torch.long
    # forward value is the unit-norm code; lookup agrees
    torch.testing.assert_close(out.quantized, vq.lookup(out.ids))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(vq.nearest(z), out.ids)

    # straight-through: d/dz of <quantized, g> equals d/dz of <normalize(z), g>
    g = torch.randn(3, 5, 8)
    (grad_st,) = torch.autograd.grad((out.quantized * g).sum(), z, retain_graph=True)
    (grad_ref,) = torch.autograd.grad((F.normalize(z, dim=-1) * g).sum(), z)
    torch.testing.assert_close(grad_st, grad_ref)

    # the loss trains both the encoder (commitment) and the codebook (codebook loss)
    encoder.zero_grad()
    out.loss.backward()
    assert encoder.weight.grad.abs().sum() > 0
    used = torch.unique(out.ids)
    assert vq.codebook_VZ.grad[used].abs().sum() > 0


def test_usage_and_perplexity():
    vq = VectorQuantizer(num_codes=32, code_dim=8, dead_code_threshold=0).eval()
    codes = vq.lookup(torch.arange(32))
    z = codes[torch.arange(8).repeat(10)]  # 8 codes, equally often
    out = vq(z * 3.0)  # scale is irrelevant: lookup is by cosine similarity
    assert out.ids.tolist() == torch.arange(8).repeat(10).tolist()
    assert out.usage.item() == pytest.approx(8 / 32)
    assert out.perplexity.item() == pytest.approx(8.0, rel=1e-4)
    assert vq(codes[torch.zeros(20, dtype=torch.long)]).perplexity.item() == pytest.approx(1.0)


def test_eval_has_no_side_effects():
    vq = VectorQuantizer(num_codes=8, code_dim=4, dead_code_threshold=1)
    vq.steps_since_used_V.fill_(5)  # all "dead"
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(50, 4))
    vq.nearest(torch.randn(50, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    assert "steps_since_used_V" in before  # persistent: saved with the model


def _collapsed_setup(num_codes=64, code_dim=8, threshold=3, seed=0):
    torch.manual_seed(seed)
    vq = VectorQuantizer(num_codes=num_codes, code_dim=code_dim, dead_code_threshold=threshold)
    with torch.no_grad():
        vq.codebook_VZ.copy_(vq.codebook_VZ[:1].expand(num_codes, -1))  # every code identical: full collapse
    encoder = torch.nn.Linear(16, code_dim)
    return vq, encoder


@pytest.mark.parametrize("restarts,deferred", [(True, False), (True, True), (False, False)])
def test_collapse_detected_and_recovered_by_restarts(restarts, deferred):
    """Also with restarts deferred to after the optimizer step (as under FSDP): the same recovery."""
    vq, encoder = _collapsed_setup(threshold=3 if restarts else 0)
    vq.defer_restarts = deferred
    opt = torch.optim.Adam(list(vq.parameters()) + list(encoder.parameters()), lr=1e-2)
    data = torch.randn(2048, 16)

    vq.train()
    first = vq(encoder(data[:256]))
    assert first.usage.item() == pytest.approx(1 / 64)  # collapse is visible in the reported usage...
    assert first.perplexity.item() == pytest.approx(1.0)  # ...and perplexity

    for _ in range(30):
        out = vq(encoder(data[torch.randint(2048, (256,))]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        vq.apply_pending_restarts()  # what the stage does after each step (a no-op unless deferred)
    vq.eval()
    final = vq(encoder(data))
    if restarts:
        assert vq.num_restarts.item() >= 63
        assert final.usage.item() > 0.9  # nearly every code in use again
        assert final.perplexity.item() > 32
    else:
        # control: without restarts, identical codes only peel off one by one (argmax ties go to the first)
        assert final.usage.item() < 0.3


def test_concentrated_encoder_outputs_recover():
    """Encoder outputs bunched in one direction use few random codes; restarts move codes onto the data."""
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=128, code_dim=16, dead_code_threshold=2).train()
    center = F.normalize(torch.randn(16), dim=0)
    data = center + 0.05 * torch.randn(4096, 16)
    before = vq(data)
    assert before.usage.item() < 0.1
    for _ in range(6):
        vq(data[torch.randint(4096, (1024,))])
    after = vq.eval()(data)
    assert after.usage.item() > 0.9 and after.perplexity.item() > 10 * before.perplexity.item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        vq, _ = _collapsed_setup(threshold=2, seed=0)  # same init on both ranks, as DDP guarantees
        vq.train()
        torch.manual_seed(100 + rank)  # but different data (and RNG) per rank
        for _ in range(5):
            vq(torch.randn(128, 8) + rank)
        state = torch.cat([vq.codebook_VZ.detach().flatten(), vq.steps_since_used_V.float()])
        gathered = [torch.zeros_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        results[rank] = (bool(torch.equal(gathered[0], gathered[1])), int(vq.num_restarts))
    finally:
        dist.destroy_process_group()


def test_restarts_consistent_across_ddp_ranks():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0][0] and results[1][0], "codebooks diverged across ranks"
    assert results[0][1] >= 63 and results[0][1] == results[1][1]


def test_deferred_restarts_wait_for_apply_merge_and_drop_non_finite_codes():
    vq, encoder = _collapsed_setup(threshold=1)
    vq.defer_restarts = True
    vq.train()
    x = encoder(torch.randn(256, 16))
    vq(x)  # step 1: every code but one unused once
    before = vq.codebook_VZ.detach().clone()
    vq(x)  # step 2: restarts found, held back
    assert torch.equal(vq.codebook_VZ, before)  # forward changed nothing
    idx, new = vq.pending_restarts
    assert len(idx) == len(new) == 63 and int(vq.num_restarts) == 63
    vq(x)  # a second forward before the step (gradient accumulation): nothing dead now, the pending stay
    assert len(vq.pending_restarts[0]) == 63
    assert vq.apply_pending_restarts() == 63 and vq.pending_restarts is None
    assert torch.equal(vq.codebook_VZ[idx], new)
    # restarts drawn from a non-finite batch (a step the guard skips) are dropped, not written
    vq.pending_restarts = (idx[:2], torch.full((2, vq.code_dim), float("nan")))
    after = vq.codebook_VZ.detach().clone()
    assert vq.apply_pending_restarts() == 0 and torch.equal(vq.codebook_VZ, after)


# ---- euclidean metric and k-means initialisation (the tokenizer's pixel codebook) ---------------------------------


def test_euclidean_metric_matches_raw_vectors_by_distance():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=6, metric="euclidean", dead_code_threshold=0).train()
    with torch.no_grad():
        vq.codebook_VZ.mul_(torch.linspace(0.1, 3.0, 16).unsqueeze(1))  # norms differ: they must count
    z = 2.0 * torch.randn(4, 9, 6, requires_grad=True)
    out = vq(z)
    expected = torch.cdist(z.detach().reshape(-1, 6), vq.codebook_VZ.detach()).argmin(-1).reshape(4, 9)
    assert torch.equal(out.ids, expected) and torch.equal(vq.nearest(z), expected)
    torch.testing.assert_close(out.quantized, vq.codebook_VZ.detach()[expected])  # raw codes, not normalised
    (grad,) = torch.autograd.grad(out.quantized.sum(), z, retain_graph=True)
    torch.testing.assert_close(grad, torch.ones_like(z))  # straight through, no normalisation in the way
    # cosine would ignore the norms: a scaled input picks another code under the euclidean metric
    assert not torch.equal(vq.nearest(10 * z), expected)
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(metric="manhattan")


def test_euclidean_restarts_keep_the_inputs_scale():
    vq = VectorQuantizer(num_codes=8, code_dim=4, metric="euclidean", dead_code_threshold=1).train()
    z = 5.0 + torch.randn(64, 4)  # far from the unit sphere
    vq(z)
    vq(z)  # every code but the used ones has been unused for a step: restarted from rows of z
    restarted = vq.steps_since_used_V == 0
    assert int(vq.num_restarts) > 0
    assert vq.codebook_VZ.detach()[restarted].norm(dim=-1).min() > 5  # not squashed onto the unit sphere


def _clusters(n_per: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [-4.0, -4.0, 0]])
    return centres, (centres.repeat_interleave(n_per, 0) + 0.1 * torch.randn(4 * n_per, 3, generator=g))


def test_kmeans_init_fits_the_first_training_batch_once():
    torch.manual_seed(0)
    centres, z = _clusters()
    vq = VectorQuantizer(num_codes=4, code_dim=3, metric="euclidean", kmeans_iters=10, dead_code_threshold=0)
    vq.eval()
    vq(z)  # evaluation never initialises
    assert not bool(vq.kmeans_done)
    vq.train()
    vq(z)
    assert bool(vq.kmeans_done)
    # each centre has a code within the clusters' noise (a random codebook is ~4 away)
    assert torch.cdist(centres, vq.codebook_VZ.detach()).min(dim=1).values.max() < 0.1
    # done once: later batches (and a model restored from its state dict) leave the codebook to training
    trained = vq.codebook_VZ.detach().clone()
    vq(z + 100)
    assert torch.equal(vq.codebook_VZ.detach(), trained)
    restored = VectorQuantizer(num_codes=4, code_dim=3, metric="euclidean", kmeans_iters=10, dead_code_threshold=0)
    restored.load_state_dict(vq.state_dict())
    restored.train()(z + 100)
    assert torch.equal(restored.codebook_VZ.detach(), trained)
    assert "kmeans_done" not in VectorQuantizer(num_codes=4, code_dim=3).state_dict()  # older checkpoints load


def test_kmeans_init_waits_for_the_step_when_restarts_are_deferred():
    _, z = _clusters()
    vq = VectorQuantizer(num_codes=4, code_dim=3, metric="euclidean", kmeans_iters=10, dead_code_threshold=0).train()
    vq.defer_restarts = True  # FSDP: the codebook inside forward is a temporary view
    before = vq.codebook_VZ.detach().clone()
    vq(z)
    assert torch.equal(vq.codebook_VZ.detach(), before) and bool(vq.kmeans_done)
    assert vq.apply_pending_restarts() == 4
    assert torch.cdist(vq.codebook_VZ.detach(), z).min(dim=1).values.max() < 0.5

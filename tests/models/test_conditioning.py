"""Actions as weights instead of ids (what a LAM trained through the dynamics loss gives): every dynamics kind
reads a one-hot exactly as its id, and the loss's gradient reaches the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genie.models.conditioning import lead_with_no_action
from genie.models.kinds import build_dynamics, dynamics_config

A, V, G = 5, 32, 3  # actions, codes, token grid side


@pytest.mark.parametrize(
    "kind,conditioning",
    [("maskgit", "film"), ("maskgit", "prepend"), ("maskgit", "add"), ("causal", "film"), ("diffusion", "film")],
)
def test_one_hot_weights_act_as_their_ids_and_pass_gradient(kind: str, conditioning: str):
    fields = dict(kind=kind, num_codes=V, grid_size=G, num_actions=A, num_frames=4, width=32, depth=1, num_heads=2)
    fields |= dict(action_conditioning=conditioning) | (dict(code_dim=8) if kind == "diffusion" else {})
    torch.manual_seed(0)
    net = build_dynamics(dynamics_config(fields)).eval()
    ids = torch.randint(0, A, (3, 3))
    inputs = torch.randint(0, V, (3, 4, G, G))
    if kind == "diffusion":
        inputs = F.normalize(torch.randn(3, 4, G * G, 8), dim=-1)
        torch.nn.init.normal_(net.latent_out.weight, std=0.02)  # zero at initialisation: no gradient to anything
    weights = F.one_hot(ids, A).float().requires_grad_()
    torch.manual_seed(1)  # the same random masks / noise for both calls
    by_id = net(inputs, ids)
    torch.manual_seed(1)
    by_weight = net(inputs, weights)
    torch.testing.assert_close(by_weight.loss, by_id.loss)
    by_weight.loss.backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    # a wrong number of actions or a stray dimension is refused, as for ids
    with pytest.raises(ValueError, match="weights"):
        net(inputs, weights.detach()[:, :2])
    with pytest.raises(ValueError, match="weights"):
        net(inputs, ids[..., None])


def test_the_first_frame_leads_with_no_action_for_ids_and_weights():
    ids = torch.tensor([[2, 0, 4]])
    assert lead_with_no_action(ids, A).tolist() == [[A, 2, 0, 4]]
    lead = lead_with_no_action(F.one_hot(ids, A).float(), A)  # (1, 4, A + 1)
    assert lead.argmax(-1).tolist() == [[A, 2, 0, 4]] and lead.sum(-1).eq(1).all()

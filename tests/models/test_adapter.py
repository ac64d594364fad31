"""Action adapter: learns a robot-action -> latent-action map; saves, loads and checks its input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genie.models.adapter import ActionAdapter, AdapterConfig


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-D commands in odd units whose latent action is the direction of the first two numbers (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 4, generator=g) * torch.tensor([0.02, 0.02, 5.0, 1.0]) + torch.tensor([0, 0, 3.0, 0])
    angle = torch.atan2(u[:, 1], u[:, 0])
    ids = ((angle + torch.pi / 4) % (2 * torch.pi) // (torch.pi / 2)).long()
    return u, ids


def test_adapter_learns_the_map_from_commands_to_latent_actions():
    torch.manual_seed(0)
    adapter = ActionAdapter(AdapterConfig(action_dim=4, num_actions=4, hidden=64))
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    u, ids = synthetic(4096, seed=0)
    adapter.train()
    for _ in range(300):
        i = torch.randint(0, len(u), (128,))
        loss = adapter(u[i], ids[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.eval()
    u_test, ids_test = synthetic(1000, seed=1)
    accuracy = (adapter.latent_action(u_test) == ids_test).float().mean().item()
    majority = torch.bincount(ids_test).max().item() / len(ids_test)
    assert accuracy > 0.9 and accuracy > majority + 0.5, (accuracy, majority)


def test_adapter_round_trip_and_bad_input(tmp_path: Path):
    adapter = ActionAdapter(AdapterConfig(action_dim=3, num_actions=5)).eval()
    u = torch.randn(2, 7, 3)
    assert adapter(u).logits.shape == (2, 7, 5) and adapter.latent_action(u).shape == (2, 7)
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = ActionAdapter.from_pretrained(tmp_path / "adapter")
    assert torch.equal(loaded.latent_action(u), adapter.latent_action(u))
    with pytest.raises(ValueError, match="dimension 3"):
        adapter(torch.randn(4, 2))

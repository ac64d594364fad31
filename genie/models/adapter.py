"""Action adapter: a robot's real action vector -> the world's latent action.

Dimension keys: B batch, T frames, U action_dim (the robot's continuous action), A latent actions.

A world is driven by A discrete latent actions the LAM discovered without labels. A robot is driven by
continuous commands (Meta-World: end-effector dx, dy, dz and the gripper). The adapter learns the map
between them from clips that carry both: for every transition it sees the real action ``u_t`` and is
trained (cross entropy) to predict the latent action the LAM infers from the frames ``x_t -> x_{t+1}``.
Then ``World.step(robot_action=u)`` steps the world with ``argmax adapter(u)``.

Why an MLP on the action alone: the latent action is, by construction, "what changed"; for a robot that
is mostly a function of its command. It is deliberately small (two hidden layers): the target is a
handful of classes, and the data is a little robot video. The input is standardised with statistics
gathered while training (a BatchNorm without affine parameters), so commands in any units work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig

from genie.models.hub import GeniePreTrainedModel, register_auto


@final
@strict
class AdapterConfig(PreTrainedConfig):
    """Action adapter hyper-parameters; exactly the model fields of ``config.json``."""

    model_type = "genie_action_adapter"

    action_dim: int = 4  # U: length of the robot's action vector
    num_actions: int = 8  # A: the world's latent actions (the LAM's num_actions)
    hidden: int = 128  # width of the two hidden layers
    dropout: float = 0.1  # dropout after each hidden layer (the data is small)

    def __post_init__(self, **kwargs):
        if self.action_dim < 1 or self.num_actions < 2 or self.hidden < 1:
            raise ValueError("action_dim >= 1, num_actions >= 2 and hidden >= 1 are required")
        super().__post_init__(**kwargs)


@dataclass
class AdapterOutput:
    logits: Tensor  # (..., A)
    loss: Tensor | None = None  # cross entropy against the LAM's latent actions
    accuracy: Tensor | None = None


class ActionAdapter(GeniePreTrainedModel):
    """Real action vector (..., U) -> latent action logits (..., A). See the module docstring."""

    config_class = AdapterConfig
    main_input_name = "actions"

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        U, H, A = config.action_dim, config.hidden, config.num_actions
        self.standardise = nn.BatchNorm1d(U, affine=False)  # running mean / std of the robot's commands
        self.mlp = nn.Sequential(
            nn.Linear(U, H), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(H, H), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(H, A),
        )  # fmt: skip
        self.post_init()

    def forward(self, actions: Tensor, latent_actions: Tensor | None = None) -> AdapterOutput:
        """Args:
        actions: real actions float (..., U).
        latent_actions: optional targets, the LAM's ids (...) long; gives ``loss`` and ``accuracy``.
        """
        U = self.config.action_dim
        if actions.shape[-1] != U:
            raise ValueError(f"the adapter takes actions of dimension {U}, got shape {tuple(actions.shape)}")
        flat_MU = actions.reshape(-1, U).float()
        logits_MA = self.mlp(self.standardise(flat_MU))
        logits = logits_MA.reshape(*actions.shape[:-1], -1)
        if latent_actions is None:
            return AdapterOutput(logits)
        target_M = latent_actions.reshape(-1).long()
        loss = F.cross_entropy(logits_MA, target_M)
        accuracy = (logits_MA.argmax(-1) == target_M).float().mean().detach()
        return AdapterOutput(logits, loss, accuracy)

    @torch.no_grad()
    def latent_action(self, actions: Tensor) -> Tensor:
        """The most likely latent action of real actions float (..., U) -> long (...)."""
        return self.forward(actions).logits.argmax(-1)


register_auto(AdapterConfig, ActionAdapter)

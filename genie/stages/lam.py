"""LAM stage: learn latent actions that explain each frame transition.

Dimension keys: B batch, T frames, A latent actions, K true actions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genie.eval.metrics import contingency, nmi_from_contingency
from genie.models.hub import model_fields
from genie.models.lam import LAMConfig, LatentActionModel
from genie.stages.base import OptimConfig
from genie.stages.vq import VQStage, all_reduce_

# true discrete actions are tallied against latent ones up to this many distinct values
MAX_TRUE_ACTIONS = 64


class LAMStage(VQStage):
    """LightningModule training a :class:`~genie.models.lam.LatentActionModel`.

    When validation clips carry discrete true actions (``actions.npy``), the normalized mutual
    information between latent and true actions is logged as ``val/nmi``.

    Args:
        model: the LAM's config (the exported ``config.json``).
        optim: optimizer and schedule.
        media_every_n_val: log a next-frame prediction video every n validation runs (0: never).
    """

    config_class = LAMConfig

    def __init__(
        self,
        model: LAMConfig | None = None,
        optim: OptimConfig | None = None,
        media_every_n_val: int = 1,
    ):
        super().__init__(optim)
        cfg = model if isinstance(model, LAMConfig) else LAMConfig(**(model or {}))
        self.net = LatentActionModel(cfg)
        self.media_every_n_val = media_every_n_val
        self.save_plain_hparams(model=model_fields(cfg), media_every_n_val=media_every_n_val)

    @property
    def num_codes(self) -> int:
        return self.net.config.num_actions

    def expected_resolution(self) -> int:
        return self.net.config.image_size

    def expected_frames(self) -> int:
        return self.net.config.num_frames

    def forward_batch(self, batch: dict[str, Any]) -> tuple[Any, Tensor]:
        frames_BTHWC = batch["frames"]
        return self.net(frames_BTHWC), frames_BTHWC[:, 1:]  # the LAM predicts frames 2..T

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._table_AK = torch.zeros(self.num_codes, MAX_TRUE_ACTIONS, dtype=torch.long, device=self.device)

    def on_val_batch(self, batch: dict[str, Any], out: Any) -> None:
        true = batch.get("actions")
        if true is None or true.dtype != torch.long or true.ndim != 2:
            return  # continuous or missing true actions: no NMI
        keep = (true >= 0) & (true < MAX_TRUE_ACTIONS)
        self._table_AK += contingency(out.ids[keep], true[keep], self.num_codes, MAX_TRUE_ACTIONS)

    def on_val_end(self) -> None:
        table = all_reduce_(self._table_AK)
        if table.sum() > 0:
            self.log("val/nmi", nmi_from_contingency(table), prog_bar=True)

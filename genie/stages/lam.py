"""LAM stage: learn latent actions that explain each frame transition.

The stage also moves the LAM's latent normalisation through its phases (:class:`~genie.models.lam.LatentNorm`):
batch statistics until ``1 - norm_freeze_fraction`` of training, then ``norm_calibration_batches`` training batches
that measure the statistics exactly, then fixed statistics to the end, so that the decoder's last steps learn the
very codes that eval mode (``infer_actions``: ``prep tokenize``, the dynamics stage, ``World``) gives. Training's
progress is its step over ``trainer.max_steps``, or, with a time budget (``optim.budget_seconds``), the seconds spent
over the budget, whichever is further; under a time budget rank 0 decides, so all ranks switch at the same step.

Dimension keys: B batch, T frames, A latent actions, K true actions.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from genie.eval.metrics import contingency, nmi_from_contingency
from genie.models.hub import model_fields
from genie.models.lam import NORM_BATCH, NORM_FROZEN, LAMConfig, LatentActionModel
from genie.stages.base import OptimConfig, TimeSchedule
from genie.stages.vq import VQStage, all_reduce_

log = logging.getLogger(__name__)

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

    # -- the latent normalisation's phases ------------------------------------------------------

    def training_progress(self) -> float:
        """How far training is, in [0, 1]: step / ``max_steps``, or time spent / time budget if further."""
        trainer = self.trainer
        progress = trainer.global_step / trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0.0
        if self.optim.budget_seconds:
            schedulers = self.lr_schedulers()
            schedule = getattr(schedulers, "lr_lambdas", [None])[0]
            if isinstance(schedule, TimeSchedule):
                progress = max(progress, schedule.elapsed / schedule.budget_seconds)
        return progress

    def update_latent_norm(self) -> None:
        """Start calibrating the latent statistics when training reaches its final part; freeze them once measured."""
        cfg, norm = self.net.config, self.net.latent_norm
        if cfg.norm_freeze_fraction <= 0:
            return
        phase = int(norm.phase)
        if phase == NORM_BATCH:
            start = self.training_progress() >= 1 - cfg.norm_freeze_fraction
            if self.optim.budget_seconds and self.trainer.world_size > 1:
                start = self.trainer.strategy.broadcast(start, src=0)  # wall clocks differ between ranks
            if start:
                norm.start_calibration()
        elif norm.freeze_when_calibrated(cfg.norm_calibration_batches) and self.trainer.is_global_zero:
            log.info(
                "LAM latent statistics fixed at step %d (from %d latents of %d batches)",
                self.trainer.global_step,
                int(norm.calibration_latents),
                int(norm.calibration_batches),
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.update_latent_norm()

    def on_train_end(self) -> None:
        # stopped while calibrating (a time budget can end sooner than planned): keep what was measured, so that the
        # exported model's training and eval modes agree; the decoder then had no steps on exactly these codes
        norm, fraction = self.net.latent_norm, self.net.config.norm_freeze_fraction
        norm.freeze_what_was_calibrated()
        if fraction > 0 and int(norm.phase) != NORM_FROZEN and self.trainer.is_global_zero:
            log.info(
                "LAM training ended before its final %.0f%%: its latent statistics are still momentum averages, so "
                "eval-mode codes may differ from training's (genie eval lam reports train_eval_agreement)",
                100 * fraction,
            )
        super().on_train_end()

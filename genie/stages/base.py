"""What every training stage shares: optimizer and schedule, data checks, logging, export.

A stage is a :class:`StageModule` subclass that owns one HF-layout model (``self.net``) and
implements ``training_step`` / ``validation_step`` over the loader's batches. Everything else
(AdamW with warmup + cosine decay, skipped-sample accounting, checkpoints that load with
``weights_only=True``, export to ``config.json`` + ``model.safetensors``) lives here once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from genie.data.loader import total_skipped
from genie.models.hub import GeniePreTrainedModel, model_fields


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of a stage."""

    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 0.05
    """AdamW weight decay, applied to weight matrices only (not norms, biases, embeddings, codebooks)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr`` over this many steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio`` at ``trainer.max_steps``."""
    fused: bool | None = None
    """Fused AdamW kernel; None: on when training on CUDA."""


def as_config(value: Any, cls: type) -> Any:
    """Accept a config object or a plain dict of its fields (as stored in checkpoints)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def plain(config: Any) -> Any:
    """A config as plain data (a checkpoint must load with ``torch.load(weights_only=True)``)."""
    if not dataclasses.is_dataclass(config):
        return config
    if hasattr(config, "to_diff_dict") and dataclasses.is_dataclass(config):
        return model_fields(config)
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StageModule(L.LightningModule):
    """Base LightningModule of every stage.

    Subclasses build ``self.net`` (a :class:`GeniePreTrainedModel`) in ``__init__`` after calling
    ``super().__init__(optim)`` and store their hyper-parameters with :meth:`save_plain_hparams`.
    """

    net: GeniePreTrainedModel
    config_class: type  # the model's config class (its fields are the stage's `model` argument)

    def __init__(self, optim: OptimConfig | dict | None = None):
        super().__init__()
        self.optim = as_config(optim or OptimConfig(), OptimConfig)
        self._skipped_seen: dict[int, int] = {}

    # -- hyper-parameters and data ------------------------------------------------------------

    def save_plain_hparams(self, **configs: Any) -> None:
        """Record configs as plain dicts, so ``load_from_checkpoint`` works and nothing is pickled."""
        stage = f"{type(self).__module__}.{type(self).__qualname__}"
        self.save_hyperparameters(
            {"stage": stage, **{k: plain(v) for k, v in {**configs, "optim": self.optim}.items()}}
        )

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of one batch, without logging (benchmarks, custom loops)."""
        raise NotImplementedError

    def expected_resolution(self) -> int | None:
        """Square frame size the model needs; the data is checked against it before training."""
        return None

    def expected_frames(self) -> int | None:
        """Frames per training window the model needs (its temporal positions); None: any."""
        return None

    def log_data_stats(self, batch: dict[str, Any]) -> None:
        """Log how many bad samples the loader has skipped so far (all workers)."""
        if "worker" in batch:
            skipped = total_skipped(self._skipped_seen, batch)
            self.log("data/skipped", float(skipped), on_step=True, on_epoch=False)

    def on_train_start(self) -> None:
        # Lightning keeps each submodule's train/eval mode as it finds it, and models come out of
        # from_pretrained (or an evaluation) in eval mode: without this, training-only behaviour such as
        # dead-code restarts and dropout would silently stay off.
        self.net.train()

    # -- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # matrices get weight decay; norms, biases, embeddings and codebooks do not
            is_matrix = p.ndim >= 2 and "embed" not in name and "codebook" not in name
            (decay if is_matrix else no_decay).append(p)
        fused = self.optim.fused
        if fused is None:
            fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            fused=fused,
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 0
        if total <= 0:
            raise ValueError("set trainer.max_steps: stages train by steps over endless shard streams")
        warm, min_ratio = self.optim.warmup_steps, self.optim.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warm, total, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning refuses to clip for optimizers that unscale internally (fused AdamW) under any mixed
        # precision, but bf16 and fp32 have no gradient scaler: the gradients are already true, so clip them
        # directly (found on an H200: `genie fit` with the fused default stopped at the first step).
        if not gradient_clip_val:
            return
        if str(self.trainer.precision).startswith("16"):  # fp16 has a scaler: let Lightning unscale first
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)

    # -- export -------------------------------------------------------------------------------

    def export(self, path: str | Path) -> Path:
        """Write the trained model in the Hugging Face layout (``config.json`` + ``model.safetensors``)."""
        path = Path(path)
        net = self.net
        was_training = net.training
        net.eval()
        net.save_pretrained(path)
        net.train(was_training)
        return path

    @staticmethod
    def count_parameters(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())


def load_stage_checkpoint(path: str | Path, map_location: str = "cpu") -> StageModule:
    """Rebuild a stage from a Lightning checkpoint of ours, without unpickling anything.

    The checkpoint must have been written by a :class:`StageModule` (its hyper-parameters name the
    stage class and hold its configs as plain data).
    """
    import importlib

    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hp = dict(ckpt.get("hyper_parameters") or {})
    stage = hp.pop("stage", None)
    if not stage:
        raise ValueError(f"{path} is not a genie stage checkpoint (no 'stage' in its hyper-parameters)")
    module_name, _, cls_name = stage.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    module = cls(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module

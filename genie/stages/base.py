"""What every training stage shares: optimizer and schedule, data checks, logging, export.

A stage is a :class:`StageModule` subclass that owns one HF-layout model (``self.net``) and
implements ``training_step`` / ``validation_step`` over the loader's batches. Everything else
(AdamW with warmup + cosine decay, gradient clipping that also works under FSDP, the non-finite
loss guard, skipped-sample accounting, checkpoints that load with ``weights_only=True``, export to
``config.json`` + ``model.safetensors``) lives here once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from genie.data.loader import source_shares, total_skipped
from genie.models.blocks import STBlock, STTransformer
from genie.models.hub import DamagedFileError, GeniePreTrainedModel, first_line, model_fields
from genie.models.quantizer import VectorQuantizer
from genie.runtime import flush_denormals

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["skip", "stop"]

# what FSDP (and its activation checkpointing) put into parameter names; stripped to get the model's own names
_WRAPPER_PREFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")

# the layers whose weights get weight decay (subclasses included: genie's own oneDNN Linear is an nn.Linear)
_DECAYED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of a stage."""

    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 0.05
    """AdamW weight decay, applied to the weights of linear and convolution layers only (not to norms, biases,
    embedding tables, positions, codebooks or other parameters of their own)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr`` over this many steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio`` at ``trainer.max_steps``."""
    fused: bool | None = None
    """Fused AdamW kernel; None: on when training on CUDA or the CPU."""
    budget_seconds: float | None = None
    """Decay by wall clock instead of steps: the cosine reaches its end after this many seconds of training
    (``genie speedrun`` sets it with ``trainer.max_time``, so a stage stops by time with its schedule done)."""


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient and the non-finite policy says stop (reported as one line)."""


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


def cosine_ratio(progress: float, min_ratio: float) -> float:
    """Cosine decay from 1 at ``progress`` 0 to ``min_ratio`` at 1 (and after)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if total <= warmup:
        return 1.0
    return cosine_ratio((step - warmup) / max(1, total - warmup), min_ratio)


class TimeSchedule:
    """LR multiplier with linear warmup over steps, then cosine decay over wall-clock seconds of training.

    The clock starts at the first call (LambdaLR makes it when built) and counts the seconds between calls into
    ``elapsed``. ``LambdaLR.state_dict`` saves this object's ``__dict__``, so ``elapsed`` travels with a checkpoint
    and a resumed run goes on from the budget already spent. The timestamp of the last call is a slot, outside
    ``__dict__``: a ``time.monotonic()`` reading means nothing in another process, and leaving it out of the saved
    state also keeps the time between the two processes out of the budget. Picklable (a plain object, no lambda).
    """

    # "_last" is a slot so that it never reaches LambdaLR's state dict (which copies __dict__ only)
    __slots__ = ("__dict__", "_last")

    def __init__(self, warmup_steps: int, budget_seconds: float, min_ratio: float):
        self.warmup_steps, self.budget_seconds, self.min_ratio = warmup_steps, budget_seconds, min_ratio
        self.elapsed = 0.0  # seconds of training counted so far (persisted)
        self._last: float | None = None  # monotonic time of the last call, in this process only

    def __call__(self, step: int) -> float:
        now = time.monotonic()
        if self._last is not None:
            self.elapsed += max(0.0, now - self._last)
        self._last = now
        if step < self.warmup_steps:
            return (step + 1) / max(1, self.warmup_steps)
        return cosine_ratio(self.elapsed / self.budget_seconds, self.min_ratio)

    def __getstate__(self) -> dict[str, Any]:
        # a pickled copy is another process too: the clock restarts there, the elapsed seconds stay
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last = None


class StageModule(L.LightningModule):
    """Base LightningModule of every stage.

    Subclasses build ``self.net`` (a :class:`GeniePreTrainedModel`) in ``__init__`` after calling
    ``super().__init__(optim)`` and store their hyper-parameters with :meth:`save_plain_hparams`.

    Non-finite steps: before every optimizer step the loss (all ranks) and the gradient norm are checked.
    A non-finite one is never applied: with ``nonfinite="skip"`` the gradients are dropped (no weight update,
    no optimizer state change; the LR schedule and ``global_step`` still advance, the batch counts as seen),
    the skip is counted and logged as ``train/nonfinite_skipped``, and more than ``max_nonfinite_skips`` in
    a row stop the run; with ``"stop"`` the first one stops it. Stopping raises :class:`NonFiniteError`.
    ``genie fit`` sets both from ``--nonfinite`` / ``--max_nonfinite_skips``.
    """

    net: GeniePreTrainedModel
    config_class: type  # the model's config class (its fields are the stage's `model` argument)
    nonfinite: NonFinitePolicy = "skip"
    max_nonfinite_skips: int = 10  # consecutive skips tolerated before the run stops

    def __init__(self, optim: OptimConfig | dict | None = None):
        super().__init__()
        self.optim = as_config(optim or OptimConfig(), OptimConfig)
        self._skipped_seen: dict[int, int] = {}
        self._sources_seen: dict[int, list[int]] = {}  # worker -> clips per mixture source so far
        self.nonfinite_skipped = 0  # steps skipped so far (kept in checkpoints)
        self.nonfinite_steps: list[int] = []  # the first few of them, for the end-of-run report
        self._nonfinite_in_a_row = 0
        self._loss_nonfinite: Tensor | None = None  # set by each backward, consumed by the step's check
        self.last_grad_norm: Tensor | None = None  # global, before clipping (logged as train/grad_norm)
        self._param_decay: dict[str, bool] = {}  # clean parameter name -> weight decay or not (found in setup)
        self._quantizers: list[VectorQuantizer] = []  # the stage's quantizers, found at fit start

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
        """Log how many bad samples the loader has skipped so far (all workers), and a mixture's share per source."""
        if "worker" in batch:
            skipped = total_skipped(self._skipped_seen, batch)
            self.log("data/skipped", float(skipped), on_step=True, on_epoch=False)
        if "source_counts" in batch:  # host-side counts (no device sync); source k = data.train_shards' k-th key
            for k, share in enumerate(source_shares(self._sources_seen, batch)):
                self.log(f"data/source{k}_share", share, on_step=True, on_epoch=False)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ST block's activations in backward instead of storing them (all of the stage's stacks).

        Trades about a third more compute for activation memory that no longer grows with depth. Under FSDP
        use the strategy's ``activation_checkpointing_policy`` instead (the large configs do), not both.
        """
        for module in self.modules():
            if isinstance(module, STTransformer):
                module.gradient_checkpointing = enabled

    def compile_blocks(self, backend: str = "inductor") -> int:
        """``torch.compile`` every ST block of the stage (``genie fit --compile true``).

        Blocks rather than the whole model: the quantizer's dead-code restarts are data-dependent host logic
        that would split a whole-model graph anyway, and identical blocks share one compiled graph (dynamo
        inlines the module, so parameters are graph inputs). While compiling, the CPU norm/rotation fast paths of
        ``genie/models/cpu_ops.py`` step aside (inductor fuses those ops itself) and the oneDNN linear stays, as
        the opaque op ``genie::onednn_mm``. Returns the number of blocks compiled.
        """
        blocks = [m for m in self.modules() if isinstance(m, STBlock)]
        for block in blocks:
            block.compile(backend=backend)
        return len(blocks)

    def setup(self, stage: str) -> None:
        # Which parameters get weight decay, decided on the model as built: FSDP later wraps the modules (and
        # turns every parameter into a flat 1-D view of its shard), so configure_optimizers looks it up by name.
        self._param_decay = param_decay(self)

    def on_fit_start(self) -> None:
        flush_denormals()  # subnormal floats are 10-100x slower on CPUs, and real frames produce them
        # under FSDP the codebook is a view of a gathered, temporary parameter inside forward: dead-code restarts
        # wait until after the optimizer step (on_train_batch_end writes them into every shard)
        self._quantizers = [m for m in self.modules() if isinstance(m, VectorQuantizer)]
        if isinstance(self.trainer.strategy, FSDPStrategy):
            for quantizer in self._quantizers:
                quantizer.defer_restarts = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step: write deferred dead-code restarts (FSDP) into the codebook, on every rank."""
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return  # still accumulating: no step has been taken
        quantizers = [q for q in self._quantizers if q.pending_restarts is not None]
        if not quantizers:  # the same on every rank: pending restarts follow the all-reduced usage counts
            return
        full_params = nullcontext()  # under FSDP: write the rows into every rank's shard
        if isinstance(self.trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            full_params = FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=True)
        with full_params:
            for quantizer in quantizers:
                quantizer.apply_pending_restarts()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this step's random draws (MaskGIT masks, dropout, restarts' noise) from (seed, rank, step).

        Each rank draws its own masks (one seed on every rank would repeat the same mask pattern on every GPU,
        dividing the masks seen per step by the number of GPUs), every run is reproducible from its seed, and a
        resumed run draws exactly what the uninterrupted run draws from its checkpoint on, without saving any
        generator state. Weights stay identical across ranks: DDP averages gradients, and dead-code restarts
        are broadcast from rank 0.
        """
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        torch.manual_seed(step_seed(self.trainer.global_step, micro, self.global_rank))

    def on_train_start(self) -> None:
        # Lightning keeps each submodule's train/eval mode as it finds it, and models come out of
        # from_pretrained (or an evaluation) in eval mode: without this, training-only behaviour such as
        # dead-code restarts and dropout would silently stay off.
        self.net.train()

    # -- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        decays = self._param_decay or param_decay(self)  # setup not run (a direct call): the modules as they are
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if decays.get(_clean_name(name), False) else no_decay).append(p)
        fused = self.optim.fused
        if fused is None:  # the fused kernel: CPU 1.8 vs 6.7 ms per step for a 2.2M-parameter model (for-loop)
            fused = self.device.type in ("cuda", "cpu")
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
        if self.optim.budget_seconds:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, TimeSchedule(warm, self.optim.budget_seconds, min_ratio))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warm, total, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_backward(self, loss: Tensor) -> None:
        # remembered, not checked: the check waits for the gradients so that one host sync covers both
        bad = ~torch.isfinite(loss.detach())
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Clip the gradients and drop them if the loss or their norm is not finite (see the class docstring).

        Lightning calls this after backward and right before ``optimizer.step()``, whatever the precision,
        so it is the one place to clip and to veto a step. Three ways to the global gradient norm:

        - FSDP: each rank holds a shard of the gradients, so ``torch.nn.utils.clip_grad_norm_`` would clip each
          shard by its own norm (and Lightning's FSDP precision plugin refuses norm clipping outright); the root
          module's ``FSDP.clip_grad_norm_`` all-reduces the shards' norms first;
        - fp16 mixed precision has a gradient scaler: Lightning has already unscaled the gradients and clips
          them; overflowing gradients are then the scaler's business (it skips the step and lowers the scale,
          which is routine, not divergence), so only the loss is checked;
        - otherwise (fp32, bf16) the gradients are true and are clipped here directly: Lightning refuses to
          clip for optimizers that unscale internally (fused AdamW) under any mixed precision, but bf16 has no
          scaler (found on an H200: `genie fit` with the fused default stopped at the first step).
        """
        by_norm = gradient_clip_algorithm in (None, "norm")
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm: Tensor | None = None
        fsdp_root = self.trainer.strategy.model if isinstance(self.trainer.strategy, FSDPStrategy) else None
        if fsdp_root is not None:
            # max_norm=inf only measures (the clip coefficient is then 1): value clipping still needs the norm
            grad_norm = fsdp_root.clip_grad_norm_(gradient_clip_val if gradient_clip_val and by_norm else math.inf)
            if gradient_clip_val and not by_norm:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)  # element-wise: shards are fine
            if str(self.trainer.precision).startswith("16"):
                grad_norm = None
        elif str(self.trainer.precision).startswith("16"):  # fp16 has a scaler: let Lightning clip
            if gradient_clip_val:
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_val and by_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if gradient_clip_val:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        self.check_finite_step(optimizer, grad_norm)

    def check_finite_step(self, optimizer: torch.optim.Optimizer, grad_norm: Tensor | None) -> bool:
        """Veto the coming optimizer step if this step's loss (on any rank) or gradient norm is not finite.

        All ranks reach the same verdict (the flag is summed over ranks; under DDP the gradients are already
        identical, under FSDP ``grad_norm`` is already global), so they all skip or all step together and the
        replicas never diverge. Costs one host sync per step, plus one tiny all-reduce when distributed.

        Returns:
            True if the step goes ahead.
        """
        if grad_norm is not None:
            self.last_grad_norm = grad_norm.detach()
            self.log("train/grad_norm", self.last_grad_norm, on_step=True, on_epoch=False)
        flag = torch.zeros((), device=self.device)
        if self._loss_nonfinite is not None:
            flag += self._loss_nonfinite.to(flag.device).float()
        if grad_norm is not None:
            flag += (~torch.isfinite(grad_norm)).to(flag.device).float()
        self._loss_nonfinite = None
        if self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        ok = flag.item() == 0
        if ok:
            self._nonfinite_in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)  # an optimizer ignores parameters without gradients entirely
            self.nonfinite_skipped += 1
            self._nonfinite_in_a_row += 1
            if len(self.nonfinite_steps) < 100:
                self.nonfinite_steps.append(self.trainer.global_step)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        if ok:
            return True
        norm = "n/a" if grad_norm is None else f"{float(grad_norm):.4g}"
        what = f"non-finite loss or gradients at step {self.trainer.global_step} (gradient norm {norm})"
        if self.nonfinite == "stop":
            raise NonFiniteError(f"{what}: stopped before updating the weights (--nonfinite stop)")
        if self._nonfinite_in_a_row > self.max_nonfinite_skips:
            raise NonFiniteError(
                f"{what}: {self._nonfinite_in_a_row} non-finite steps in a row, more than --max_nonfinite_skips="
                f"{self.max_nonfinite_skips}; stopped (lower the learning rate or check the data)"
            )
        if self.trainer.is_global_zero:
            log.warning("%s: step skipped, weights unchanged (%d skipped so far)", what, self.nonfinite_skipped)
        return False

    def on_train_end(self) -> None:
        if self.nonfinite_skipped and self.trainer.is_global_zero:
            steps = ", ".join(map(str, self.nonfinite_steps)) + (", ..." if self.nonfinite_skipped > 100 else "")
            log.warning(
                "%d training step(s) skipped for a non-finite loss or gradients (steps %s)",
                self.nonfinite_skipped,
                steps,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite"] = {"skipped": self.nonfinite_skipped, "steps": list(self.nonfinite_steps)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("nonfinite") or {}
        self.nonfinite_skipped = int(state.get("skipped", 0))
        self.nonfinite_steps = [int(s) for s in state.get("steps", [])]

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


def step_seed(step: int, micro: int = 0, rank: int = 0, seed: int | None = None) -> int:
    """The seed of one training step's random draws on one rank.

    ``seed`` defaults to the run's (``seed_everything``, which LightningCLI calls from the config's
    ``seed_everything`` and exports as ``PL_GLOBAL_SEED``).
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    words = [seed & 0xFFFFFFFFFFFFFFFF, step, micro, rank]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1  # manual_seed: below 2**63


def _clean_name(name: str) -> str:
    """A parameter's name without the FSDP / activation-checkpointing wrapper levels."""
    return _WRAPPER_PREFIXES.sub("", name)


def param_decay(module: nn.Module) -> dict[str, bool]:
    """Whether each parameter of ``module`` gets weight decay, by the kind of layer that owns it.

    Decided by kind, not by name: only the ``weight`` of a linear or convolution layer is decayed. Biases, norm
    weights, embedding tables, positions, codebooks and any other parameter set directly on a module are not
    (pulling those towards zero is no regulariser: it shrinks a scale, a table row or a code vector).

    Returns:
        ``{clean name: decayed}`` for every parameter (names without FSDP / checkpoint wrapper levels).
    """
    return {
        _clean_name(f"{owner}.{local}" if owner else local): isinstance(layer, _DECAYED_LAYERS) and local == "weight"
        for owner, layer in module.named_modules()
        for local, _ in layer.named_parameters(recurse=False)
    }


def stage_from_state(hparams: dict[str, Any], state_dict: dict[str, Tensor]) -> StageModule:
    """Rebuild a stage from its plain hyper-parameters (``stage`` names the class) and a full state dict."""
    import importlib

    hp = dict(hparams)
    stage = hp.pop("stage", None)
    if not stage:
        raise ValueError("not a genie stage (no 'stage' in its hyper-parameters)")
    module_name, _, cls_name = stage.rpartition(".")
    module = getattr(importlib.import_module(module_name), cls_name)(**hp)
    module.load_state_dict(state_dict)
    return module


def load_stage_checkpoint(path: str | Path, map_location: str = "cpu") -> StageModule:
    """Rebuild a stage from a Lightning checkpoint of ours, without unpickling anything.

    The checkpoint must have been written by a :class:`StageModule` (its hyper-parameters name the
    stage class and hold its configs as plain data).
    """
    ckpt = load_checkpoint(path, map_location)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if not hp.get("stage"):
        raise ValueError(f"{path} is not a genie stage checkpoint (no 'stage' in its hyper-parameters)")
    return stage_from_state(hp, ckpt["state_dict"])


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint; :class:`DamagedFileError` for a broken file.

    PyTorch reports a truncated or overwritten file as whatever its zip reader or unpickler tripped on (``OSError:
    [Errno 22] Invalid argument``, ``EOFError``, a ``KeyError``...). When the load fails, the file itself is checked
    and, if it is not a whole checkpoint, that is the error; a whole file's error (e.g. ``weights_only`` refusing a
    checkpoint with pickled objects) is raised as it is. ``mmap``: map the file rather than read it (cheap when
    only a few entries are wanted; the tensors are then read on use).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise  # not the file's content: their own messages say what is wrong
    except Exception as e:
        reason = checkpoint_damage(Path(path))
        if reason is None:
            raise
        raise DamagedFileError(path, reason) from e


def checkpoint_damage(path: Path) -> str | None:
    """Why ``path`` is not a whole ``torch.save`` file (a zip archive), or None when every member is intact.

    Truncation loses the archive's central directory, at its end; a member overwritten in place fails its CRC.
    Reads the whole file (only called once a load has failed).
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    if not zipfile.is_zipfile(path):
        return f"not a complete zip archive, {size:,} bytes"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"unreadable zip archive: {first_line(e)}"
    return None if bad is None else f"{bad} fails its checksum"

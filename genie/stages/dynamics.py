"""Dynamics stage: train a dynamics model on tokens of a frozen tokenizer and actions of a (frozen) LAM.

``model.kind`` picks the kind (genie/models/kinds.py): ``maskgit`` (Genie's, the default), ``causal`` (next-token
prediction in raster order) or ``diffusion`` (diffusion forcing over the tokenizer's code vectors: the stage
feeds it the codes of the batch's tokens); each has its own config fields.

Dimension keys: B batch, T frames, h w token grid, N tokens per frame, V codebook size, A latent actions.

The stage reads either video shards (each batch is tokenized and its latent actions inferred on the fly
by the frozen models, under ``no_grad``: the actions are stop-gradient) or token shards written by
``genie prep tokenize`` (``tokens`` + ``latent_actions`` already in the batch: no tokenizer or LAM
forward pass at all). With ``model.action_source=true`` the actions are the clips' own (``actions.npy``,
discrete ids) instead of the LAM's: an upper-bound world that tells the LAM's errors from the dynamics
model's (the LAM is then never loaded). The frozen models are loaded from their exported folders, lazily and only
when a batch needs them, and are not part of the stage's checkpoint: the checkpoint holds the dynamics model.

``lam_training="joint"`` trains the LAM on with the dynamics model instead of keeping it frozen (Jasmine's
co-training; GenieRedux found a LAM trained apart gave worse actions). The LAM starts from its export, reads each
batch's frames in training mode, and its actions reach the dynamics model as a straight-through one-hot
(:meth:`~genie.models.lam.LatentActionModel.straight_through_actions`): the forward pass is exactly the chosen ids,
the backward pass moves the LAM's encoder towards the codes that would have lowered the dynamics loss. The loss is
the dynamics loss plus ``lam_loss_weight`` times the LAM's own (next-frame reconstruction + VQ), which keeps its
decoder, and so ``genie eval lam``, meaningful. The LAM is then part of the stage's checkpoint and is exported
beside the dynamics model as ``<export>/lam``: the only LAM whose codes this dynamics model knows (``genie export
world`` refuses another).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from genie.models.causal import CausalDynamicsConfig
from genie.models.diffusion import DiffusionDynamicsConfig
from genie.models.dynamics import DynamicsConfig
from genie.models.hub import model_fields
from genie.models.kinds import build_dynamics, dynamics_config
from genie.models.lam import NORM_BATCH, LAMConfig, LAMOutput, LatentActionModel
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import OptimConfig, StageModule
from genie.train import ConfigError
from genie.world import JOINT_LAM, check_compatible, discrete_actions, joint_lam

C = TypeVar("C")
LAM_TRAINING = ("frozen", "joint")


class ConfigMismatch(ConfigError):
    """The dynamics config does not fit the frozen tokenizer / LAM."""


def read_config(cls: type[C], folder: str | Path, what: str) -> C:
    """The config of an exported model folder, without loading its weights."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder} is not an exported model folder (no config.json): train it first")
    return cls.from_pretrained(folder)


class FrozenEncoders:
    """The frozen tokenizer and LAM that turn frames into dynamics inputs (not an ``nn.Module``: never trained,
    never checkpointed).

    Args:
        tokenizer, lam: exported model folders.
    """

    def __init__(self, tokenizer: str | Path, lam: str | Path):
        self.tokenizer_path, self.lam_path = Path(tokenizer), Path(lam)
        self.tokenizer: VideoTokenizer | None = None
        self.lam: LatentActionModel | None = None

    def load(self, device: torch.device, lam: bool = True) -> FrozenEncoders:
        if self.tokenizer is None:
            self.tokenizer = VideoTokenizer.from_pretrained(self.tokenizer_path).eval().requires_grad_(False)
        if lam and self.lam is None:
            self.lam = LatentActionModel.from_pretrained(self.lam_path).eval().requires_grad_(False)
        self.tokenizer.to(device)
        if self.lam is not None:
            self.lam.to(device)
        return self

    @torch.no_grad()
    def tokens(self, frames_BTHWC: Tensor) -> Tensor:
        """uint8 frames (B, T, H, W, C) -> token ids (B, T, h, w) (the tokenizer only)."""
        self.load(frames_BTHWC.device, lam=False)
        assert self.tokenizer is not None
        return self.tokenizer.encode(frames_BTHWC)

    @torch.no_grad()
    def codes(self, ids_BThw: Tensor) -> Tensor:
        """Token ids (B, T, h, w) -> their code vectors (B, T, N, Z) (the diffusion kind's latents)."""
        self.load(ids_BThw.device, lam=False)
        assert self.tokenizer is not None
        return self.tokenizer.quantizer.lookup(ids_BThw.flatten(2))

    @torch.no_grad()
    def __call__(self, frames_BTHWC: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 frames (B, T, H, W, C) -> token ids (B, T, h, w), latent actions (B, T-1)."""
        self.load(frames_BTHWC.device)
        assert self.tokenizer is not None and self.lam is not None
        return self.tokenizer.encode(frames_BTHWC), self.lam.infer_actions(frames_BTHWC)


class DynamicsStage(StageModule):
    """LightningModule training a dynamics model of any kind (:mod:`genie.models.kinds`).

    Args:
        model: the dynamics model's config, of the kind its ``kind`` names (``maskgit`` by default); ``num_codes``,
            ``grid_size`` and ``num_actions`` must match the frozen tokenizer and LAM (checked at construction,
            with the fix in the error).
        tokenizer: exported tokenizer folder (``<run>/export`` of the tokenizer stage).
        lam: exported LAM folder.
        optim: optimizer and schedule.
        lam_training: "frozen" (Genie: the LAM was trained apart; its actions are inputs, without gradient) or
            "joint" (the LAM, started from ``lam``, trains on through the dynamics loss; see the module docstring).
            Joint training needs video shards and latent actions.
        lam_loss_weight: with ``lam_training="joint"``, the weight of the LAM's own loss beside the dynamics loss.
        action_temperature: with ``lam_training="joint"``, the softmax temperature of the straight-through
            one-hot's backward pass, over cosine similarities in [-1, 1] (lower: closer to the hard choice).
    """

    config_class = DynamicsConfig
    lam_training = "frozen"  # a class default too: subclasses that build their parts themselves (fine-tuning) keep it

    def __init__(
        self,
        model: DynamicsConfig | CausalDynamicsConfig | DiffusionDynamicsConfig | None = None,
        tokenizer: str = "runs/tokenizer/export",
        lam: str = "runs/lam/export",
        optim: OptimConfig | None = None,
        lam_training: str = "frozen",
        lam_loss_weight: float = 1.0,
        action_temperature: float = 0.1,
    ):
        super().__init__(optim)
        if lam_training not in LAM_TRAINING:
            raise ConfigError(f"lam_training must be one of {', '.join(LAM_TRAINING)}, not {lam_training!r}")
        if lam_loss_weight < 0 or action_temperature <= 0:
            raise ConfigError("lam_loss_weight must be >= 0 and action_temperature > 0")
        try:
            cfg = dynamics_config(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tok_cfg = read_config(TokenizerConfig, tokenizer, "tokenizer")
        lam_cfg = read_config(LAMConfig, lam, "LAM")
        try:
            check_compatible(tok_cfg, lam_cfg, cfg)
        except ValueError as e:
            fix = f"set model.num_codes={tok_cfg.num_codes}, model.grid_size={tok_cfg.grid_size}, "
            fix += f"model.num_actions={lam_cfg.num_actions}" + (
                f", model.code_dim={tok_cfg.code_dim}" if cfg.kind == "diffusion" else ""
            )
            raise ConfigMismatch(f"{e} ({fix})") from None
        self.image_size = tok_cfg.image_size
        self.net = build_dynamics(cfg)
        self.frozen = FrozenEncoders(tokenizer, lam)
        self.lam_training = lam_training
        self.lam_loss_weight, self.action_temperature = lam_loss_weight, action_temperature
        self.lam: LatentActionModel | None = None
        if lam_training == "joint":
            if cfg.action_source == "true":
                raise ConfigError("lam_training=joint trains the LAM, but model.action_source=true uses no LAM")
            # a submodule: trained, in the optimizer and in the checkpoint (a resumed run overwrites these weights)
            self.lam = LatentActionModel.from_pretrained(lam)
        self.save_plain_hparams(
            model=model_fields(cfg),
            tokenizer=str(tokenizer),
            lam=str(lam),
            lam_training=lam_training,
            lam_loss_weight=lam_loss_weight,
            action_temperature=action_temperature,
        )

    def expected_resolution(self) -> int:
        return self.image_size

    def expected_frames(self) -> int:
        return self.net.config.num_frames

    def inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Token ids (B, T, h, w) and latent actions (B, T-1) of a batch of video or token shards."""
        if self.net.config.action_source == "true":
            tokens = batch["tokens"].long() if "tokens" in batch else self.frozen.tokens(batch["frames"])
            return tokens, self.true_actions(batch)
        if self.lam_training == "joint":  # the trained LAM's ids, in its current mode (eval in validation)
            frames = self.joint_frames(batch)
            return self.frozen.tokens(frames), self.lam.infer_actions(frames)
        if "tokens" in batch:
            return batch["tokens"].long(), batch["latent_actions"].long()
        return self.frozen(batch["frames"])

    def joint_frames(self, batch: dict[str, Any]) -> Tensor:
        if "frames" not in batch:
            raise ConfigError(
                "lam_training=joint needs video shards (the LAM reads the frames), but this batch holds tokens: "
                "point data.train_shards / data.val_shards at the video shards, not at `genie prep tokenize` output"
            )
        return batch["frames"]

    def joint_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, LAMOutput]:
        """Joint training: token ids (B, T, h, w), the LAM's straight-through actions (B, T-1, A) and its output."""
        assert self.lam is not None and self.lam_training == "joint"
        frames = self.joint_frames(batch)
        out = self.lam(frames)
        return self.frozen.tokens(frames), self.lam.straight_through_actions(out, self.action_temperature), out

    def true_actions(self, batch: dict[str, Any]) -> Tensor:
        """The clips' own discrete actions (B, T-1), checked against ``model.num_actions``."""
        # data.require_actions=true skips (and counts) clips without actions
        actions = discrete_actions(batch, "a batch of the training shards")
        A = self.net.config.num_actions
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= A):
            raise ConfigError(
                f"the clips' actions reach {int(actions.max())} but model.num_actions={A}: "
                f"set model.num_actions={int(actions.max()) + 1} or more (e.g. 15 for procgen)"
            )
        return actions

    def net_inputs(self, tokens: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """What the kind's model reads: the token ids, or for the diffusion kind their code vectors (B, T, N, Z)."""
        if self.net.config.kind != "diffusion":
            return tokens, actions
        trained = getattr(self, "tokenizer", None)  # a fine-tune that trains the tokenizer: its own codebook
        if trained is not None:
            return trained.quantizer.lookup(tokens.flatten(2)), actions
        return self.frozen.codes(tokens), actions

    def batch_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Any, LAMOutput | None]:
        """The training loss of a batch, the dynamics model's output and (joint training) the LAM's output."""
        if self.lam_training != "joint":
            out = self.net(*self.net_inputs(*self.inputs(batch)))
            return out.loss, out, None
        tokens, weights, lam_out = self.joint_inputs(batch)
        out = self.net(*self.net_inputs(tokens, weights))
        if not self.lam_loss_weight:  # the dynamics loss alone (the LAM's decoder gets no gradient, not a zero one)
            return out.loss, out, lam_out
        return out.loss + self.lam_loss_weight * lam_out.loss, out, lam_out

    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.batch_losses(batch)[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, out, lam_out = self.batch_losses(batch)
        metrics = {"train/loss": loss}
        if hasattr(out, "accuracy"):  # token kinds
            metrics["train/accuracy"] = out.accuracy
        if lam_out is not None:
            metrics.update(
                {
                    "train/dynamics_loss": out.loss,
                    "train/lam_loss": lam_out.loss,
                    "train/lam_usage": lam_out.usage,
                    "train/lam_perplexity": lam_out.perplexity,
                }
            )
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log_data_stats(batch)
        return loss

    # -- joint LAM training: its latent normalisation, its mode, its export ---------------------------------------

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.lam_training == "joint":
            self.lam.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.lam_training != "joint":
            return
        # the LAM's codes must stay the same in training and eval mode (World and validation use eval mode): a LAM
        # exported before its latent statistics were fixed (genie.stages.lam) gets them measured over its first
        # norm_calibration_batches joint batches, then fixed
        norm = self.lam.latent_norm
        if int(norm.phase) == NORM_BATCH:
            norm.start_calibration()
        else:
            norm.freeze_when_calibrated(self.lam.config.norm_calibration_batches)

    def on_train_end(self) -> None:
        if self.lam_training == "joint":
            self.lam.latent_norm.freeze_what_was_calibrated()
        super().on_train_end()

    def export(self, path: str | Path) -> Path:
        """The dynamics model (HF layout) and, after joint training, its LAM in ``<path>/lam``."""
        path = super().export(path)
        stale = joint_lam(path)
        if self.lam_training != "joint" and stale is not None:
            shutil.rmtree(stale)  # an earlier joint run's LAM in the same folder: this dynamics model never saw it
        if self.lam_training == "joint":
            was_training = self.lam.training
            self.lam.eval().save_pretrained(path / JOINT_LAM)
            self.lam.train(was_training)
        return path

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validate_dynamics(*self.inputs(batch))

    def validate_dynamics(self, tokens: Tensor, actions: Tensor) -> None:
        """Log the dynamics model's validation metrics on token ids (B, T, h, w) and latent actions (B, T-1).

        The main number is ``val/next_frame_accuracy``: the last frame fully masked after clean true frames
        (the situation of generation), the share of its tokens whose argmax is the true id; the same measure
        as ``genie eval world``'s teacher-forced token accuracy at one step. ``val/loss`` and
        ``val/accuracy`` are the training objective (random masks, clean prefixes and context noise as
        configured), so they move with the regime's options and do not compare across them.
        """
        n = tokens.shape[0]
        inputs = self.net_inputs(tokens, actions)
        last = self.net.next_frame_output(*inputs)
        if hasattr(last, "accuracy"):  # token kinds (diffusion: the loss is the one-step prediction's error)
            self.log("val/next_frame_accuracy", last.accuracy, batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/next_frame_loss", last.loss, batch_size=n, sync_dist=True, prog_bar=not hasattr(last, "accuracy"))
        out = self.net(*inputs)  # the training objective
        self.log("val/loss", out.loss, batch_size=n, sync_dist=True)
        if hasattr(out, "accuracy"):
            self.log("val/accuracy", out.accuracy, batch_size=n, sync_dist=True)

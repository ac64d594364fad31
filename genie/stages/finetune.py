"""Fine-tune stage: adapt a pretrained world to new video (robot footage) and learn to drive it with real actions.

Dimension keys: B batch, T frames, H W pixels, C channels, h w token grid, A latent actions, U action_dim.

Starts from a world bundle (``genie export world``) and trains on video shards:

- the **dynamics** model, from the bundle's weights, with the usual MaskGIT objective (``train_dynamics``);
- optionally the **tokenizer** and/or the **LAM** (``train_tokenizer``, ``train_lam``), each with its own
  loss added to the total. The dynamics model's inputs (token ids, latent actions) always come out of the
  current tokenizer/LAM *detached*: stop-gradient, as in pretraining. Their dead-code restarts (which let a
  pretrained LAM give the new data's transitions codes of their own) stop after ``restarts_until`` of training,
  so the dynamics model and the adapter train their last part on the codes the export will have. Frozen parts
  are loaded lazily and stay out of the checkpoint, as in the dynamics stage;
- optionally an **action adapter** (``adapter_action_dim`` > 0, :mod:`genie.models.adapter`): on shards
  whose clips carry real actions (``actions.npy`` float32 ``[T-1, U]``), a small MLP learns to predict the
  LAM's latent action of each transition from the robot's action, so the exported world can be stepped
  with ``World.step(robot_action=u)``.

``init: scratch`` trains the same architecture from fresh random weights instead: every part that trains
(the dynamics model, and the LAM / tokenizer when they train) starts untrained, the frozen parts stay the bundle's.
With the same data and steps that is the baseline that says what pretraining was worth (``genie transfer``).

At the end the stage exports a whole new world bundle (``<root>/export``): the (fine-tuned or original)
tokenizer and LAM, the fine-tuned dynamics model, the adapter, and the source world's sampler settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genie.models.adapter import ActionAdapter, AdapterConfig
from genie.models.kinds import build_dynamics, load_dynamics, read_dynamics_config
from genie.models.lam import LAMConfig, LatentActionModel
from genie.models.sampler import SamplerConfig
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import OptimConfig
from genie.stages.dynamics import DynamicsStage, FrozenEncoders, read_config
from genie.train import ConfigError
from genie.world import PARTS, write_bundle

# where the trained parts start: the bundle's weights, or fresh random ones (the from-scratch baseline)
INITS = ("pretrained", "scratch")


class FinetuneStage(DynamicsStage):
    """LightningModule fine-tuning a world bundle (see the module docstring).

    Args:
        world: the pretrained world bundle folder.
        train_dynamics: train the dynamics model (False: e.g. only fit an adapter to an existing world).
        train_tokenizer: also fine-tune the tokenizer (its reconstruction loss is added).
        train_lam: also fine-tune the LAM (its next-frame loss is added).
        adapter_action_dim: U, the length of the robot's action vectors; 0: no action adapter.
        adapter_hidden: width of the adapter's hidden layers.
        adapter_weight: weight of the adapter's cross entropy in the total loss.
        restarts_until: the fine-tuned tokenizer's and LAM's dead-code restarts stop once this fraction of
            ``trainer.max_steps`` is done (1: never stop). A restart re-purposes a code; one late in training
            leaves the adapter and the dynamics model fitted to a code that no longer exists.
        init: ``pretrained`` (start from the bundle's weights) or ``scratch`` (the trained parts start from fresh
            random weights of the same architecture: the from-scratch baseline of ``genie transfer``).
        optim: optimizer and schedule (one learning rate for every trained part).
    """

    def __init__(
        self,
        world: str = "runs/demo/world",
        train_dynamics: bool = True,
        train_tokenizer: bool = False,
        train_lam: bool = False,
        adapter_action_dim: int = 0,
        adapter_hidden: int = 128,
        adapter_weight: float = 1.0,
        init: str = "pretrained",
        optim: OptimConfig | None = None,
        restarts_until: float = 0.5,
    ):
        super(DynamicsStage, self).__init__(optim)  # StageModule.__init__: the parts come from the bundle
        root = Path(world)
        missing = [p for p in PARTS if not (root / p / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(
                f"world {root} is not a world bundle (no {', '.join(missing)}): make one with `genie export world`"
            )
        if not (train_dynamics or train_tokenizer or train_lam or adapter_action_dim):
            raise ConfigError("nothing to train: set train_dynamics, train_tokenizer, train_lam or adapter_action_dim")
        if init not in INITS:
            raise ConfigError(f"model.init_args.init={init!r}: choose {' or '.join(INITS)}")
        tok_cfg = read_config(TokenizerConfig, root / "tokenizer", "tokenizer")
        lam_cfg = read_config(LAMConfig, root / "lam", "LAM")
        self.world_path = root
        self.image_size = tok_cfg.image_size
        scratch = init == "scratch"
        if scratch and train_dynamics:  # the same architecture, fresh weights (seeded by seed_everything)
            self.net = build_dynamics(read_dynamics_config(root / "dynamics"))
        else:
            self.net = load_dynamics(root / "dynamics")
        self.net.requires_grad_(train_dynamics)
        self.train_dynamics = train_dynamics
        # trained parts are submodules (optimised and checkpointed); frozen ones are loaded lazily, never saved
        self.tokenizer = self.lam = None
        if train_tokenizer:
            tok = VideoTokenizer(tok_cfg) if scratch else VideoTokenizer.from_pretrained(root / "tokenizer")
            self.tokenizer = tok
        if train_lam:
            self.lam = LatentActionModel(lam_cfg) if scratch else LatentActionModel.from_pretrained(root / "lam")
        self.frozen = FrozenEncoders(root / "tokenizer", root / "lam")
        self.adapter = None
        if adapter_action_dim > 0:
            cfg = AdapterConfig(action_dim=adapter_action_dim, num_actions=lam_cfg.num_actions, hidden=adapter_hidden)
            self.adapter = ActionAdapter(cfg)
        self.adapter_weight = adapter_weight
        if not 0 <= restarts_until <= 1:
            raise ConfigError(f"model.init_args.restarts_until={restarts_until}: choose a fraction in [0, 1]")
        self.restarts_until = restarts_until
        self.save_plain_hparams(
            world=str(world),
            train_dynamics=train_dynamics,
            train_tokenizer=train_tokenizer,
            train_lam=train_lam,
            adapter_action_dim=adapter_action_dim,
            adapter_hidden=adapter_hidden,
            adapter_weight=adapter_weight,
            init=init,
            restarts_until=restarts_until,
        )

    def expected_frames(self) -> int:
        # the dynamics model's window; a fine-tuned tokenizer or LAM with a shorter one slides its temporal
        # attention over longer clips (banded causal attention, see genie/models/blocks.py)
        return self.net.config.num_frames

    def on_train_start(self) -> None:
        super().on_train_start()
        for part in (self.tokenizer, self.lam, self.adapter):
            if part is not None:
                part.train()  # from_pretrained hands them over in eval mode
        if not self.train_dynamics:
            self.net.eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        total = self.trainer.max_steps
        if total and total > 0 and self.trainer.global_step >= self.restarts_until * total:
            for part in (self.tokenizer, self.lam):
                if part is not None:
                    part.quantizer.dead_code_threshold = 0  # the exported config keeps its own value

    # -- one batch ------------------------------------------------------------------------------------

    def encode(self, frames_BTHWC: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Dynamics inputs of a clip batch, and the losses of the parts being fine-tuned.

        Returns:
            token ids (B, T, h, w), latent actions (B, T-1) (both detached), {name: loss}.
        """
        losses: dict[str, Tensor] = {}
        if self.tokenizer is not None:
            out = self.tokenizer(frames_BTHWC)
            tokens_BThw, losses["tokenizer"] = out.ids.detach(), out.loss
        else:
            tokens_BThw = None
        if self.lam is not None:
            out = self.lam(frames_BTHWC)
            actions_BT, losses["lam"] = out.ids.detach(), out.loss
        else:
            actions_BT = None
        if tokens_BThw is None or actions_BT is None:
            frozen = self.frozen.load(frames_BTHWC.device)
            with torch.no_grad():
                if tokens_BThw is None:
                    tokens_BThw = frozen.tokenizer.encode(frames_BTHWC)
                if actions_BT is None:
                    actions_BT = frozen.lam.infer_actions(frames_BTHWC)
        return tokens_BThw, actions_BT, losses

    def adapter_output(self, batch: dict[str, Any], actions_BT: Tensor) -> Any:
        """The adapter's output against the batch's latent actions; None without an adapter or real actions."""
        real = batch.get("actions")
        if self.adapter is None or real is None or not real.is_floating_point():
            return None
        U = self.adapter.config.action_dim
        if real.ndim != 3 or real.shape[-1] != U:
            raise ConfigError(
                f"the shards' actions have shape {tuple(real.shape[1:])} per clip but adapter_action_dim={U}: "
                f"set model.init_args.adapter_action_dim={real.shape[-1] if real.ndim == 3 else 'U'}"
            )
        return self.adapter(real, actions_BT)  # real (B, T-1, U) -> logits (B, T-1, A)

    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.losses(batch)[0]

    def losses(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss of a batch and its parts (for logging)."""
        tokens, actions, losses = self.encode(batch["frames"])
        logs: dict[str, Tensor] = {}
        if self.train_dynamics:
            out = self.net(*self.net_inputs(tokens, actions))
            losses["dynamics"] = out.loss
            if hasattr(out, "accuracy"):  # token kinds
                logs["train/accuracy"] = out.accuracy
        adapted = self.adapter_output(batch, actions)
        if adapted is not None:
            losses["adapter"] = self.adapter_weight * adapted.loss
            logs["train/adapter_accuracy"] = adapted.accuracy
        total = sum(losses.values())
        if not isinstance(total, Tensor):  # an adapter-only run on a batch without real actions
            raise ConfigError("adapter-only fine-tuning needs shards with real actions (actions.npy float32 [T-1, U])")
        logs.update({f"train/{k}_loss": v.detach() for k, v in losses.items()})
        logs["train/loss"] = total.detach()
        return total, logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, logs = self.losses(batch)
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log_data_stats(batch)
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        tokens, actions, _ = self.encode(batch["frames"])
        self.validate_dynamics(tokens, actions)
        adapted = self.adapter_output(batch, actions)
        if adapted is not None:
            n = tokens.shape[0]
            self.log("val/adapter_accuracy", adapted.accuracy, batch_size=n, sync_dist=True, prog_bar=True)

    # -- export ---------------------------------------------------------------------------------------

    def export(self, path: str | Path) -> Path:
        """Write the fine-tuned world as a bundle folder (see the module docstring)."""
        meta_file = self.world_path / "world.json"
        sampler = None
        if meta_file.is_file():
            sampler = SamplerConfig(**json.loads(meta_file.read_text()).get("sampler", {}))
        parts = {
            "tokenizer": self.tokenizer if self.tokenizer is not None else self.world_path / "tokenizer",
            "lam": self.lam if self.lam is not None else self.world_path / "lam",
            "dynamics": self.net,
        }
        modules = [m for m in (*parts.values(), self.adapter) if isinstance(m, torch.nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return write_bundle(path, **parts, sampler=sampler, adapter=self.adapter)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)

"""Latent action model (LAM): discover a few discrete actions that explain how one frame becomes the next.

Dimension keys:
    B: batch size
    T: frames;  T-1 transitions
    H, W: pixels;  h, w: patch grid (H / P, W / P), square: g = h = w
    C: channels
    P: patch size
    N: patch tokens per frame (h * w)
    X: values per patch (P * P * C)
    D: width
    Z: action code dimension
    A: number of latent actions (codebook size)

As in Genie, the LAM works on pixels and has two halves:

- **Encoder** sees frames x_1 .. x_T. Each frame gets one extra learned *action token* in front of its
  patches; the causal ST transformer lets frame t+1's action token look at frames 1..t+1, and its output
  is projected to Z and vector-quantized to one of A codes: the latent action a_t of transition t -> t+1.
- **Decoder** sees frames x_1 .. x_{T-1} and the quantized actions a_1 .. a_{T-1} only, and predicts
  x_2 .. x_T. It is causal in time, so the prediction of x_{t+1} can use x_1..x_t and a_t but never x_{t+1}
  itself: the A-way action code is the only path for "what changed".

What makes it learn (measured on the synthetic sprites source, where the true actions are known; a plain
version of this model, with actions added to the decoder's tokens, stayed at the copy-last-frame loss with
NMI ~0 for 300+ CPU steps). A LAM has to escape a saddle: the decoder ignores codes that carry nothing,
and the encoder gets no signal to make codes carry something until the decoder uses them. Each choice
below shortens that escape (ablation numbers in ``tests/stages/test_lam_learning.py``):

- **FiLM action conditioning** (``action_conditioning="film"``): the action scales and shifts the decoder's
  token features (at its input and before its output head) instead of being added to them. An additive
  action has the same effect on every token, so the first-order gradient it sends back to the encoder is
  a sum of per-patch errors in which an object's disappearance and reappearance cancel; a multiplicative
  one correlates each patch's error with that patch's content, which is direction-specific.
- **Residual prediction**: the decoder predicts x_{t+1} - x_t, so "copy the frame" is free and all of its
  capacity (and gradient) goes to the change.
- **Overlapping patch embedding** (``patch_context=1``): each token embeds its patch and the neighbouring
  patches (a 3x3 convolution over the patch grid), so "something moved in from the left" is a local
  feature in both halves instead of an attention pattern to be learned first.
- **Motion input** (``motion_input``): the encoder also embeds each frame's difference from the previous
  frame, the signal an action is about; learning to subtract frames through attention is slow.
- **Per-frame mean-colour centring** (``centre_frames``) of the model's inputs and **zero-initialised
  spatial position tables**: nuisance factors (the background colour, where on screen something happens)
  otherwise dominate the encoder's early outputs and the gradients reaching them.
- **Normalised latents**: the continuous action latent is batch-normalised before the cosine quantizer (see
  :class:`LatentNorm`). Without it, all the encoder's early outputs point the same way (cosine ~0.98 at
  initialisation), so one code wins every transition.

**Train = inference** (``norm_freeze_fraction``, ``norm_calibration_batches``). Batch statistics make a
transition's latent, and so its code, depend on the other transitions of its training batch, while eval mode
(``infer_actions``, which ``prep tokenize``, the dynamics stage and ``World`` use) normalises each clip on its own
with running statistics. So the codes the world is trained and played with can differ from the codes the decoder
learned: with batch statistics to the end, eval-mode codes agreed with training's on 94.4 % of the sprites'
transitions (tiny config, 400 steps, batches of 16 clips; 95.1 % held out) and on 75 % of a CoinRun LAM's. Training
therefore ends in fixed statistics (:class:`LatentNorm`'s phases, moved on by :mod:`genie.stages.lam`): when
``1 - norm_freeze_fraction`` of training is done, the statistics are measured exactly (mean and variance of every
latent, all ranks) over the next ``norm_calibration_batches`` batches, then fixed, and the rest of training
normalises with them in both modes, so the decoder's last steps adapt to exactly the codes inference gives.
Measured on the same run with the default 0.15 / 20: agreement 1.0 (by construction), held-out NMI 0.888 and
next-frame PSNR 20.81 dB against 0.887 and 20.83 dB with batch statistics to the end. Batch statistics are what
the early escape needs (above); late, with the learning rate decayed, the latents no longer drift as a block, so
the last 15 % can do without. The alternative, recalibrating exact statistics once training is over (no frozen
phase), does not help, because the training codes themselves change with each batch's statistics: on the plain
sprites (no distractors, 300 steps) agreement with training's codes was 0.836 after recalibration against 0.834
with the momentum statistics (0.891 and 0.902 held out); with the frozen phase 1.0, NMI 0.950 against 0.955 and
PSNR 39.2 against 39.4 dB.

Collapse guards (the most reported LAM failure): the quantizer matches l2-normalised codes by cosine
similarity (no code can drift out of reach) and restarts codes unused for ``dead_code_threshold`` steps
from the worst-quantized encoder outputs; the latent normalisation above keeps the encoder's outputs spread
over the sphere, so restarted codes land on distinct transitions; the commitment weight is low (0.05 by
default) because a strong pull of the encoder towards its current codes locks in the arbitrary partition of
the first steps; and the training stage reports code usage and perplexity (``genie eval lam`` adds NMI
against true actions where the data has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, final

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig
from transformers import initialization as hf_init

from genie.models.blocks import STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel, register_auto
from genie.models.quantizer import VectorQuantizer, in_distributed_run
from genie.models.tokenizer import frames_to_unit

ACTION_CONDITIONING = ("film", "add")
PATCH_PADDING = ("zeros", "circular")
FILM_INIT_STD = 0.3  # initial scale of the action's modulation: strong enough to matter from step 0


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class LAMConfig(PreTrainedConfig):
    """Latent action model hyper-parameters; exactly the model fields of ``config.json``.

    Defaults follow the Genie CoinRun case study (patch 16, 8 latent actions).
    """

    model_type = "genie_lam"

    image_size: int = 64  # H = W of the (square) input frames
    in_channels: int = 3  # C
    patch_size: int = 16  # P: each P x P patch is one token
    num_frames: int = 16  # temporal attention window in frames (= training clip length)
    width: int = 512  # D: transformer width
    encoder_depth: int = 8  # ST blocks in the encoder
    decoder_depth: int = 8  # ST blocks in the decoder
    num_heads: int = 8  # attention heads (width / num_heads must be even, for RoPE)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    code_dim: int = 32  # Z: dimension of the (l2-normalised) action codes
    num_actions: int = 8  # A: number of latent actions
    commitment_beta: float = 0.05  # weight of the commitment loss (low: see the module docstring)
    dead_code_threshold: int = 50  # restart an action code after this many training steps unused (0: never)
    dropout: float = 0.0  # dropout in attention and residual branches
    qk_norm: bool = True  # RMSNorm on per-head queries/keys
    patch_context: int = 1  # each token also embeds this many neighbouring patches on every side (0: plain)
    motion_input: bool = True  # the encoder also embeds x_t - x_{t-1} (zeros for the first frame)
    centre_frames: bool = True  # subtract each frame's mean colour from the model's inputs
    action_conditioning: str = "film"  # how the decoder takes the action: "film" (scale+shift) or "add"
    patch_padding: str = "zeros"  # beyond the frame's borders the patch context is "zeros" or "circular" (a torus)
    # the last part of training normalises the action latents with fixed statistics, as inference does (see the
    # module docstring): calibration starts at this fraction of training before its end (0: never) ...
    norm_freeze_fraction: float = 0.15
    norm_calibration_batches: int = 20  # ... and measures the statistics exactly over this many training batches

    def __post_init__(self, **kwargs):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"width {self.width} / num_heads {self.num_heads} must be an even integer")
        if self.num_actions < 2:
            raise ValueError(f"num_actions must be >= 2, got {self.num_actions}")
        if self.patch_context < 0:
            raise ValueError(f"patch_context must be >= 0, got {self.patch_context}")
        if not 0 <= self.norm_freeze_fraction < 1:
            raise ValueError(f"norm_freeze_fraction must be in [0, 1), got {self.norm_freeze_fraction}")
        if self.norm_calibration_batches < 1:
            raise ValueError(f"norm_calibration_batches must be >= 1, got {self.norm_calibration_batches}")
        if self.patch_padding not in PATCH_PADDING:
            raise ValueError(f"patch_padding must be one of {', '.join(PATCH_PADDING)}, not {self.patch_padding!r}")
        if self.action_conditioning not in ACTION_CONDITIONING:
            choices = ", ".join(ACTION_CONDITIONING)
            raise ValueError(f"action_conditioning must be one of {choices}, not {self.action_conditioning!r}")
        super().__post_init__(**kwargs)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels

    def st_config(self, depth: int, extra_tokens: int) -> STTransformerConfig:
        return STTransformerConfig(
            width=self.width,
            depth=depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_spatial_tokens=self.num_patches + extra_tokens,
            max_frames=self.num_frames,
            dropout=self.dropout,
            qk_norm=self.qk_norm,
        )


@dataclass
class LAMOutput:
    """Result of :meth:`LatentActionModel.forward`."""

    recon: Tensor  # (B, T-1, H, W, C) predicted frames 2..T, float in [0, 1], detached
    loss: Tensor  # () recon_loss + vq_loss
    recon_loss: Tensor  # () MSE of the next-frame prediction in [-1, 1] pixel space
    vq_loss: Tensor  # () codebook + beta * commitment loss
    ids: Tensor  # (B, T-1) long latent action of each transition
    usage: Tensor  # () fraction of the A codes used in the batch
    perplexity: Tensor  # () action code perplexity of the batch
    latents: Tensor  # (B, T-1, Z) the normalised action latents the codes were matched to (with gradient)


class PatchEmbed(nn.Module):
    """Embed each patch together with its ``context`` neighbours on every side: (B, T, N, X') -> (B, T, N, D).

    A (2 * context + 1)^2 convolution over the g x g grid of patches (zero-padded at the borders), i.e. an
    overlapping patch embedding; ``context=0`` is the plain per-patch linear embedding.
    """

    def __init__(self, in_dim: int, width: int, grid_size: int, context: int, padding: str = "zeros"):
        super().__init__()
        self.grid_size = grid_size
        k = 2 * context + 1
        self.conv = nn.Conv2d(in_dim, width, kernel_size=k, padding=context, padding_mode=padding)
        # N(0, 0.02) for a plain patch embedding, shrunk by the kernel side so the output scale does not
        # grow with the context
        nn.init.normal_(self.conv.weight, std=0.02 / k)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x_BTNX: Tensor) -> Tensor:
        B, T = x_BTNX.shape[:2]
        grid = rearrange(x_BTNX, "b t (h w) x -> (b t) x h w", h=self.grid_size)
        return rearrange(self.conv(grid), "(b t) d h w -> b t (h w) d", b=B, t=T)


NORM_BATCH, NORM_CALIBRATING, NORM_FROZEN = 0, 1, 2  # the phases of :class:`LatentNorm` (its ``phase`` buffer)
NORM_PHASES = ("batch", "calibrating", "frozen")
_NORM_COUNTERS = ("phase", "calibration_batches", "calibration_latents")  # buffers that older checkpoints lack


class LatentNorm(nn.BatchNorm1d):
    """Standardise the action latents per dimension (batch norm without affine): (..., Z) -> (..., Z).

    The cosine quantizer only sees directions, and at initialisation the encoder's outputs all share one
    direction (their common component dwarfs what varies between transitions: cosine ~0.98), so every
    transition picks the same code. Standardising removes the common component. It has to be *batch*
    statistics with gradients through them, as in batch norm: the gradient then has no component that
    moves all latents together, so they cannot drift away as a block. Normalising by running statistics
    instead (strictly per-sample) was measured to fail: Adam moves the raw latents by more per step than
    they spread, the running mean lags, and all latents share one direction again.

    Three phases (the ``phase`` buffer; the training stage moves it on, see :mod:`genie.stages.lam`):

    - ``batch`` (:data:`NORM_BATCH`): training normalises with the batch's statistics and keeps momentum-0.1
      running statistics for eval mode (and for a single latent in training mode), as ``nn.BatchNorm1d``;
    - ``calibrating``: training still normalises with batch statistics, while the running statistics become
      the exact mean and (biased) variance of every latent seen since calibration began, on all ranks
      (summed over the process group, so they are identical everywhere);
    - ``frozen``: training normalises with those fixed statistics too, so a transition's latent, and its
      code, are the same in both modes and no longer depend on the rest of its batch.

    Eval mode always uses the running statistics, and every clip is processed on its own.
    """

    phase: Tensor  # () long: NORM_BATCH, NORM_CALIBRATING or NORM_FROZEN
    calibration_batches: Tensor  # () long: training batches measured since calibration began
    calibration_latents: Tensor  # () long: latents (over all ranks) in the calibrated statistics

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)
        for name in _NORM_COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    @property
    def phase_name(self) -> str:
        return NORM_PHASES[int(self.phase)]

    def start_calibration(self) -> None:
        """Forget the running statistics; training batches from now on measure them exactly."""
        self.phase.fill_(NORM_CALIBRATING)
        self.calibration_batches.zero_()
        self.calibration_latents.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def freeze(self) -> None:
        """Normalise with the calibrated statistics from now on, in training as in eval mode."""
        if int(self.phase) == NORM_CALIBRATING and int(self.calibration_latents) == 0:
            raise RuntimeError("cannot freeze the latent normalisation before any batch was calibrated")
        self.phase.fill_(NORM_FROZEN)

    def freeze_when_calibrated(self, batches: int) -> bool:
        """Freeze once calibration has measured ``batches`` training batches; True if this call froze."""
        if int(self.phase) == NORM_CALIBRATING and int(self.calibration_batches) >= batches:
            self.freeze()
            return True
        return False

    def freeze_what_was_calibrated(self) -> bool:
        """Training ends while calibrating: keep what was measured (so the export's training and eval modes agree)
        if any latent was; True if this call froze."""
        if int(self.phase) == NORM_CALIBRATING and int(self.calibration_latents) > 0:
            self.freeze()
            return True
        return False

    def forward(self, z: Tensor) -> Tensor:
        flat_MZ = z.reshape(-1, z.shape[-1])
        phase = int(self.phase)
        if not self.training or phase == NORM_FROZEN or flat_MZ.shape[0] < 2:
            out = self._fixed(flat_MZ)
        elif phase == NORM_CALIBRATING:
            self._calibrate(flat_MZ.detach())
            out = F.batch_norm(flat_MZ, None, None, training=True, eps=self.eps)  # batch statistics, as before
        else:
            out = super().forward(flat_MZ)
        return out.reshape(z.shape)

    def as_in_training(self, z: Tensor) -> Tensor:
        """What training mode gives for this batch of latents, without changing any statistics: (..., Z) -> (..., Z)."""
        flat_MZ = z.reshape(-1, z.shape[-1])
        if int(self.phase) == NORM_FROZEN or flat_MZ.shape[0] < 2:
            out = self._fixed(flat_MZ)
        else:
            out = F.batch_norm(flat_MZ, None, None, training=True, eps=self.eps)
        return out.reshape(z.shape)

    def _fixed(self, flat_MZ: Tensor) -> Tensor:
        return F.batch_norm(flat_MZ, self.running_mean, self.running_var, training=False, eps=self.eps)

    @torch.no_grad()
    def _calibrate(self, flat_MZ: Tensor) -> None:
        """Merge one batch (all ranks) into the exact running mean and variance (Chan et al.'s pairwise update)."""
        x_MZ = flat_MZ.float()
        head = torch.cat([x_MZ.new_tensor([x_MZ.shape[0]]), x_MZ.sum(0)])  # count, sum
        if in_distributed_run():
            dist.all_reduce(head)
        n_b, mean_b = head[0], head[1:] / head[0]
        m2_b = ((x_MZ - mean_b) ** 2).sum(0)  # sum of squares about the batch mean (all ranks)
        if in_distributed_run():
            dist.all_reduce(m2_b)
        n_a = self.calibration_latents.to(x_MZ.dtype)
        n = n_a + n_b
        delta = mean_b - self.running_mean
        m2 = self.running_var * n_a + m2_b + delta**2 * (n_a * n_b / n)
        self.running_mean += delta * (n_b / n)
        self.running_var.copy_(m2 / n)
        self.calibration_latents += n_b.round().long()
        self.calibration_batches += 1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the phases existed lack their buffers: they were in the "batch" phase
        for name in _NORM_COUNTERS:
            state_dict.setdefault(prefix + name, torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LatentActionModel(GeniePreTrainedModel):
    """Genie's latent action model (see the module docstring)."""

    config_class = LAMConfig
    main_input_name = "frames"
    # exports written before the latent normalisation had phases lack these buffers: they load in the "batch" phase
    _keys_to_ignore_on_load_missing = [rf"latent_norm\.{name}$" for name in _NORM_COUNTERS]

    def __init__(self, config: LAMConfig):
        super().__init__(config)
        D, X, g, c = config.width, config.patch_dim, config.grid_size, config.patch_context
        enc_in = 2 * X if config.motion_input else X  # frame patches (+ their change since the previous frame)
        self.encoder_embed = PatchEmbed(enc_in, D, g, c, config.patch_padding)
        self.action_token_D = nn.Parameter(torch.zeros(D))  # prepended to every frame in the encoder
        self.encoder = STTransformer(config.st_config(config.encoder_depth, extra_tokens=1))
        self.to_code = nn.Linear(D, config.code_dim)
        self.latent_norm = LatentNorm(config.code_dim)
        self.quantizer = VectorQuantizer(
            num_codes=config.num_actions,
            code_dim=config.code_dim,
            beta=config.commitment_beta,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.decoder_embed = PatchEmbed(X, D, g, c, config.patch_padding)
        if config.action_conditioning == "film":
            # action -> (scale, shift) of the decoder's input tokens and (scale, shift) of its output tokens
            self.action_film = nn.Linear(config.code_dim, 4 * D)
            nn.init.normal_(self.action_film.weight, std=FILM_INIT_STD)
        else:
            self.action_film = nn.Linear(config.code_dim, D)  # "add": action added to every token of frame t
            nn.init.normal_(self.action_film.weight, std=0.02)
        nn.init.zeros_(self.action_film.bias)
        self.decoder = STTransformer(config.st_config(config.decoder_depth, extra_tokens=0))
        self.to_pixels = nn.Linear(D, X)  # the change of each patch from frame t to t+1
        for layer in (self.to_code, self.to_pixels):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.action_token_D, std=0.02)
        # Spatial positions start at zero (and are learned): early on both halves treat every place on screen
        # alike, so what the encoder reports is what moved and how, not where.
        with torch.no_grad():
            self.encoder.pos_spatial_ND.zero_()
            self.decoder.pos_spatial_ND.zero_()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # transformers leaves the buffers an older export lacks uninitialised: those of the latent normalisation's
        # phases start at "batch" (hf_init skips every tensor that was loaded)
        if isinstance(module, LatentNorm):
            for name in _NORM_COUNTERS:
                hf_init.zeros_(getattr(module, name))

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    def patchify(self, x_BTHWC: Tensor) -> Tensor:
        """(B, T, H, W, C) -> (B, T, N, P*P*C)."""
        P = self.config.patch_size
        return rearrange(x_BTHWC, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=P, p2=P)

    def unpatchify(self, x_BTNX: Tensor) -> Tensor:
        """(B, T, N, P*P*C) -> (B, T, H, W, C)."""
        P, g = self.config.patch_size, self.config.grid_size
        return rearrange(x_BTNX, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c", h=g, w=g, p1=P, p2=P)

    def centre(self, patches_BTNX: Tensor) -> Tensor:
        """Subtract each frame's mean colour (when ``centre_frames``): (B, T, N, X) -> (B, T, N, X)."""
        if not self.config.centre_frames:
            return patches_BTNX
        C = self.config.in_channels
        pixels = rearrange(patches_BTNX, "b t n (p c) -> b t (n p) c", c=C)
        return rearrange(pixels - pixels.mean(2, keepdim=True), "b t (n p) c -> b t n (p c)", n=patches_BTNX.shape[2])

    # ---- halves -------------------------------------------------------------------------------------------

    def action_features(self, patches_BTNX: Tensor) -> Tensor:
        """The encoder's output at each transition's action token: (B, T, N, X) in [-1, 1] -> (B, T-1, D).

        What :meth:`encode_latents` projects to the code space (and what a supervised probe of the encoder reads,
        ``scripts/action_probe.py --net lam``).
        """
        B, T = patches_BTNX.shape[:2]
        x_BTNX = self.centre(patches_BTNX)
        if self.config.motion_input:
            # frame t's change since frame t-1 (nothing for the first frame): causal, like the frames themselves
            motion_BTNX = torch.cat([torch.zeros_like(x_BTNX[:, :1]), x_BTNX[:, 1:] - x_BTNX[:, :-1]], dim=1)
            x_BTNX = torch.cat([x_BTNX, motion_BTNX], dim=-1)
        x_BTND = self.encoder_embed(x_BTNX)
        act_BT1D = repeat(self.action_token_D, "d -> b t 1 d", b=B, t=T).to(x_BTND.dtype)
        h_BTND = self.encoder(torch.cat([act_BT1D, x_BTND], dim=2))  # (B, T, 1+N, D)
        # frame t+1's action token has seen frames 1..t+1: it describes transition t -> t+1
        return h_BTND[:, 1:, 0]

    def encode_latents(self, patches_BTNX: Tensor, as_in_training: bool = False) -> Tensor:
        """Continuous action latents of transitions 1..T-1: (B, T, N, X) in [-1, 1] -> (B, T-1, Z).

        Normalised (:class:`LatentNorm`) and ready for the quantizer. ``as_in_training``: normalise as training
        mode does (:meth:`LatentNorm.as_in_training`, no statistics change) whatever the module's mode.
        """
        z_BTZ = self.to_code(self.action_features(patches_BTNX))  # (B, T-1, Z)
        return self.latent_norm.as_in_training(z_BTZ) if as_in_training else self.latent_norm(z_BTZ)

    def decode_next(self, patches_BTNX: Tensor, actions_BTZ: Tensor) -> Tensor:
        """Predict frames 2..T' from frames 1..T' and actions: (B, T', N, X), (B, T', Z) -> (B, T', N, X).

        Output t is frame t plus the predicted change, in [-1, 1] pixel units (not clamped).
        """
        x_BTND = self.decoder_embed(self.centre(patches_BTNX))
        cond_BT1E = self.action_film(actions_BTZ.to(x_BTND.dtype))[:, :, None, :]  # E = 4D (film) or D (add)
        if self.config.action_conditioning == "film":
            scale_in, shift_in, scale_out, shift_out = cond_BT1E.chunk(4, dim=-1)
            h_BTND = self.decoder(x_BTND * (1 + scale_in) + shift_in)
            h_BTND = h_BTND * (1 + scale_out) + shift_out
        else:
            h_BTND = self.decoder(x_BTND + cond_BT1E)
        return patches_BTNX + self.to_pixels(h_BTND)  # residual: copying frame t costs nothing

    # ---- API ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def infer_actions(self, frames: Tensor, as_in_training: bool = False) -> Tensor:
        """Latent action of every transition: frames (B, T, H, W, C) uint8 or float [0, 1] -> ids (B, T-1).

        Args:
            frames: the clips.
            as_in_training: the codes training mode would give this batch (before the latent normalisation is
                frozen they depend on the whole batch, see :class:`LatentNorm`), changing no statistics; the
                default is the module's own mode (eval mode: each clip on its own, as at inference).
        """
        if frames.shape[1] < 2:
            raise ValueError(f"need at least 2 frames to infer an action, got {frames.shape[1]}")
        latents = self.encode_latents(self.patchify(frames_to_unit(frames)), as_in_training=as_in_training)
        return self.quantizer.nearest(latents)

    @torch.no_grad()
    def predict_next(self, frames: Tensor, action_ids: Tensor) -> Tensor:
        """The decoder's guess of each next frame: frames (B, T, H, W, C), ids (B, T) -> (B, T, H, W, C) in [0, 1].

        ``action_ids[:, t]`` is applied after frame t; output t is the predicted frame t+1.
        """
        if action_ids.shape != frames.shape[:2]:
            raise ValueError(f"need one action per frame: frames {tuple(frames.shape)}, ids {tuple(action_ids.shape)}")
        if action_ids.numel() and (action_ids.min() < 0 or action_ids.max() >= self.num_actions):
            raise ValueError(f"action ids must be in [0, {self.num_actions}), got {action_ids.unique().tolist()}")
        codes_BTZ = self.quantizer.lookup(action_ids)
        pred = self.decode_next(self.patchify(frames_to_unit(frames)), codes_BTZ)
        return self.unpatchify((pred.float().clamp(-1, 1) + 1) / 2)

    def forward(self, frames: Tensor) -> LAMOutput:
        """Infer each transition's action and predict the next frame from the past and that action.

        Args:
            frames: (B, T, H, W, C) uint8, or float in [0, 1]; T >= 2.

        Returns:
            LAMOutput with ``loss = recon_loss + vq_loss`` to minimise.
        """
        if frames.shape[1] < 2:
            raise ValueError(f"the LAM needs clips of at least 2 frames, got {frames.shape[1]}")
        patches_BTNX = self.patchify(frames_to_unit(frames))  # (B, T, N, X) in [-1, 1]
        latents_BTZ = self.encode_latents(patches_BTNX)
        vq = self.quantizer(latents_BTZ)  # actions of the T-1 transitions
        pred_BTNX = self.decode_next(patches_BTNX[:, :-1], vq.quantized)  # (B, T-1, N, X): frames 2..T
        target_BTNX = patches_BTNX[:, 1:]
        recon_loss = F.mse_loss(pred_BTNX.float(), target_BTNX)
        recon = self.unpatchify((pred_BTNX.detach().float().clamp(-1, 1) + 1) / 2)
        return LAMOutput(
            recon=recon,
            loss=recon_loss + vq.loss,
            recon_loss=recon_loss,
            vq_loss=vq.loss,
            ids=vq.ids,
            usage=vq.usage,
            perplexity=vq.perplexity,
            latents=latents_BTZ,
        )

    def straight_through_actions(self, out: LAMOutput, temperature: float) -> Tensor:
        """The actions of :meth:`forward`'s output as weights a dynamics model reads: (B, T-1, A), float.

        The forward value is each transition's one-hot (exactly its id: the dynamics model sees what
        ``infer_actions`` would give it); the backward pass is that of softmax(cosine(latent, code) / temperature),
        so a loss on the dynamics model's predictions moves the encoder (and the codebook) towards the code that
        would have served that loss better. This is how the LAM trains through the dynamics loss
        (``DynamicsStage(lam_training="joint")``).
        """
        sim_BTA = F.normalize(out.latents.float(), dim=-1) @ self.quantizer.codes().T
        soft_BTA = (sim_BTA / temperature).softmax(dim=-1)
        hard_BTA = F.one_hot(out.ids, self.num_actions).to(soft_BTA.dtype)
        return hard_BTA + (soft_BTA - soft_BTA.detach())  # exactly the one-hot forward: the difference is 0


register_auto(LAMConfig, LatentActionModel)

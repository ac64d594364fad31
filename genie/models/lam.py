"""Latent action model (LAM): discover a few discrete actions that explain how one frame becomes the next.

Dimension keys:
    B: batch size
    T: frames;  T-1 transitions
    H, W: pixels;  h, w: patch grid (H / P, W / P)
    C: channels
    P: patch size
    N: patch tokens per frame (h * w)
    D: width
    Z: action code dimension
    A: number of latent actions (codebook size)

As in Genie, the LAM works on pixels and has two halves:

- **Encoder** sees frames x_1 .. x_T. Each frame gets one extra learned *action token* in front of its
  patches; the causal ST transformer lets frame t+1's action token look at frames 1..t+1, and its output
  is projected to Z and vector-quantized to one of A codes: the latent action a_t of transition t -> t+1.
- **Decoder** sees frames x_1 .. x_{T-1} and the quantized actions a_1 .. a_{T-1} only, and predicts
  x_2 .. x_T. The action is added to every token of frame t, and the decoder is causal in time, so
  the prediction of x_{t+1} can use x_1..x_t and a_t but never x_{t+1} itself: the A-way action code is the
  only path for "what changed".

Collapse guards (the most reported LAM failure): the quantizer matches l2-normalised codes by cosine
similarity (no code can drift out of reach), restarts codes unused for ``dead_code_threshold`` steps from
the worst-quantized encoder outputs, and the training stage reports code usage and perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig

from genie.models.blocks import STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel, register_auto
from genie.models.quantizer import VectorQuantizer
from genie.models.tokenizer import frames_to_unit


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
    commitment_beta: float = 0.25  # weight of the commitment loss
    dead_code_threshold: int = 50  # restart an action code after this many training steps unused (0: never)
    dropout: float = 0.0  # dropout in attention and residual branches
    qk_norm: bool = True  # RMSNorm on per-head queries/keys

    def __post_init__(self, **kwargs):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"width {self.width} / num_heads {self.num_heads} must be an even integer")
        if self.num_actions < 2:
            raise ValueError(f"num_actions must be >= 2, got {self.num_actions}")
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


class LatentActionModel(GeniePreTrainedModel):
    """Genie's latent action model (see the module docstring)."""

    config_class = LAMConfig
    main_input_name = "frames"

    def __init__(self, config: LAMConfig):
        super().__init__(config)
        D = config.width
        self.patch_embed = nn.Linear(config.patch_dim, D)
        self.action_token_D = nn.Parameter(torch.zeros(D))  # prepended to every frame in the encoder
        self.encoder = STTransformer(config.st_config(config.encoder_depth, extra_tokens=1))
        self.to_code = nn.Linear(D, config.code_dim)
        self.quantizer = VectorQuantizer(
            num_codes=config.num_actions,
            code_dim=config.code_dim,
            beta=config.commitment_beta,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.action_embed = nn.Linear(config.code_dim, D)  # quantized action -> added to frame t's tokens
        self.decoder = STTransformer(config.st_config(config.decoder_depth, extra_tokens=0))
        self.to_pixels = nn.Linear(D, config.patch_dim)
        for layer in (self.patch_embed, self.to_code, self.action_embed, self.to_pixels):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.action_token_D, std=0.02)
        self.post_init()

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

    # ---- halves -------------------------------------------------------------------------------------------

    def encode_latents(self, patches_BTNX: Tensor) -> Tensor:
        """Continuous action latents of transitions 1..T-1: (B, T, N, P*P*C) in [-1, 1] -> (B, T-1, Z)."""
        B, T = patches_BTNX.shape[:2]
        x_BTND = self.patch_embed(patches_BTNX)
        act_BT1D = repeat(self.action_token_D, "d -> b t 1 d", b=B, t=T).to(x_BTND.dtype)
        h_BTND = self.encoder(torch.cat([act_BT1D, x_BTND], dim=2))  # (B, T, 1+N, D)
        # frame t+1's action token has seen frames 1..t+1: it describes transition t -> t+1
        return self.to_code(h_BTND[:, 1:, 0])  # (B, T-1, Z)

    def decode_next(self, patches_BTNX: Tensor, actions_BTZ: Tensor) -> Tensor:
        """Predict frames 2..T' from frames 1..T' and actions: (B, T', N, X), (B, T', Z) -> (B, T', N, X)."""
        x_BTND = self.patch_embed(patches_BTNX) + self.action_embed(actions_BTZ)[:, :, None, :]
        return self.to_pixels(self.decoder(x_BTND))

    # ---- API ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def infer_actions(self, frames: Tensor) -> Tensor:
        """Latent action of every transition: frames (B, T, H, W, C) uint8 or float [0, 1] -> ids (B, T-1)."""
        if frames.shape[1] < 2:
            raise ValueError(f"need at least 2 frames to infer an action, got {frames.shape[1]}")
        return self.quantizer.nearest(self.encode_latents(self.patchify(frames_to_unit(frames))))

    @torch.no_grad()
    def predict_next(self, frames: Tensor, action_ids: Tensor) -> Tensor:
        """The decoder's guess of each next frame: frames (B, T, H, W, C), ids (B, T) -> (B, T, H, W, C) in [0, 1].

        ``action_ids[:, t]`` is applied after frame t; output t is the predicted frame t+1.
        """
        if action_ids.min() < 0 or action_ids.max() >= self.num_actions:
            raise ValueError(f"action ids must be in [0, {self.num_actions}), got {action_ids.unique().tolist()}")
        codes_BTZ = self.quantizer.lookup(action_ids).to(self.patch_embed.weight.dtype)
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
        vq = self.quantizer(self.encode_latents(patches_BTNX))  # actions of the T-1 transitions
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
        )


register_auto(LAMConfig, LatentActionModel)

"""Video tokenizer: an ST-ViViT VQ-VAE turning frames into a grid of discrete tokens and back.

Dimension keys:
    B: batch size
    T: frames
    H, W: pixels;  h, w: patch grid (H / P, W / P)
    C: channels
    P: patch size (pixels per side)
    N: tokens per frame (h * w)
    D: width
    Z: code dimension
    V: codebook size

Pipeline: frames -> patchify (B, T, N, P*P*C) -> linear to D -> causal ST encoder -> linear to Z ->
vector quantizer (ids (B, T, h, w)) -> linear to D -> causal ST decoder -> linear to P*P*C -> unpatchify.

With ``codebook="pixel"`` the codes are P x P x C pixel patches themselves (Z = P*P*C, matched by Euclidean
distance, k-means initialised on the first training batch) and both transformers are residual around them:
    z = patch + to_code(encoder(...)),   patch_hat = code + to_pixels(decoder(...))
with to_code / to_pixels zero-initialised, so training starts from a k-means patch quantizer (k-means alone: 27.6 dB
on CoinRun 64x64 at patch 4 with 1024 codes; 28.2 dB after the 30-minute CPU speedrun's 6 minutes of training) and
learns what context adds, where a latent codebook first has to learn to draw (23.5 dB after the same speedrun at
patch 8, no better than k-means on raw 8x8 patches).

Both ST stacks are causal in time, so frame t's tokens depend only on frames <= t and frame t's
reconstruction only on tokens of frames <= t: the dynamics model can tokenize and decode frame by frame
(with :meth:`VideoTokenizer.make_encoder_cache` / :meth:`VideoTokenizer.make_decoder_cache`).

Pixel convention: inputs are the loader's uint8 [B, T, H, W, C] (0..255), or floats already in [0, 1]
(e.g. decoded frames); the dtype decides. Internally pixels live in [-1, 1]; the reconstruction loss is the
MSE there. Outputs (``recon``, :meth:`VideoTokenizer.decode`) are float in [0, 1], [B, T, H, W, C].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import PreTrainedConfig

from genie.models.blocks import KVCache, RingKVCache, STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel
from genie.models.quantizer import VectorQuantizer


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class TokenizerConfig(PreTrainedConfig):
    """Video tokenizer hyper-parameters; exactly the model fields of ``config.json``.

    Defaults follow the Genie CoinRun case study (64x64 frames, 16-frame clips, patch 4, 1024 codes of dim 32).
    """

    model_type = "genie_tokenizer"

    image_size: int = 64  # H = W of the (square) input frames
    in_channels: int = 3  # C
    patch_size: int = 4  # P: each P x P patch is one token, so N = (image_size / P)^2
    num_frames: int = 16  # temporal attention window in frames (= training clip length); longer clips slide
    width: int = 512  # D: transformer width of encoder and decoder
    encoder_depth: int = 8  # ST blocks in the encoder
    decoder_depth: int = 8  # ST blocks in the decoder
    num_heads: int = 8  # attention heads (width / num_heads must be even, for RoPE)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    code_dim: int = 32  # Z: dimension of the (l2-normalised) codes; unused by codebook "pixel" (Z = P*P*C there)
    num_codes: int = 1024  # V: codebook size
    # "latent": l2-normalised codes of dim code_dim in a learned latent space (VQGAN-style); "pixel": codes are pixel
    # patches, matched by Euclidean distance and k-means initialised, with encoder and decoder residual around them
    codebook: str = "latent"
    kmeans_iters: int = 10  # Lloyd iterations of the pixel codebook's k-means initialisation on the first batch
    commitment_beta: float = 0.25  # weight of the commitment loss
    dead_code_threshold: int = 100  # restart a code after this many training steps unused (0: never)
    dropout: float = 0.0  # dropout in attention and residual branches
    qk_norm: bool = True  # RMSNorm on per-head queries/keys

    def __post_init__(self, **kwargs):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"width {self.width} / num_heads {self.num_heads} must be an even integer")
        if self.codebook not in ("latent", "pixel"):
            raise ValueError(f"codebook must be 'latent' or 'pixel', got {self.codebook!r}")
        super().__post_init__(**kwargs)

    @property
    def quantizer_dim(self) -> int:
        """Z as the quantizer sees it: code_dim, or P * P * C for the pixel codebook."""
        return self.patch_dim if self.codebook == "pixel" else self.code_dim

    @property
    def grid_size(self) -> int:
        """h = w, patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N, tokens per frame."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """P * P * C, pixel values per patch."""
        return self.patch_size**2 * self.in_channels

    def st_config(self, depth: int) -> STTransformerConfig:
        """The :class:`STTransformerConfig` of an encoder/decoder stack with ``depth`` blocks."""
        return STTransformerConfig(
            width=self.width,
            depth=depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_spatial_tokens=self.num_patches,
            max_frames=self.num_frames,
            dropout=self.dropout,
            qk_norm=self.qk_norm,
        )


@dataclass
class TokenizerOutput:
    """Result of :meth:`VideoTokenizer.forward`."""

    recon: Tensor  # (B, T, H, W, C) float in [0, 1], detached (for metrics and logging)
    loss: Tensor  # () recon_loss + vq_loss, the training objective
    recon_loss: Tensor  # () MSE in [-1, 1] pixel space
    vq_loss: Tensor  # () codebook + beta * commitment loss
    ids: Tensor  # (B, T, h, w) long token ids
    usage: Tensor  # () fraction of codes used in the batch
    perplexity: Tensor  # () codebook perplexity of the batch


def frames_to_unit(frames_BTHWC: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] frames -> float32 in [-1, 1] (same shape)."""
    if frames_BTHWC.dtype == torch.uint8:
        return frames_BTHWC.float() / 127.5 - 1.0
    return frames_BTHWC.float() * 2.0 - 1.0


class VideoTokenizer(GeniePreTrainedModel):
    """ST-ViViT VQ-VAE video tokenizer (see the module docstring)."""

    config_class = TokenizerConfig
    main_input_name = "frames"

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        self.patch_embed = nn.Linear(config.patch_dim, config.width)
        self.encoder = STTransformer(config.st_config(config.encoder_depth))
        pixel = config.codebook == "pixel"
        self.to_code = nn.Linear(config.width, config.quantizer_dim)
        self.quantizer = VectorQuantizer(
            num_codes=config.num_codes,
            code_dim=config.quantizer_dim,
            beta=config.commitment_beta,
            dead_code_threshold=config.dead_code_threshold,
            metric="euclidean" if pixel else "cosine",
            kmeans_iters=config.kmeans_iters if pixel else 0,
        )
        self.from_code = nn.Linear(config.quantizer_dim, config.width)
        self.decoder = STTransformer(config.st_config(config.decoder_depth))
        self.to_pixels = nn.Linear(config.width, config.patch_dim)
        for layer in (self.patch_embed, self.to_code, self.from_code, self.to_pixels):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if pixel:  # residual branches start closed: the k-means code is the first guess of every patch
            nn.init.zeros_(self.to_code.weight)
            nn.init.zeros_(self.to_pixels.weight)
        self.post_init()

    # ---- shapes -------------------------------------------------------------------------------------------

    def patchify(self, x_BTHWC: Tensor) -> Tensor:
        """(B, T, H, W, C) -> (B, T, N, P*P*C)."""
        P = self.config.patch_size
        return rearrange(x_BTHWC, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=P, p2=P)

    def unpatchify(self, x_BTNX: Tensor) -> Tensor:
        """(B, T, N, P*P*C) -> (B, T, H, W, C)."""
        P, g = self.config.patch_size, self.config.grid_size
        return rearrange(x_BTNX, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c", h=g, w=g, p1=P, p2=P)

    def make_encoder_cache(self) -> KVCache:
        """KV cache for tokenizing a video frame by frame with :meth:`encode`."""
        return self.encoder.make_cache()

    def make_decoder_cache(self, ring: bool = False) -> KVCache | RingKVCache:
        """KV cache for decoding tokens frame by frame with :meth:`decode`; ``ring``: fixed shapes (one frame a call,
        compilable; :class:`~genie.models.blocks.RingKVCache`)."""
        return self.decoder.make_cache(ring=ring)

    # ---- halves -------------------------------------------------------------------------------------------

    def encode_latents(self, frames: Tensor, cache: KVCache | None = None, update_cache: bool = True) -> Tensor:
        """Continuous (pre-quantization) latents: frames (B, T, H, W, C) -> (B, T, N, Z)."""
        patches_BTNX = self.patchify(frames_to_unit(frames)).to(self.patch_embed.weight.dtype)
        z_BTNZ = self.to_code(self.encoder(self.patch_embed(patches_BTNX), cache=cache, update_cache=update_cache))
        return patches_BTNX + z_BTNZ if self.config.codebook == "pixel" else z_BTNZ

    def decode_latents(self, codes_BTNZ: Tensor, cache: KVCache | None = None, update_cache: bool = True) -> Tensor:
        """Quantized codes (B, T, N, Z) -> predicted patches (B, T, N, P*P*C) in [-1, 1] (unclamped)."""
        x_BTND = self.decoder(self.from_code(codes_BTNZ), cache=cache, update_cache=update_cache)
        patches_BTNX = self.to_pixels(x_BTND)
        return codes_BTNZ + patches_BTNX if self.config.codebook == "pixel" else patches_BTNX

    @torch.no_grad()
    def encode(self, frames: Tensor, cache: KVCache | None = None, update_cache: bool = True) -> Tensor:
        """Tokenize: frames (B, T, H, W, C) uint8 or float in [0, 1] -> ids (B, T, h, w) long.

        No side effects on the codebook (unlike a training-mode forward). Pass a cache from
        :meth:`make_encoder_cache` to feed a video a few frames at a time.
        """
        ids_BTN = self.quantizer.nearest(self.encode_latents(frames, cache, update_cache))
        return rearrange(ids_BTN, "b t (h w) -> b t h w", h=self.config.grid_size)

    @torch.no_grad()
    def decode(self, ids_BThw: Tensor, cache: KVCache | None = None, update_cache: bool = True) -> Tensor:
        """Detokenize: ids (B, T, h, w) long -> frames (B, T, H, W, C) float in [0, 1].

        Pass a cache from :meth:`make_decoder_cache` to decode one new frame at a time.
        """
        codes_BTNZ = self.quantizer.lookup(rearrange(ids_BThw, "b t h w -> b t (h w)"))
        return self.decode_codes(codes_BTNZ, cache, update_cache)

    @torch.no_grad()
    def decode_codes(self, codes_BTNZ: Tensor, cache: KVCache | None = None, update_cache: bool = True) -> Tensor:
        """Decode code vectors (B, T, N, Z), the codebook's or any continuous ones (the diffusion dynamics kind's),
        -> frames (B, T, H, W, C) float in [0, 1]."""
        patches_BTNX = self.decode_latents(codes_BTNZ.to(self.from_code.weight.dtype), cache, update_cache)
        return self.unpatchify((patches_BTNX.float().clamp(-1, 1) + 1) / 2)

    # ---- training -----------------------------------------------------------------------------------------

    def forward(self, frames: Tensor) -> TokenizerOutput:
        """Reconstruct a clip through the quantized bottleneck.

        Args:
            frames: (B, T, H, W, C) uint8, or float in [0, 1].

        Returns:
            TokenizerOutput with ``loss = recon_loss + vq_loss`` to minimise.
        """
        target_BTNX = self.patchify(frames_to_unit(frames))  # (B, T, N, P*P*C) in [-1, 1]
        vq = self.quantizer(self.encode_latents(frames))
        pred_BTNX = self.decode_latents(vq.quantized)
        recon_loss = F.mse_loss(pred_BTNX.float(), target_BTNX)
        recon = self.unpatchify((pred_BTNX.detach().float().clamp(-1, 1) + 1) / 2)
        return TokenizerOutput(
            recon=recon,
            loss=recon_loss + vq.loss,
            recon_loss=recon_loss,
            vq_loss=vq.loss,
            ids=rearrange(vq.ids, "b t (h w) -> b t h w", h=self.config.grid_size),
            usage=vq.usage,
            perplexity=vq.perplexity,
        )

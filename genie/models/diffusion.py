"""Diffusion dynamics model: diffusion forcing over the tokenizer's continuous code vectors, over the ST transformer.

Dimension keys:
    B: batch size
    T: frames
    N: tokens per frame (h * w of the tokenizer's grid)
    Z: the tokenizer's code dimension (the latent of one token)
    D: width
    A: number of latent actions

Latents. Each token of a frame is a Z-dim vector: the tokenizer's code vector of its token id (its codebook is
l2-normalised, so a vector has norm 1 and components of about 1/sqrt(Z); they are scaled by sqrt(Z) to unit
variance). A generated frame is decoded by the tokenizer's decoder straight from the predicted vectors
(:meth:`genie.models.tokenizer.VideoTokenizer.decode_codes`), with no snapping to the codebook. Why the code
vectors and not the encoder's pre-quantization outputs: token shards (``genie prep tokenize``) hold the ids, so
the codes cost nothing to read, and on the tiny sprites tokenizer decoding the encoder's l2-normalised outputs
reconstructed no better than decoding the codes (49.67 against 49.76 dB; the raw outputs 30.65 dB: the decoder
only ever saw unit-norm vectors; docs/architecture.md, "Dynamics kinds").

Training (diffusion forcing, flow matching): every frame gets its own noise level t ~ U(0, 1) and its input is
x_t = (1 - t) x_0 + t eps (eps ~ N(0, I)); the first frame is always clean (t = 0, the prompt of generation), and
a ``clean_prefix_prob`` share of the clips keep a clean prefix of 1..T-1 frames (generation always denoises a
frame after clean past frames, as in the MaskGIT model's regime). The model predicts x_0 of every frame (mean
squared error over the frames with t > 0); t enters each frame as a learned embedding of its sinusoidal features,
added to every token, and the action a_{t-1} conditions frame t as in the other kinds (FiLM by default).
Temporal attention is causal, so a frame's prediction reads only its past (noisy or clean).

Generation (:class:`DiffusionSampler`): past frames are clean and live in the ring KV cache (computed once at
t = 0); a new frame starts from noise at t = 1 and takes ``SamplerConfig.steps`` Euler steps of the flow
(t_k = 1 - k / S): from the x_0 prediction x0, x_{t'} = x0 + (t' / t)(x_t - x0), which is the probability-flow ODE
step of this rectified flow written with x_0; the last step lands on x0. Why flow matching with x_0 prediction
rather than a shortcut or consistency objective: it needs no second model or target network, trains with one
plain regression loss, and on these latents a handful of Euler steps already reaches its quality (docs: the
sampler-steps row); a shortcut objective is the next step for one- or two-step sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, final

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn

from genie.models.blocks import RingKVCache
from genie.models.conditioning import (
    DynamicsBase,
    DynamicsCommonConfig,
    action_embedding,
    at_least_fp32,
    check_actions,
    condition_input,
    condition_output,
    embed_actions,
    init_action_embedding,
    init_neighbours,
    lead_with_no_action,
    mix_neighbours,
    neighbour_conv,
)
from genie.models.hub import register_auto

DIFFUSION_CONDITIONINGS = ("film", "add")
NOISE_FEATURES = 64  # sinusoidal features of the noise level


@final  # a plain group of fields to the CLI (jsonargparse), not a class to pick subclasses of
@strict
class DiffusionDynamicsConfig(DynamicsCommonConfig):
    """Diffusion dynamics model hyper-parameters (with the common fields of every kind, DynamicsCommonConfig in
    genie/models/conditioning.py; ``num_codes`` is only checked against the tokenizer); exactly the model fields of
    ``config.json``."""

    model_type = "genie_diffusion_dynamics"
    conditionings: ClassVar[tuple[str, ...]] = DIFFUSION_CONDITIONINGS

    kind: Literal["diffusion"] = "diffusion"  # the dynamics kind: diffusion forcing over continuous latents
    code_dim: int = 32  # Z: the tokenizer's code dimension, the latent of one token
    # share of training clips whose first 1..T-1 frames (uniform) are clean; the others only the first frame
    clean_prefix_prob: float = 0.5

    def __post_init__(self, **kwargs):
        if not 0.0 <= self.clean_prefix_prob <= 1.0:
            raise ValueError(f"clean_prefix_prob must be in [0, 1], got {self.clean_prefix_prob}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        super().__post_init__(**kwargs)

    @property
    def latent_scale(self) -> float:
        """Unit-norm code vectors times this have unit variance per component."""
        return math.sqrt(self.code_dim)


@dataclass
class DiffusionOutput:
    """Result of :meth:`DiffusionDynamicsModel.forward`."""

    prediction: Tensor  # (B, T, N, Z) predicted clean latents (in code units)
    loss: Tensor  # () mean squared error of the scaled latents over the noised frames
    noise_BT: Tensor  # (B, T) each frame's noise level t (0: clean)


def noise_features(t_BT: Tensor) -> Tensor:
    """Sinusoidal features of noise levels in [0, 1]: (B, T) -> (B, T, NOISE_FEATURES)."""
    half = NOISE_FEATURES // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t_BT.device, dtype=torch.float32) / half)
    angles = (t_BT.float() * 1000.0)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DiffusionDynamicsModel(DynamicsBase):
    """Diffusion-forcing dynamics model (see the module docstring)."""

    config_class = DiffusionDynamicsConfig
    main_input_name = "latents"

    def __init__(self, config: DiffusionDynamicsConfig):
        super().__init__(config)
        D, Z = config.width, config.code_dim
        self.latent_in = nn.Linear(Z, D)
        self.noise_embed = nn.Sequential(nn.Linear(NOISE_FEATURES, D), nn.SiLU(), nn.Linear(D, D))
        # actions 0..A-1, and A = "no action" (the first frame of a clip)
        self.action_embed = action_embedding(config.num_actions + 1, D, config.action_conditioning == "film")
        self.transformer = self.make_stack(config.tokens_per_frame, config.num_frames)
        self.latent_out = nn.Linear(D, Z)
        self.neighbours = neighbour_conv(D, config.spatial_context)
        init_neighbours(self.neighbours)
        init_action_embedding(self.action_embed, D, config.action_conditioning == "film")
        nn.init.zeros_(self.latent_out.weight)  # starts predicting x_0 = 0, the mean of the scaled latents
        nn.init.zeros_(self.latent_out.bias)
        self.post_init()

    def lead_actions(self, actions_BT: Tensor) -> Tensor:
        """Action leading to each frame: (B, T-1) -> (B, T), "no action" (A) for the first frame (or weights)."""
        return lead_with_no_action(actions_BT, self.config.num_actions)

    def denoise(
        self,
        x_BTNZ: Tensor,
        t_BT: Tensor,
        lead_BT: Tensor,
        cache: RingKVCache | None = None,
        update_cache: bool = False,
    ) -> Tensor:
        """Clean scaled latents (B, T, N, Z) predicted from noised ones at levels ``t_BT`` (after cached frames)."""
        x_BTND = mix_neighbours(self.neighbours, self.latent_in(x_BTNZ), self.config.grid_size)
        x_BTND = x_BTND + self.noise_embed(noise_features(t_BT).to(x_BTND.dtype))[:, :, None]
        a_BTX = embed_actions(self.action_embed, lead_BT)
        h_BTND = self.transformer(
            condition_input(x_BTND, a_BTX, self.config.action_conditioning), cache=cache, update_cache=update_cache
        )
        return self.latent_out(condition_output(h_BTND, a_BTX, self.config.action_conditioning))

    def noise_levels(self, B: int, T: int, device: torch.device, generator=None) -> Tensor:
        """Training noise levels (B, T): U(0, 1) per frame; the first frame, and a clean prefix of 1..T-1 frames
        for a ``clean_prefix_prob`` share of the clips, at 0."""
        t_BT = torch.rand(B, T, device=device, generator=generator)
        start_B = torch.ones(B, dtype=torch.long, device=device)
        if self.config.clean_prefix_prob > 0 and T > 2:
            prefixed_B = torch.rand(B, device=device, generator=generator) < self.config.clean_prefix_prob
            length_B = torch.randint(1, T, (B,), device=device, generator=generator)
            start_B = torch.where(prefixed_B, length_B, start_B)
        return t_BT.masked_fill(torch.arange(T, device=device) < start_B[:, None], 0.0)

    def forward(self, latents: Tensor, actions: Tensor, noise_BT: Tensor | None = None) -> DiffusionOutput:
        """Diffusion-forcing loss of a clip.

        Args:
            latents: (B, T, N, Z) code vectors of the clip's tokens (unit norm, as the tokenizer's codebook).
            actions: (B, T-1) long actions; ``actions[:, t]`` leads from frame t to frame t+1 (or weights
                (B, T-1, A), see :func:`~genie.models.conditioning.check_actions`).
            noise_BT: optional (B, T) noise levels instead of the random training ones.

        Returns:
            DiffusionOutput with the mean squared error of the scaled latents over the noised frames.
        """
        B, T, N, Z = latents.shape
        check_actions(actions, B, T)
        x0_BTNZ = latents * self.config.latent_scale
        t_BT = self.noise_levels(B, T, latents.device) if noise_BT is None else noise_BT
        eps_BTNZ = torch.randn_like(x0_BTNZ)
        t_BT11 = t_BT[:, :, None, None].to(x0_BTNZ.dtype)
        x_BTNZ = (1 - t_BT11) * x0_BTNZ + t_BT11 * eps_BTNZ
        pred_BTNZ = self.denoise(x_BTNZ, t_BT, self.lead_actions(actions))
        noised_BT = t_BT > 0
        err_BT = (at_least_fp32(pred_BTNZ) - at_least_fp32(x0_BTNZ)).pow(2).mean(dim=(2, 3))
        loss = (err_BT * noised_BT).sum() / noised_BT.sum().clamp(min=1)
        return DiffusionOutput(prediction=pred_BTNZ / self.config.latent_scale, loss=loss, noise_BT=t_BT)

    def next_frame_output(self, latents: Tensor, actions: Tensor) -> DiffusionOutput:
        """The last frame from pure noise (t = 1) after its clean past: the one-step prediction's error."""
        B, T = latents.shape[:2]
        t_BT = torch.zeros(B, T, device=latents.device)
        t_BT[:, -1] = 1.0
        return self(latents, actions, noise_BT=t_BT)


class DiffusionSampler:
    """Frame-by-frame sampler of a :class:`DiffusionDynamicsModel`: the other samplers' interface, over latents.

    ``reset`` and ``append`` take frames as latents (B, T, N, Z) / (B, N, Z), or as token ids (B, T, N) / (B, N)
    when the sampler has the tokenizer's ``codebook`` (V, Z) (what :func:`genie.models.kinds.make_sampler` gives
    it); ``next_frame`` returns the new frame's latents (B, N, Z) (code units, for
    :meth:`~genie.models.tokenizer.VideoTokenizer.decode_codes`), and ``next_frame_logits`` scores the codebook
    against the one-step prediction (its argmax: the nearest code), for teacher-forced token accuracy. Of the
    :class:`~genie.models.sampler.SamplerConfig` fields, ``steps`` is the number of denoising steps and
    ``temperature`` scales the starting noise (0: a deterministic start at the mean, 1: the trained distribution);
    ``unmask`` is MaskGIT's and ignored; the cache is always used; ``compile`` is refused (not compiled yet).
    """

    def __init__(self, model: DiffusionDynamicsModel, config=None, codebook: Tensor | None = None):
        from genie.models.sampler import SamplerConfig

        self.model = model
        self.codebook_VZ = codebook
        self.config = config or SamplerConfig()
        if self.config.compile:
            raise ValueError("compile is not available for the diffusion dynamics kind yet: drop --compile")
        if not self.config.use_cache:
            raise ValueError("the diffusion sampler always reads its KV cache: drop use_cache=False / nocache")
        if self.config.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.config.steps}")
        self.cache: RingKVCache | None = None
        self.history_BTNZ: Tensor | None = None  # a window of the frames so far (code units), for callers to read

    def latents(self, frames: Tensor) -> Tensor:
        """Frames as latents: float (..., Z) as they are, token ids (...) through the codebook."""
        if frames.is_floating_point():
            return frames
        if self.codebook_VZ is None:
            raise ValueError("this diffusion sampler has no codebook: give latents, or make it with the tokenizer")
        return F.embedding(frames, self.codebook_VZ)

    @torch.no_grad()
    def reset(self, frames_BTN: Tensor, actions_BT: Tensor | None = None) -> None:
        """Start new sequences from T >= 1 context frames (latents or ids) and the T-1 actions between them."""
        from genie.models.sampler import context_of

        latents_BTNZ, actions_BT = context_of(self.latents(frames_BTN), actions_BT, grid=False)
        B, T = latents_BTNZ.shape[:2]
        self.cache = self.model.transformer.make_cache(ring=True)
        x_BTNZ = latents_BTNZ * self.model.config.latent_scale
        zeros_BT = torch.zeros(B, T, device=x_BTNZ.device)
        self.model.denoise(x_BTNZ, zeros_BT, self.model.lead_actions(actions_BT), self.cache, update_cache=True)
        self.history_BTNZ = latents_BTNZ[:, -self.model.config.num_frames :]

    @torch.no_grad()
    def next_frame(self, actions_B: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample the next frame of every sequence under ``actions_B`` (B,) and append it: latents (B, N, Z)."""
        if self.history_BTNZ is None:
            raise RuntimeError("call reset(context) first")
        A = self.model.num_actions
        if actions_B.min() < 0 or actions_B.max() >= A:
            raise ValueError(f"actions must be in [0, {A}), got {actions_B.tolist()}")
        B, _, N, Z = self.history_BTNZ.shape
        device = self.history_BTNZ.device
        noise = torch.randn(B, N, Z, device=device, generator=generator).to(self.history_BTNZ.dtype)
        x_BNZ = noise * self.config.temperature
        S = self.config.steps
        for k in range(S):
            t, t_next = 1 - k / S, 1 - (k + 1) / S
            x0_BNZ = self._predict(x_BNZ, t, actions_B)
            x_BNZ = x0_BNZ + (t_next / t) * (x_BNZ - x0_BNZ)  # the last step (t_next = 0) lands on x0
        frame_BNZ = (x_BNZ / self.model.config.latent_scale).to(self.history_BTNZ.dtype)
        self.append(frame_BNZ, actions_B)
        return frame_BNZ

    def _predict(self, x_BNZ: Tensor, t: float, actions_B: Tensor) -> Tensor:
        assert self.cache is not None
        t_B1 = torch.full((x_BNZ.shape[0], 1), t, device=x_BNZ.device)
        return self.model.denoise(x_BNZ[:, None], t_B1, actions_B[:, None], self.cache)[:, 0]

    @torch.no_grad()
    def next_frame_prediction(self, actions_B: Tensor) -> Tensor:
        """The one-step prediction of the next frame from pure noise (t = 1) with a zero start: latents (B, N, Z)."""
        assert self.history_BTNZ is not None
        B, _, N, Z = self.history_BTNZ.shape
        x_BNZ = self.history_BTNZ.new_zeros(B, N, Z)
        return self._predict(x_BNZ, 1.0, actions_B) / self.model.config.latent_scale

    @torch.no_grad()
    def next_frame_logits(self, actions_B: Tensor, frame_BN: Tensor | None = None) -> Tensor:
        """Teacher forcing, the interface every kind's sampler has: scores (B, N, V) of the codebook against the
        one-step prediction (cosine similarity; the argmax is the nearest code). The true frame is not read."""
        if self.codebook_VZ is None:
            raise ValueError("this diffusion sampler has no codebook to score: make it with the tokenizer")
        pred_BNZ = F.normalize(at_least_fp32(self.next_frame_prediction(actions_B)), dim=-1)
        return pred_BNZ @ F.normalize(self.codebook_VZ.to(pred_BNZ.dtype), dim=-1).T

    @torch.no_grad()
    def append(self, frame_BN: Tensor, actions_B: Tensor) -> None:
        """Commit a frame (latents or ids; sampled, or the true one for teacher forcing) reached under ``actions_B``."""
        assert self.cache is not None and self.history_BTNZ is not None
        frame_BNZ = self.latents(frame_BN).to(self.history_BTNZ.dtype)
        x_B1NZ = frame_BNZ[:, None] * self.model.config.latent_scale
        zeros_B1 = torch.zeros(frame_BNZ.shape[0], 1, device=frame_BNZ.device)
        self.model.denoise(x_B1NZ, zeros_B1, actions_B[:, None], self.cache, update_cache=True)
        self.history_BTNZ = torch.cat([self.history_BTNZ, frame_BNZ[:, None]], 1)[:, -self.model.config.num_frames :]


register_auto(DiffusionDynamicsConfig, DiffusionDynamicsModel)

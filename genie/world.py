"""The World: a trained tokenizer, LAM and dynamics model as one steppable, controllable environment.

Dimension keys: B batch, T frames, F generated frames, H W pixels, C channels, h w token grid,
N tokens per frame (h * w), A latent actions.

A world bundle is a folder with one exported model per part (``genie export world`` writes it)::

    WORLD/world.json         {"format": "genie-world", "version": 1, "parts": {...}, "sampler": {...}}
    WORLD/tokenizer/         config.json + model.safetensors   (VideoTokenizer)
    WORLD/lam/               config.json + model.safetensors   (LatentActionModel)
    WORLD/dynamics/          config.json + model.safetensors   (a dynamics model of any kind: genie/models/kinds.py)
    WORLD/adapter/           optional: config.json + model.safetensors (ActionAdapter: robot action -> latent)

Stepping: the prompt frames are tokenized; each :meth:`World.step` samples the next frame's tokens with the
dynamics kind's sampler (MaskGIT's :class:`~genie.models.sampler.MaskGITSampler` or the causal model's
:class:`~genie.models.causal.CausalSampler`, whose KV caches hold the past frames) and decodes only that
frame with the tokenizer's decoder, which keeps its own KV cache of past frames. So a step costs one frame of
dynamics and decoder compute, however long the rollout.

Rendering (``SamplerConfig.keep_pixels``, on by default): a patch whose token is the same as in the frame before
keeps that frame's pixels (:func:`keep_unchanged`); only the patches whose tokens changed show the decoder's output.
So the prompt's real pixels survive wherever the world says nothing happened, instead of being replaced by the
tokenizer's reconstruction, and a patch that stays put does not shimmer as the decoder's context moves on. It
applies to the token kinds (maskgit, causal); the diffusion kind's continuous latents never repeat exactly, so its
frames are decoded whole.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import repeat
from torch import Tensor

from genie.data.loader import DataError
from genie.models.adapter import ActionAdapter
from genie.models.blocks import RingKVCache
from genie.models.hub import read_json
from genie.models.kinds import (
    DYNAMICS_MODELS,
    AnyDynamics,
    check_sampler,
    decode_new_frame,
    kind_of,
    load_dynamics,
    make_sampler,
)
from genie.models.lam import LatentActionModel
from genie.models.sampler import SamplerConfig, compile_step
from genie.models.tokenizer import VideoTokenizer
from genie.runtime import flush_denormals
from genie.stages.media import to_uint8

WORLD_FORMAT = "genie-world"
WORLD_VERSION = 1
PARTS = ("tokenizer", "lam", "dynamics")


def check_compatible(tokenizer: Any, lam: Any, dynamics: Any) -> None:
    """Raise ValueError naming the mismatch when three model configs cannot form a world.

    Accepts the models or their configs (anything with the config fields).
    """
    tok, la, dyn = (getattr(m, "config", m) for m in (tokenizer, lam, dynamics))
    problems = []
    if dyn.num_codes != tok.num_codes:
        problems.append(f"dynamics num_codes={dyn.num_codes} but the tokenizer has {tok.num_codes} codes")
    if dyn.grid_size != tok.grid_size:
        problems.append(f"dynamics grid_size={dyn.grid_size} but the tokenizer's grid is {tok.grid_size}")
    if getattr(dyn, "action_source", "latent") == "latent" and dyn.num_actions != la.num_actions:
        problems.append(f"dynamics num_actions={dyn.num_actions} but the LAM has {la.num_actions} actions")
    if la.image_size != tok.image_size:
        problems.append(f"LAM image_size={la.image_size} but the tokenizer's is {tok.image_size}")
    if kind_of(dyn) == "diffusion":  # it predicts the tokenizer's code vectors
        if getattr(tok, "codebook", "latent") != "latent":
            problems.append("the diffusion dynamics needs a tokenizer with a latent codebook (codebook='latent')")
        elif dyn.code_dim != tok.code_dim:
            problems.append(f"dynamics code_dim={dyn.code_dim} but the tokenizer's codes have {tok.code_dim}")
    if problems:
        raise ValueError("models do not fit together: " + "; ".join(problems))


def discrete_actions(batch: dict[str, Any], where: str) -> Tensor:
    """A batch's own discrete actions (B, T-1) long, for a true-action world; a one-line DataError otherwise."""
    actions = batch.get("actions")
    if actions is None or actions.is_floating_point():
        what = "no actions.npy" if actions is None else "continuous actions"
        raise DataError(
            f"{where} has {what}, but a world on true actions (action_source=true) needs the clips' discrete "
            "actions: use shards with integer actions.npy"
        )
    return actions.long()


class World:
    """A learned interactive environment driven by latent actions.

    Usage::

        world = World.from_pretrained("runs/world", seed=0)
        frame = world.reset(prompt_uint8_HW3)          # or a (T, H, W, 3) clip as context
        frame = world.step(3)                          # uint8 (H, W, 3)
        frame = world.step(robot_action=[0.1, 0, 0, 1])  # with an action adapter (robot fine-tuning)
        ids = world.infer_actions(video_uint8_THW3)    # latent action of each transition

    Args:
        tokenizer, lam, dynamics: the three trained models (eval mode is set here).
        sampler: sampling settings (``steps`` and ``unmask`` are MaskGIT's; see the kind's sampler).
        device: where the models run.
        seed: seed of the sampling generator (see :meth:`seed`).
        adapter: optional action adapter mapping a robot's real actions to latent actions.
    """

    def __init__(
        self,
        tokenizer: VideoTokenizer,
        lam: LatentActionModel,
        dynamics: AnyDynamics,
        sampler: SamplerConfig | None = None,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        adapter: ActionAdapter | None = None,
    ):
        check_compatible(tokenizer, lam, dynamics)
        flush_denormals()  # subnormal floats are 10-100x slower on CPUs (genie/runtime.py)
        if adapter is not None and adapter.config.num_actions != dynamics.num_actions:
            raise ValueError(
                f"adapter num_actions={adapter.config.num_actions} but the world has {dynamics.num_actions} actions"
            )
        self.device = torch.device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.lam = lam.to(self.device).eval()
        self.dynamics = dynamics.to(self.device).eval()
        self.adapter = None if adapter is None else adapter.to(self.device).eval()
        self.sampler_config = sampler or SamplerConfig()
        check_sampler(self.dynamics, self.sampler_config)  # e.g. compile with a kind that has no compiled step
        self.generator = torch.Generator(device=self.device)
        self.seed(seed)
        self._sampler: Any = None  # the kind's sampler (genie.models.kinds.make_sampler), made by begin
        self._decoder_cache: RingKVCache | None = None
        self._decode_new = self.decode_new  # compiled with the sampler's steps when the sampler compiles (begin)
        # keep_pixels' state: the frame on screen (B, H, W, C) uint8 and the token ids it shows (B, N)
        self._screen_BHWC: Tensor | None = None
        self._screen_ids_BN: Tensor | None = None

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        sampler: SamplerConfig | None = None,
        seed: int | None = None,
    ) -> World:
        """Load a world bundle folder (see the module docstring); ValueError names any missing part."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"world bundle {path} does not exist (make one with `genie export world`)")
        missing = [
            f"{p}/{f}" for p in PARTS for f in ("config.json", "model.safetensors") if not (path / p / f).is_file()
        ]
        if missing:
            raise ValueError(f"world bundle {path} is missing {', '.join(missing)}: re-run `genie export world`")
        meta: dict[str, Any] = {}
        if (path / "world.json").is_file():
            meta = read_json(path / "world.json")  # a damaged one: DamagedFileError naming it
        if sampler is None:
            sampler = SamplerConfig(**meta.get("sampler", {}))
        adapter = None
        if (path / "adapter" / "config.json").is_file():
            adapter = ActionAdapter.from_pretrained(path / "adapter")
        return cls(
            VideoTokenizer.from_pretrained(path / "tokenizer"),
            LatentActionModel.from_pretrained(path / "lam"),
            load_dynamics(path / "dynamics"),
            sampler=sampler,
            device=device,
            seed=seed,
            adapter=adapter,
        )

    def fork(self, seed: int | None = None, sampler: SamplerConfig | None = None) -> World:
        """A World that shares this one's models (no copy) but has its own episode and sampling generator.

        Use one fork per concurrent episode (e.g. per browser tab in ``genie play``); forks must not step
        at the same time from several threads unless the caller serialises model calls. ``sampler``: other
        sampling settings for the fork (default: this world's).
        """
        sampler = sampler or self.sampler_config
        return World(self.tokenizer, self.lam, self.dynamics, sampler, self.device, seed, self.adapter)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write this world as a bundle folder."""
        return write_bundle(path, self.tokenizer, self.lam, self.dynamics, self.sampler_config, self.adapter)

    # -- properties -----------------------------------------------------------------------------------

    @property
    def num_actions(self) -> int:
        """A: the latent actions :meth:`step` accepts (0..A-1)."""
        return self.dynamics.num_actions

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def keeps_pixels(self) -> bool:
        """Whether frames keep the unchanged patches' pixels (``SamplerConfig.keep_pixels`` on a token kind)."""
        return self.sampler_config.keep_pixels and kind_of(self.dynamics) != "diffusion"

    def seed(self, seed: int | None) -> None:
        """Seed the sampling (None: a fresh random seed). The same seed, prompt and actions give the same frames.

        A fresh seed comes from OS entropy into this world's own generator: torch's global RNG (which the caller
        may have seeded for something else) is neither read nor reseeded.
        """
        if seed is None:
            self.generator.seed()  # not torch.seed(): that reseeds the global RNG as a side effect
        else:
            self.generator.manual_seed(seed)

    # -- checks ---------------------------------------------------------------------------------------

    def as_frames(self, frames: np.ndarray | Tensor, what: str) -> Tensor:
        """uint8 (H, W, C) / (T, H, W, C) / (B, T, H, W, C) -> (B, T, H, W, C) uint8 tensor on the device."""
        x = frames if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames))
        if x.ndim == 3:
            x = x[None]
        if x.ndim == 4:
            x = x[None]
        S = self.image_size
        if x.ndim != 5 or tuple(x.shape[2:]) != (S, S, 3):
            raise ValueError(
                f"{what} must be uint8 frames of shape (H, W, 3), (T, H, W, 3) or (B, T, H, W, 3) with "
                f"H = W = {S} (this world's size), got {tuple(x.shape)}: resize the input to {S}x{S}"
            )
        if x.dtype != torch.uint8:
            raise ValueError(f"{what} must be uint8 (0..255), got {x.dtype}")
        return x.to(self.device)

    def check_actions(self, actions: Tensor) -> Tensor:
        actions = torch.as_tensor(actions, dtype=torch.long, device=self.device)
        if actions.numel() and (actions.min() < 0 or actions.max() >= self.num_actions):
            bad = sorted({int(a) for a in actions.flatten().tolist() if not 0 <= a < self.num_actions})
            raise ValueError(
                f"actions must be in 0..{self.num_actions - 1} (this world has {self.num_actions}), got {bad}"
            )
        return actions

    # -- stepping -------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self, prompt: np.ndarray | Tensor, actions: Any = None) -> np.ndarray:
        """Start from prompt frames: uint8 (H, W, 3) or a (T, H, W, 3) context clip.

        ``actions`` (T-1 latent actions between the context frames) default to the LAM's inference.
        Returns the last prompt frame as the world shows it, uint8 (H, W, 3): the prompt itself where the world
        keeps unchanged pixels (``keep_pixels``), else its tokens decoded.
        """
        frames_BTHWC = self.as_frames(prompt, "prompt")
        if frames_BTHWC.shape[0] != 1:
            raise ValueError("reset takes one prompt; use rollout() for batches")
        return self.begin(frames_BTHWC, None if actions is None else self.check_actions(actions)[None])[0]

    @torch.no_grad()
    def step(self, action: int | None = None, *, robot_action: Any = None) -> np.ndarray:
        """Apply one latent action (0..A-1), or a robot's real action through the adapter; the next frame.

        Args:
            action: a latent action id.
            robot_action: instead of ``action``, a real action vector (U,) (needs a world with an adapter).

        Returns:
            uint8 (H, W, 3).
        """
        if self._sampler is None:
            raise RuntimeError("call reset(prompt) before step(action)")
        if (action is None) == (robot_action is None):
            raise ValueError("step takes either a latent action or robot_action=vector, not both or neither")
        if robot_action is not None:
            action = int(self.latent_actions_of(robot_action).reshape(-1)[0])
        return self.advance(self.check_actions(torch.tensor([action])))[0]

    @torch.no_grad()
    def latent_actions_of(self, robot_actions: Any) -> np.ndarray:
        """Real robot actions float (..., U) -> the latent actions the adapter maps them to, int64 (...)."""
        if self.adapter is None:
            raise ValueError("this world has no action adapter: fine-tune it on robot data with real actions")
        u = torch.as_tensor(np.asarray(robot_actions, dtype=np.float32), device=self.device)
        U = self.adapter.config.action_dim
        if u.ndim == 0 or u.shape[-1] != U:
            raise ValueError(f"robot actions must be vectors of {U} numbers, got shape {tuple(u.shape)}")
        return self.adapter.latent_action(u).cpu().numpy()

    @torch.no_grad()
    def begin(self, frames_BTHWC: Tensor, actions_BT: Tensor | None = None) -> np.ndarray:
        """Batched reset: context frames (B, T, H, W, C) uint8 -> the last context frame as shown (B, H, W, C)."""
        T = frames_BTHWC.shape[1]
        if self.dynamics.config.num_frames < T:
            frames_BTHWC = frames_BTHWC[:, -self.dynamics.config.num_frames :]  # the window the model can see
            actions_BT = None if actions_BT is None else actions_BT[:, -(frames_BTHWC.shape[1] - 1) :]
            T = frames_BTHWC.shape[1]
        if actions_BT is None and T > 1:
            actions_BT = self.lam_actions(frames_BTHWC)
        elif actions_BT is None:
            actions_BT = frames_BTHWC.new_zeros(len(frames_BTHWC), 0)
        tokens_BThw = self.tokenizer.encode(frames_BTHWC)
        self._sampler = make_sampler(self.dynamics, self.sampler_config, self.tokenizer)
        self._sampler.reset(tokens_BThw.flatten(2), actions_BT.long())
        self._decoder_cache = self.tokenizer.make_decoder_cache(ring=True)
        # the new frame's decode and its conversion to uint8 (compiled code is reused across episodes)
        self._decode_new = compile_step(self.decode_new) if self.sampler_config.compile else self.decode_new
        decoded = self.tokenizer.decode(tokens_BThw, cache=self._decoder_cache)
        # what the screen shows from here on: the real prompt frame (then only the patches that change are decoded)
        self._screen_BHWC = frames_BTHWC[:, -1] if self.keeps_pixels else None
        self._screen_ids_BN = tokens_BThw[:, -1].flatten(1)
        return to_uint8(decoded[:, -1] if self._screen_BHWC is None else self._screen_BHWC)

    def decode_new(self, frame_BN: Tensor) -> Tensor:
        """Decode the newest frame, ids (B, N) or the diffusion kind's code vectors (B, N, Z), through the decoder's
        cache: uint8 (B, H, W, C) on the device."""
        decoded = decode_new_frame(self.tokenizer, frame_BN, self.dynamics.config.grid_size, self._decoder_cache)
        return (decoded[:, 0] * 255).round_().to(torch.uint8)  # decode clamps to [0, 1]

    @torch.no_grad()
    def advance(self, actions_B: Tensor) -> np.ndarray:
        """Batched step: one action per sequence (B,) -> next frames uint8 (B, H, W, C)."""
        assert self._sampler is not None and self._decoder_cache is not None
        tokens_BN = self._sampler.next_frame(actions_B, generator=self.generator)
        frame_BHWC = self._decode_new(tokens_BN)
        if self._screen_BHWC is not None:
            frame_BHWC = keep_unchanged(frame_BHWC, self._screen_BHWC, tokens_BN == self._screen_ids_BN)
            self._screen_BHWC, self._screen_ids_BN = frame_BHWC, tokens_BN
        return frame_BHWC.cpu().numpy()

    @torch.no_grad()
    def rollout(self, prompt_BTHWC: Tensor, actions_BF: Tensor, context_actions_BT: Tensor | None = None) -> np.ndarray:
        """Generate F frames for a batch of prompts under given actions: uint8 (B, F, H, W, C)."""
        prompt = self.as_frames(prompt_BTHWC, "prompt")
        actions = self.check_actions(actions_BF)
        if actions.ndim != 2 or actions.shape[0] != prompt.shape[0]:
            raise ValueError(f"actions must be (B, F) with B = {prompt.shape[0]} prompts, got {tuple(actions.shape)}")
        self.begin(prompt, context_actions_BT)
        return np.stack([self.advance(actions[:, f]) for f in range(actions.shape[1])], axis=1)

    @torch.no_grad()
    def infer_actions(self, video: np.ndarray | Tensor) -> np.ndarray:
        """Latent action of each transition of a clip: uint8 (T, H, W, 3) -> int64 (T-1,); batches (B, T-1)."""
        batched = np.ndim(video) == 5
        frames = self.as_frames(video, "video")
        if frames.shape[1] < 2:
            raise ValueError("infer_actions needs at least 2 frames")
        ids = self.lam_actions(frames).cpu().numpy()
        return ids if batched else ids[0]

    def lam_actions(self, frames_BTHWC: Tensor) -> Tensor:
        """The LAM's latent action of each transition, (B, T-1); refused by a world driven by true actions."""
        if self.dynamics.config.action_source != "latent":
            raise ValueError(
                "this world's dynamics model was trained on the data's true actions (action_source=true), not on the "
                "LAM's latent actions: pass the environment's actions instead of inferring them"
            )
        return self.lam.infer_actions(frames_BTHWC)


def keep_unchanged(decoded_BHWC: Tensor, previous_BHWC: Tensor, same_BN: Tensor) -> Tensor:
    """Composite a new frame: the previous frame's pixels where the token did not change, the decoder's elsewhere.

    Args:
        decoded_BHWC: the new frame as decoded (B, H, W, C).
        previous_BHWC: the frame before it as shown (B, H, W, C), same dtype.
        same_BN: bool (B, N), N = h * w tokens in row-major order over a square grid of H / h pixel patches: whether
            each token equals the previous frame's.

    Returns:
        (B, H, W, C).
    """
    B, H, W, _ = decoded_BHWC.shape
    g = round(same_BN.shape[1] ** 0.5)
    if g * g != same_BN.shape[1] or H % g or W % g:
        raise ValueError(f"{same_BN.shape[1]} tokens do not tile a {H}x{W} frame in square patches")
    keep_BHW1 = repeat(same_BN.view(B, g, g), "b h w -> b (h p) (w q) 1", p=H // g, q=W // g)
    return torch.where(keep_BHW1, previous_BHWC, decoded_BHWC)


JOINT_LAM = "lam"  # where a dynamics stage with lam_training="joint" exports its LAM, inside its own export folder


def joint_lam(dynamics: str | Path) -> Path | None:
    """The LAM an exported dynamics folder was trained jointly with (``<dynamics>/lam``), or None."""
    folder = Path(dynamics) / JOINT_LAM
    return folder if (folder / "config.json").is_file() else None


def write_bundle(
    out: str | Path,
    tokenizer: VideoTokenizer | str | Path,
    lam: LatentActionModel | str | Path,
    dynamics: AnyDynamics | str | Path,
    sampler: SamplerConfig | None = None,
    adapter: ActionAdapter | str | Path | None = None,
) -> Path:
    """Assemble a world bundle from three models and an optional action adapter (objects or exported folders).

    Checks that they fit together.
    """
    out = Path(out)
    # a dynamics stage with lam_training="joint" exports the LAM it trained beside it: no other LAM's codes fit it
    own = joint_lam(dynamics) if isinstance(dynamics, str | Path) else None
    if own is not None:
        other = not isinstance(lam, str | Path) or Path(lam).resolve() != own.resolve()
        if other:
            raise ValueError(
                f"--dynamics {dynamics} was trained jointly with its LAM: pass --lam {own} (the LAM it learned "
                "its actions from), not another"
            )
    loaded = []
    given: list[tuple[str, Any, tuple[type, ...], Any]] = [
        ("tokenizer", tokenizer, (VideoTokenizer,), VideoTokenizer.from_pretrained),
        ("lam", lam, (LatentActionModel,), LatentActionModel.from_pretrained),
        ("dynamics", dynamics, DYNAMICS_MODELS, load_dynamics),  # any kind
    ]
    if adapter is not None:
        given.append(("adapter", adapter, (ActionAdapter,), ActionAdapter.from_pretrained))
    for name, part, classes, load in given:
        if isinstance(part, str | Path):
            folder = Path(part)
            if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
                raise ValueError(f"--{name} {folder} is not an exported model folder (config.json + model.safetensors)")
            part = load(folder)
        if not isinstance(part, classes):
            raise ValueError(f"{name} must be a {' or '.join(c.__name__ for c in classes)}, got {type(part).__name__}")
        loaded.append(part)
    check_compatible(*loaded[:3])
    if adapter is not None and loaded[3].config.num_actions != loaded[2].num_actions:
        raise ValueError(f"adapter num_actions={loaded[3].config.num_actions} but the LAM has {loaded[2].num_actions}")
    names = [*PARTS, "adapter"][: len(loaded)]
    out.mkdir(parents=True, exist_ok=True)
    if adapter is None and (out / "adapter").exists():
        shutil.rmtree(out / "adapter")  # a stale adapter must not ride along with new models
    for name, model in zip(names, loaded, strict=True):
        if (out / name).exists():
            shutil.rmtree(out / name)
        model.save_pretrained(out / name)
    meta = {
        "format": WORLD_FORMAT,
        "version": WORLD_VERSION,
        "parts": {name: type(m).__name__ for name, m in zip(names, loaded, strict=True)},
        "num_actions": loaded[2].num_actions,
        "dynamics_kind": kind_of(loaded[2]),
        "action_source": loaded[2].config.action_source,  # "true": stepped with the data's own action ids
        "image_size": loaded[0].config.image_size,
        "sampler": dataclasses.asdict(sampler or SamplerConfig()),
    }
    (out / "world.json").write_text(json.dumps(meta, indent=1))
    return out

"""The dynamics kinds: which config, model and sampler make each, and reading any of them from a folder.

Everything downstream of the dynamics stage (the stage itself, ``genie export world``, :class:`genie.world.World`,
``genie eval world``, ``genie play``, the benchmarks) goes through these functions, so a kind is added here and in
its own model module, nowhere else.

==========  =====================================  ==========================================================
kind        model (module)                          sampler
==========  =====================================  ==========================================================
maskgit     DynamicsModel (genie.models.dynamics)   MaskGITSampler: a few refinement steps per frame
causal      CausalDynamicsModel (genie.models.causal)  CausalSampler: one token at a time, raster order
diffusion   DiffusionDynamicsModel (...diffusion)   DiffusionSampler: a few flow steps over code vectors
==========  =====================================  ==========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genie.models.causal import CausalDynamicsConfig, CausalDynamicsModel, CausalSampler
from genie.models.conditioning import DYNAMICS_KINDS
from genie.models.diffusion import DiffusionDynamicsConfig, DiffusionDynamicsModel, DiffusionSampler
from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.hub import read_json
from genie.models.sampler import MaskGITSampler, SamplerConfig

AnyDynamicsConfig = DynamicsConfig | CausalDynamicsConfig | DiffusionDynamicsConfig
AnyDynamics = DynamicsModel | CausalDynamicsModel | DiffusionDynamicsModel
DYNAMICS_MODELS = (DynamicsModel, CausalDynamicsModel, DiffusionDynamicsModel)
CONFIGS: dict[str, type] = {
    "maskgit": DynamicsConfig,
    "causal": CausalDynamicsConfig,
    "diffusion": DiffusionDynamicsConfig,
}
MODELS: dict[str, type] = {"maskgit": DynamicsModel, "causal": CausalDynamicsModel, "diffusion": DiffusionDynamicsModel}
SAMPLERS: dict[str, type] = {"maskgit": MaskGITSampler, "causal": CausalSampler, "diffusion": DiffusionSampler}
assert tuple(CONFIGS) == DYNAMICS_KINDS


def kind_of(model_or_config: Any) -> str:
    """The dynamics kind of a model or config (configs written before kinds existed are MaskGIT's)."""
    return getattr(getattr(model_or_config, "config", model_or_config), "kind", "maskgit")


def dynamics_config(fields: AnyDynamicsConfig | dict[str, Any] | None) -> AnyDynamicsConfig:
    """A dynamics config from a config object or plain fields; ``fields["kind"]`` picks the class (default maskgit)."""
    if isinstance(fields, tuple(CONFIGS.values())):
        return fields
    fields = dict(fields or {})
    kind = fields.get("kind", "maskgit")
    if kind not in CONFIGS:
        raise ValueError(f"model.kind={kind!r}: choose one of {', '.join(DYNAMICS_KINDS)}")
    return CONFIGS[kind](**fields)


def build_dynamics(config: AnyDynamicsConfig) -> AnyDynamics:
    """A fresh (randomly initialised) model of the config's kind."""
    return MODELS[kind_of(config)](config)


def dynamics_class(folder: str | Path) -> type:
    """The model class of an exported dynamics folder, from its ``config.json``'s ``model_type``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"dynamics {folder} is not an exported model folder (no config.json): train it first")
    model_type = read_json(path).get("model_type")
    for cls in MODELS.values():
        if cls.config_class.model_type == model_type:
            return cls
    raise ValueError(f"{path}: model_type {model_type!r} is not a genie dynamics model")


def read_dynamics_config(folder: str | Path) -> AnyDynamicsConfig:
    """The config of an exported dynamics folder of any kind, without loading its weights."""
    return dynamics_class(folder).config_class.from_pretrained(folder)


def load_dynamics(folder: str | Path) -> AnyDynamics:
    """An exported dynamics model of any kind."""
    return dynamics_class(folder).from_pretrained(folder)


def make_sampler(model: AnyDynamics, config: SamplerConfig | None = None, tokenizer: Any = None) -> Any:
    """The kind's frame sampler (``reset`` / ``next_frame`` / ``next_frame_logits`` / ``append``).

    Every sampler takes the context as token ids. The diffusion kind's works on code vectors: it gets the
    ``tokenizer``'s codebook to read ids with, and its ``next_frame`` returns code vectors (B, N, Z) where the
    token kinds return ids (B, N) (:func:`decode_new_frame` decodes either).
    """
    if kind_of(model) == "diffusion":
        codebook = None if tokenizer is None else tokenizer.quantizer.codes().detach()
        return DiffusionSampler(model, config, codebook)
    return SAMPLERS[kind_of(model)](model, config)


def check_sampler(model: AnyDynamics, config: SamplerConfig) -> None:
    """ValueError, before any work, for sampler settings the model's kind cannot run."""
    make_sampler(model, config)  # the samplers check their settings when built, and building costs nothing


def decode_new_frame(tokenizer: Any, frame: Any, grid_size: int, cache: Any) -> Any:
    """Decode one new frame per sequence through the decoder's cache: ids (B, N) or code vectors (B, N, Z) ->
    frames (B, 1, H, W, C) float in [0, 1]."""
    if frame.is_floating_point():
        return tokenizer.decode_codes(frame[:, None], cache=cache)
    return tokenizer.decode(frame.view(-1, 1, grid_size, grid_size), cache=cache)

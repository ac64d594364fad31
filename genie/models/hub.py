"""Hugging Face layout for genie models: a folder with ``config.json`` + ``model.safetensors``.

Every genie model (tokenizer, LAM, dynamics) is a :class:`GeniePreTrainedModel` whose config subclasses
``transformers.PreTrainedConfig``. We use transformers rather than ``huggingface_hub``'s
``PyTorchModelHubMixin`` because in transformers 5 a config *is* a strict dataclass: one class is at once
the training config (typed, validated, dataclass fields the CLI can fill) and the exact content of
``config.json``, and the models work with ``AutoConfig`` / ``AutoModel`` and the Hub tooling
(``push_to_hub``, model cards) at no extra cost. config.json holds the model's own fields plus
transformers' bookkeeping keys (``model_type``, ``architectures``, ``dtype``, ``transformers_version``).

Loading safety: :meth:`GeniePreTrainedModel.from_pretrained` only reads safetensors (never unpickles), and
it is strict: a checkpoint with missing, unexpected or wrongly-shaped tensors is an error, not a warning.
A folder whose ``model.safetensors`` or ``config.json`` cannot be read (an interrupted copy or download, a full
disk) is a :class:`DamagedFileError` that names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

# fields that transformers' PreTrainedConfig itself declares; everything else in a genie config is ours
_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))


class DamagedFileError(ValueError):
    """A model or checkpoint file that exists but cannot be read: truncated or overwritten.

    A ``ValueError``: the ``genie`` commands report it as one ``error:`` line naming the file (exit code 2).
    """

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged or truncated ({reason}): re-export or re-download it")


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (its type's name when it has none), for a one-line report."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_json(path: str | Path) -> Any:
    """Parse a JSON file of a model folder or bundle; :class:`DamagedFileError` when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"not valid JSON: {first_line(e)}") from e


def damaged_safetensors(folder: Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file of ``folder`` whose header safetensors refuses, with the reason; else None.

    The header check covers truncation: safetensors refuses a file shorter than its header says.
    """
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as e:
            return path, first_line(e)
    return None


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off inside, as they were after.

    Around local reads and writes of genie models: a genie model is one small ``model.safetensors``, so
    transformers' "Loading weights" and "Writing model shards" bars only flash 0-100 % on stderr, once per model
    a command loads or exports. Downloads from the Hub keep their bars (not wrapped).
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars_on, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # both libraries' bars
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()  # (turns the Hub's on too)
        if hub_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def model_fields(config: PreTrainedConfig) -> dict[str, Any]:
    """The model's own config fields as a plain dict (no transformers bookkeeping).

    Handy for logging hyper-parameters and for storing a config inside a Lightning checkpoint as plain
    data (so the checkpoint loads with ``torch.load(..., weights_only=True)``). ``type(config)(**d)``
    rebuilds the config.
    """
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _BASE_CONFIG_FIELDS}


class GeniePreTrainedModel(PreTrainedModel):
    """Base class of genie's HF-layout models.

    Subclasses set ``config_class`` and build their modules in ``__init__`` (ending with
    ``self.post_init()``). Modules initialise their own weights when constructed, so ``_init_weights`` is a
    no-op: transformers never re-initialises them, and strict loading means no tensor is ever left to it.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # STTransformer stacks carry a `gradient_checkpointing` flag

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights are initialised by the modules' constructors (see genie.models.blocks)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """Load from a folder (or Hub repo) holding ``config.json`` + ``model.safetensors``.

        Only safetensors are read, so nothing is ever unpickled. Returns the model in eval mode.

        Args:
            pretrained_model_name_or_path: local folder or Hub repo id.
            strict: raise if the checkpoint's tensors do not match the model's exactly.
            **kwargs: passed to ``transformers.PreTrainedModel.from_pretrained`` (e.g. ``device_map``,
                ``dtype``, config field overrides).
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("genie models only load safetensors checkpoints (use_safetensors=False refused)")
        kwargs["use_safetensors"] = True
        kwargs["weights_only"] = True  # belt and braces: any torch.load transformers might do stays safe
        want_info = kwargs.pop("output_loading_info", False)
        folder = Path(str(pretrained_model_name_or_path))
        if (folder / "config.json").is_file():
            read_json(folder / "config.json")  # transformers' own report is an OSError with a traceback
        try:
            with no_progress_bars() if folder.is_dir() else contextlib.nullcontext():
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
        except SafetensorError as e:
            # a local folder: name the very file (one of several shards, maybe); a Hub repo: its weights
            found = damaged_safetensors(folder) if folder.is_dir() else None
            path, reason = found or (folder / "model.safetensors", first_line(e))
            raise DamagedFileError(path, reason) from e
        if strict:
            bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
            if bad:
                raise RuntimeError(f"{cls.__name__}: checkpoint does not match the model: {bad}")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained`` without its "Writing model shards" progress bar (one small file)."""
        with no_progress_bars():
            return super().save_pretrained(save_directory, *args, **kwargs)


def register_auto(config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel]) -> None:
    """Make ``AutoConfig`` / ``AutoModel`` resolve ``config_class.model_type`` to these classes (idempotent)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)

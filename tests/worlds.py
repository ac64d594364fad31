"""Small untrained worlds for API, CLI and front-end tests (learning is tested in tests/stages)."""

from __future__ import annotations

from pathlib import Path

import torch

from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.lam import LAMConfig, LatentActionModel
from genie.models.sampler import SamplerConfig
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.world import write_bundle

S, P, V, A = 16, 4, 32, 5


def tiny_world_parts(num_codes: int = V, actions: int = A) -> tuple:
    torch.manual_seed(0)
    small = dict(width=32, num_heads=2, mlp_ratio=2.0)
    tok = VideoTokenizer(
        TokenizerConfig(
            image_size=S,
            patch_size=P,
            num_frames=4,
            encoder_depth=1,
            decoder_depth=1,
            code_dim=8,
            num_codes=num_codes,
            **small,
        )
    )
    lam = LatentActionModel(
        LAMConfig(
            image_size=S,
            patch_size=P,
            num_frames=4,
            encoder_depth=1,
            decoder_depth=1,
            code_dim=4,
            num_actions=actions,
            **small,
        )
    )
    dyn = DynamicsModel(DynamicsConfig(num_codes=V, grid_size=S // P, num_actions=A, num_frames=4, depth=1, **small))
    return tok, lam, dyn


def write_tiny_world(out: Path, steps: int = 2) -> Path:
    """A bundle of :func:`tiny_world_parts` with a ``steps``-step sampler."""
    return write_bundle(out, *tiny_world_parts(), SamplerConfig(steps=steps))

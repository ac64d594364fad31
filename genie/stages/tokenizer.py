"""Tokenizer stage: train the ST-ViViT VQ-VAE to reconstruct clips through its codebook."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from genie.models.hub import model_fields
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import OptimConfig
from genie.stages.vq import VQStage


class TokenizerStage(VQStage):
    """LightningModule training a :class:`~genie.models.tokenizer.VideoTokenizer`.

    Args:
        model: the tokenizer's config (the exported ``config.json``).
        optim: optimizer and schedule.
        media_every_n_val: log a reconstruction video every n validation runs (0: never).
    """

    config_class = TokenizerConfig

    def __init__(
        self,
        model: TokenizerConfig | None = None,
        optim: OptimConfig | None = None,
        media_every_n_val: int = 1,
    ):
        super().__init__(optim)
        cfg = model if isinstance(model, TokenizerConfig) else TokenizerConfig(**(model or {}))
        self.net = VideoTokenizer(cfg)
        self.media_every_n_val = media_every_n_val
        self.save_plain_hparams(model=model_fields(cfg), media_every_n_val=media_every_n_val)

    @property
    def num_codes(self) -> int:
        return self.net.config.num_codes

    def expected_resolution(self) -> int:
        return self.net.config.image_size

    def expected_frames(self) -> int:
        return self.net.config.num_frames

    def forward_batch(self, batch: dict[str, Any]) -> tuple[Any, Tensor]:
        frames_BTHWC = batch["frames"]
        return self.net(frames_BTHWC), frames_BTHWC

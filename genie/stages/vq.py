"""The training pattern shared by the stages whose model reconstructs frames through a vector-quantized
bottleneck: the tokenizer (codes = visual tokens) and the LAM (codes = latent actions).

Dimension keys: B batch, T frames, H W pixels, C channels, V codebook size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from genie.eval.metrics import codebook_stats, frame_psnr, frame_ssim
from genie.stages.base import StageModule
from genie.stages.media import log_video, side_by_side


def all_reduce_(t: Tensor) -> Tensor:
    """Sum a tensor over ranks in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class VQStage(StageModule):
    """A stage whose model output has ``recon, loss, recon_loss, vq_loss, ids, usage, perplexity``.

    Subclasses implement :meth:`forward_batch` (model output and the frames ``recon`` should match)
    and :attr:`num_codes`, and may extend validation through :meth:`on_val_batch` / :meth:`on_val_end`.
    """

    media_every_n_val: int = 1

    @property
    def num_codes(self) -> int:
        raise NotImplementedError

    def forward_batch(self, batch: dict[str, Any]) -> tuple[Any, Tensor]:
        """Run the model on a batch: returns (output, target frames (B, T', H, W, C) uint8)."""
        raise NotImplementedError

    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.forward_batch(batch)[0].loss

    # -- training -------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out, target_BTHWC = self.forward_batch(batch)
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/recon_loss": out.recon_loss,
                "train/vq_loss": out.vq_loss,
                "train/usage": out.usage,
                "train/perplexity": out.perplexity,
            },
            on_step=True,
            on_epoch=False,
        )
        self.log("train/psnr", frame_psnr(out.recon, target_BTHWC).mean(), on_step=True, on_epoch=False, prog_bar=True)
        self.log_data_stats(batch)
        return out.loss

    # -- validation -----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_counts_V = torch.zeros(self.num_codes, dtype=torch.long, device=self.device)
        self._val_runs = getattr(self, "_val_runs", 0)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, target_BTHWC = self.forward_batch(batch)
        n = target_BTHWC.shape[0]
        self.log("val/loss", out.loss, batch_size=n, sync_dist=True)
        self.log("val/psnr", frame_psnr(out.recon, target_BTHWC).mean(), batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/ssim", frame_ssim(out.recon, target_BTHWC).mean(), batch_size=n, sync_dist=True)
        self._val_counts_V += torch.bincount(out.ids.flatten(), minlength=self.num_codes)
        self.on_val_batch(batch, out)
        wants_media = batch_idx == 0 and self.media_every_n_val and self._val_runs % self.media_every_n_val == 0
        if wants_media and self.trainer.is_global_zero and self.logger is not None:
            log_video(self.logger, "val/reconstruction", side_by_side(target_BTHWC, out.recon), self.global_step)

    def on_validation_epoch_end(self) -> None:
        stats = codebook_stats(all_reduce_(self._val_counts_V))
        self.log("val/usage", stats["usage"])
        self.log("val/perplexity", stats["perplexity"])
        self.on_val_end()
        self._val_runs += 1

    def on_val_batch(self, batch: dict[str, Any], out: Any) -> None:
        """Hook: accumulate stage-specific validation statistics."""

    def on_val_end(self) -> None:
        """Hook: log stage-specific validation statistics (already summed over batches)."""

"""Learning test: the tiny tokenizer, trained briefly on CoinRun on CPU, reconstructs unseen levels."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from genie.data.datamodule import VideoDataModule
from genie.eval.tokenizer import evaluate_tokenizer
from genie.stages.tokenizer import TokenizerStage

ROOT = Path(__file__).resolve().parents[2]
STEPS = 150  # ~40 s on 2 cores: a fixed step budget keeps the result independent of machine load


def test_tiny_tokenizer_learns_coinrun(coinrun_learning_shards: Path):
    seed_everything(0)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "tokenizer.yaml").read_text())
    init = cfg["model"]["init_args"]
    stage = TokenizerStage(model=init["model"], optim=init["optim"])
    dm = VideoDataModule(
        str(coinrun_learning_shards / "train"),
        num_frames=4,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=128,
        pin_memory=False,
    )
    untrained, _ = evaluate_tokenizer(stage.net, str(coinrun_learning_shards / "val"), num_frames=4, max_clips=32)
    trainer = Trainer(
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    trainer.fit(stage, dm)
    torch.manual_seed(0)
    m, picture = evaluate_tokenizer(stage.net, str(coinrun_learning_shards / "val"), num_frames=4, max_clips=32)
    print(
        f"held-out PSNR {m['psnr']:.2f} dB (untrained {untrained['psnr']:.2f}, mean colour "
        f"{m['baseline_mean_colour_psnr']:.2f}, clip mean frame {m['baseline_mean_frame_psnr']:.2f}), "
        f"SSIM {m['ssim']:.3f}, usage {m['usage']:.2f}"
    )
    # Measured (2 cores, 150 steps): 20.1 dB vs 14.3 dB for each frame's mean colour, ~12 dB untrained,
    # codebook usage 0.82. The clip's mean frame (~33 dB on 4-frame windows of a static camera) is out of
    # reach at this budget; the coinrun config is what competes with it (see the README's numbers).
    assert m["psnr"] > m["baseline_mean_colour_psnr"] + 3.0
    assert m["psnr"] > untrained["psnr"] + 5.0
    assert m["usage"] > 0.3  # the codebook did not collapse
    assert picture is not None

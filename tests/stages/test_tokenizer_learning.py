"""Learning tests: the tiny tokenizers, trained briefly on CPU, reconstruct clips they never saw.

The default suite checks the tiny world's own tokenizer (the sprites, trained once for the world learning test, so
it costs no training of its own); the CoinRun one (~75 s on the slow EPYC) runs under ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from genie.data.datamodule import VideoDataModule
from genie.eval.tokenizer import evaluate_tokenizer
from genie.stages.tokenizer import TokenizerStage

ROOT = Path(__file__).resolve().parents[2]
STEPS = 150  # ~40 s on 2 cores: a fixed step budget keeps the result independent of machine load


def test_the_worlds_tokenizer_reconstructs_unseen_sprites(plain_sprites_tokenizer: tuple, plain_sprites_shards: Path):
    """configs/tiny/sprites_tokenizer.yaml after its 400 steps (seeds 0, 2, 3 gave 53.0, 45.2, 39.8 dB)."""
    _, trained = plain_sprites_tokenizer
    val = str(plain_sprites_shards / "val")
    untrained, _ = evaluate_tokenizer(type(trained)(trained.config), val, num_frames=4, max_clips=64)
    m, _ = evaluate_tokenizer(trained, val, num_frames=4, max_clips=64)
    print(
        f"held-out PSNR {m['psnr']:.2f} dB (untrained {untrained['psnr']:.2f}, mean colour "
        f"{m['baseline_mean_colour_psnr']:.2f}, clip mean frame {m['baseline_mean_frame_psnr']:.2f}), "
        f"usage {m['usage']:.2f}"
    )
    assert m["psnr"] > 35.0  # a 24 dB tokenizer sinks the world learning test (tests/stages/conftest.py)
    assert m["psnr"] > m["baseline_mean_frame_psnr"] + 5.0
    assert m["psnr"] > untrained["psnr"] + 15.0


@pytest.mark.slow  # ~75 s on the slow EPYC (2026-12-06)
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

"""The LAM stage as a user runs it: `genie fit` on the tiny config, export, `genie eval lam`, the big configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from genie.cli import main
from genie.models.lam import LatentActionModel
from genie.stages.base import load_stage_checkpoint

from .conftest import cli_fit_args

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "lam.yaml")


def fit_args(config: str, shards: Path, root: Path, *extra: str) -> list[str]:
    return cli_fit_args(config, shards, root, *extra)


@pytest.fixture(scope="module")
def trained(sprites_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lam") / "run"
    args = fit_args(TINY, sprites_shards, root, "--trainer.max_steps=4", "--trainer.val_check_interval=2")
    assert main(args) == 0
    return root


def test_fit_writes_checkpoint_and_export(trained: Path):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    cfg = json.loads((trained / "export" / "config.json").read_text())
    assert cfg["model_type"] == "genie_lam" and cfg["image_size"] == 24 and cfg["num_actions"] == 6
    stage = load_stage_checkpoint(trained / "checkpoints" / "last.ckpt")  # weights_only load
    exported = LatentActionModel.from_pretrained(trained / "export")
    frames = torch.randint(0, 256, (2, 4, 24, 24, 3), dtype=torch.uint8)
    stage.net.eval()
    assert torch.equal(exported.infer_actions(frames), stage.net.infer_actions(frames))


def test_eval_lam_writes_json_and_png(trained: Path, sprites_shards: Path, tmp_path: Path):
    out = tmp_path / "eval"
    args = ["eval", "lam", "--model", str(trained / "export"), "--data", str(sprites_shards / "val")]
    assert main([*args, "--clips", "8", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "lam_eval.json").read_text())
    assert report["clips"] == 8 and report["num_frames"] == 4 and report["num_actions"] == 6
    assert 0 <= report["nmi"] <= 1 and 1 <= report["codes_used"] <= 6  # the sprites carry their true actions
    assert sum(report["usage_histogram"]) == pytest.approx(1.0)
    assert report["true_actions_seen"] == 4 and len(report["confusion"]) == 4
    assert (out / "lam_eval.png").stat().st_size > 0


@pytest.mark.parametrize("setup", ["coinrun", "large"])
def test_gpu_configs_scaled_down_run_a_step(setup: str, sprites_shards: Path, tmp_path: Path):
    config = ROOT / "configs" / setup / "lam.yaml"
    model = yaml.safe_load(config.read_text())["model"]
    assert model["class_path"] == "genie.stages.lam.LAMStage"
    args = fit_args(
        str(config),
        sprites_shards,
        tmp_path / setup,
        "--trainer.max_steps=1",
        "--trainer.devices=1",
        "--trainer.limit_val_batches=0",
        "--model.init_args.model.image_size=24",
        "--model.init_args.model.patch_size=4",
        "--model.init_args.model.width=32",
        "--model.init_args.model.encoder_depth=1",
        "--model.init_args.model.decoder_depth=1",
        "--model.init_args.model.num_heads=2",
        "--data.num_frames=4",
    )
    assert main(args) == 0
    cfg = json.loads((tmp_path / setup / "export" / "config.json").read_text())
    want = model["init_args"]["model"]
    assert cfg["width"] == 32 and cfg["num_actions"] == want["num_actions"] and cfg["code_dim"] == want["code_dim"]

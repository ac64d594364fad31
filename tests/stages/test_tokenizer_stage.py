"""The tokenizer stage as a user runs it: `genie fit`, checkpoints, resume, export, eval, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from genie.cli import main
from genie.data.datamodule import VideoDataModule
from genie.models.tokenizer import VideoTokenizer
from genie.stages.base import load_stage_checkpoint

from .conftest import cli_fit_args

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "tokenizer.yaml")


def fit_args(shards: Path, root: Path, *extra: str) -> list[str]:
    return cli_fit_args(TINY, shards, root, *extra, batch_size=2)


@pytest.fixture(scope="module")
def trained(coinrun_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "run"
    args = fit_args(
        coinrun_shards, root, "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--checkpoint_every=2"
    )
    assert main(args) == 0
    return root


def test_fit_writes_checkpoints_and_export(trained: Path):
    ckpts = sorted(p.name for p in (trained / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step0000002.ckpt" in ckpts and "step0000004.ckpt" in ckpts
    assert (trained / "export" / "config.json").is_file() and (trained / "export" / "model.safetensors").is_file()
    cfg = json.loads((trained / "export" / "config.json").read_text())
    assert cfg["patch_size"] == 4 and cfg["num_codes"] == 256  # the tiny config's values
    assert (trained / "config.yaml").is_file()  # LightningCLI's record of the run


def test_export_matches_checkpoint_and_reloads_identically(trained: Path, tmp_path: Path):
    stage = load_stage_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert main(["export", str(trained / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "m")]) == 0
    a = VideoTokenizer.from_pretrained(tmp_path / "m")
    b = VideoTokenizer.from_pretrained(trained / "export")
    frames = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8)
    stage.net.eval()
    ids = stage.net.encode(frames)
    assert torch.equal(a.encode(frames), ids) and torch.equal(b.encode(frames), ids)
    assert torch.equal(a.decode(ids), stage.net.decode(ids))


def test_resume_restores_step_and_optimizer_state(trained: Path, coinrun_shards: Path):
    ckpt_path = trained / "checkpoints" / "step0000002.ckpt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step
            self.state = {
                k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                for k, v in trainer.optimizers[0].state_dict()["state"].items()
            }

    probe = Probe()
    stage = load_stage_checkpoint(ckpt_path)  # weights_only load; rebuilt from plain hparams
    dm = VideoDataModule(str(coinrun_shards / "train"), num_frames=8, batch_size=2, num_workers=0, pin_memory=False)
    trainer = Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[probe],
        limit_val_batches=0,
    )
    trainer.fit(stage, dm, ckpt_path=ckpt_path)
    assert probe.step == saved["global_step"] == 2
    want = saved["optimizer_states"][0]["state"]
    assert probe.state.keys() == want.keys() and len(want) > 0
    for k in want:
        for n, t in want[k].items():
            if torch.is_tensor(t):
                assert torch.equal(probe.state[k][n], t), (k, n)
    assert trainer.global_step == 3


def test_resume_with_ckpt_path_last_continues_to_max_steps(trained: Path, coinrun_shards: Path):
    args = fit_args(
        coinrun_shards,
        trained,
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=2",
        "--checkpoint_every=2",
        "--ckpt_path=last",
    )
    assert main(args) == 0
    last = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6


def test_eval_tokenizer_writes_json_and_png(trained: Path, coinrun_shards: Path, tmp_path: Path):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "tokenizer",
                "--model",
                str(trained / "export"),
                "--data",
                str(coinrun_shards / "val"),
                "--clips",
                "4",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "tokenizer_eval.json").read_text())
    for key in ("psnr", "ssim", "usage", "perplexity", "codes_used", "baseline_mean_frame_psnr", "clips"):
        assert key in report
    assert report["clips"] == 4 and 0 < report["usage"] <= 1 and report["psnr"] > 0
    assert (out / "tokenizer_eval.png").stat().st_size > 0


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--model.init_args.model.no_such_field=3", "no_such_field"),
        ("--trainer.max_stepz=3", "max_stepz"),
        ("--data.train_shards=/nonexistent/shards-{000000..000003}.tar", "does not exist"),
        ("--model.init_args.model.image_size=32", "expects 32x32"),
    ],
)
def test_bad_config_fails_before_training_with_one_line(coinrun_shards, tmp_path, capsys, override, needle):
    args = fit_args(coinrun_shards, tmp_path / "bad", "--trainer.max_steps=2", override)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad" / "checkpoints").exists()  # nothing trained


def test_large_config_scaled_down_builds_and_runs_a_step(coinrun_shards: Path, tmp_path: Path):
    large = str(ROOT / "configs" / "large" / "tokenizer.yaml")
    args = fit_args(
        coinrun_shards,
        tmp_path / "large",
        "--trainer.max_steps=1",
        "--trainer.devices=1",
        "--model.init_args.model.image_size=64",
        "--model.init_args.model.width=32",
        "--model.init_args.model.encoder_depth=1",
        "--model.init_args.model.decoder_depth=1",
        "--model.init_args.model.num_heads=2",
        "--data.num_frames=4",
        "--trainer.limit_val_batches=0",
    )
    args[2] = large
    assert main(args) == 0
    cfg = json.loads((tmp_path / "large" / "export" / "config.json").read_text())
    assert cfg["patch_size"] == 4 and cfg["num_codes"] == 1024 and cfg["width"] == 32


def test_default_logger_is_wandb_offline_with_media(coinrun_shards: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [
        a for a in fit_args(coinrun_shards, tmp_path / "w", "--trainer.max_steps=2") if a != "--trainer.logger=false"
    ]
    args += ["--trainer.val_check_interval=2"]
    assert main(args) == 0
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline: nothing was sent anywhere
    assert list((tmp_path / "w" / "media").glob("val_reconstruction_*.mp4"))  # the video logged to wandb


def test_bf16_mixed_with_fused_adamw_clips_and_trains(coinrun_shards: Path, tmp_path: Path):
    """The GPU default (bf16-mixed, fused AdamW, clipping at 1.0), here on CPU: Lightning's own clipping refuses
    fused optimizers under mixed precision, so the stages clip themselves (found on an H200)."""
    args = fit_args(coinrun_shards, tmp_path / "bf16", "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    assert main([*args, "--trainer.precision=bf16-mixed", "--model.init_args.optim.fused=true"]) == 0
    ckpt = torch.load(tmp_path / "bf16" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())

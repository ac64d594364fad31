"""The LAM stage as a user runs it: `genie fit` on the tiny config, export, `genie eval lam`, the big configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from genie.cli import main
from genie.data.loader import ClipStream
from genie.models.lam import LatentActionModel
from genie.stages.base import load_stage_checkpoint

from .conftest import cli_fit_args
from .test_distributed import VQ_SMALL
from .test_resume_exact import StopAt

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


class NormLog(Callback):
    """Test instrument: the latent normalisation's phase in each training step, and every latent it calibrated on."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.phases: list[str] = []
        self.calibrated: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        norm = pl_module.net.latent_norm

        def keep(module, args) -> None:
            if module.training and module.phase_name == "calibrating":
                self.calibrated.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        norm.register_forward_pre_hook(keep)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.phases.append(pl_module.net.latent_norm.phase_name)

    def on_train_end(self, trainer, pl_module) -> None:  # before the stage's own (which may freeze): as trained
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"phases{rank}.json").write_text(json.dumps(self.phases))
        latents = torch.cat(self.calibrated) if self.calibrated else torch.zeros(0)
        norm = {k: v.clone() for k, v in pl_module.net.latent_norm.state_dict().items()}
        torch.save({"calibrated": latents, "norm": norm}, self.out / f"rank{rank}.pt")


STEPS = 12
FREEZE = ["--model.init_args.model.norm_freeze_fraction=0.5", "--model.init_args.model.norm_calibration_batches=3"]


def fit_with_freeze(shards: Path, root: Path, *extra: str) -> dict[str, torch.Tensor]:
    args = fit_args(TINY, shards, root, *VQ_SMALL, *FREEZE, f"--trainer.max_steps={STEPS}", "--checkpoint_every=4")
    args += ["--data.val_shards=null", "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false"]
    assert main([*args, *extra]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def test_latent_statistics_are_measured_then_fixed_and_resume_exactly(sprites_shards: Path, tmp_path: Path):
    """Half-way through training the LAM measures its latent statistics over 3 batches (exactly: the mean and
    variance of every latent it saw), then normalises with them in training as in eval mode, so the exported
    model's eval-mode codes are the codes training gives. A run stopped while calibrating and resumed ends
    bitwise equal to the uninterrupted one (the phase and the partial statistics travel in the checkpoint)."""
    log = [f"--trainer.callbacks+={__name__}.NormLog", f"--trainer.callbacks.out={tmp_path / 'log'}"]
    whole = fit_with_freeze(sprites_shards, tmp_path / "whole", *log)
    phases = json.loads((tmp_path / "log" / "phases0.json").read_text())
    assert phases == ["batch"] * 6 + ["calibrating"] * 3 + ["frozen"] * 3
    latents = torch.load(tmp_path / "log" / "rank0.pt", weights_only=True)["calibrated"]
    assert latents.shape == (3 * 4 * 3, 8)  # 3 batches of 4 clips x 3 transitions
    torch.testing.assert_close(whole["net.latent_norm.running_mean"], latents.mean(0))
    torch.testing.assert_close(whole["net.latent_norm.running_var"], latents.var(0, unbiased=False))

    exported = LatentActionModel.from_pretrained(tmp_path / "whole" / "export")
    assert exported.latent_norm.phase_name == "frozen"
    for batch in ClipStream(str(sprites_shards / "val"), num_frames=4, batch_size=4, train=False, max_clips=16):
        frames = batch["frames"]
        assert torch.equal(exported.infer_actions(frames, as_in_training=True), exported.infer_actions(frames))

    stop = [f"--trainer.callbacks+={StopAt.__module__}.StopAt", "--trainer.callbacks.step=8"]  # while calibrating
    with pytest.raises(AssertionError):  # the stopped run ends at step 8
        fit_with_freeze(sprites_shards, tmp_path / "cut", *stop)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    norm = {k.rsplit(".", 1)[1]: v for k, v in cut["state_dict"].items() if k.startswith("net.latent_norm.")}
    assert int(norm["phase"]) == 1 and int(norm["calibration_batches"]) == 2  # 2 of the 3 batches measured
    resumed = fit_with_freeze(sprites_shards, tmp_path / "cut", "--ckpt_path=last")
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(whole)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow  # ~22 s of DDP start-up; tests/models/test_lam.py sums the statistics over ranks in the default suite
def test_two_ranks_calibrate_the_same_statistics_from_all_their_latents(sprites_shards: Path, tmp_path: Path):
    """Under DDP both ranks switch phases at the same steps (a time budget set: rank 0 decides) and end with the same
    fixed statistics, those of every latent either rank calibrated on. ~1 min."""
    from .test_distributed import fit_2_ranks

    log = [f"--trainer.callbacks+={__name__}.NormLog", f"--trainer.callbacks.out={tmp_path / 'log'}"]
    args = [*VQ_SMALL, *FREEZE[:1], "--model.init_args.model.norm_calibration_batches=2", "--trainer.max_steps=6"]
    args += ["--checkpoint_every=6", "--model.init_args.optim.budget_seconds=100000", *log]
    fit_2_ranks(Path(TINY), sprites_shards, tmp_path / "run", *args)
    records = [torch.load(tmp_path / "log" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    expected = ["batch"] * 3 + ["calibrating"] * 2 + ["frozen"]
    for rank in (0, 1):
        assert json.loads((tmp_path / "log" / f"phases{rank}.json").read_text()) == expected
    assert all(torch.equal(records[0]["norm"][k], records[1]["norm"][k]) for k in records[0]["norm"])
    every = torch.cat([r["calibrated"] for r in records])  # 2 batches x 2 ranks x 2 clips x 3 transitions
    assert every.shape[0] == 24 and not torch.equal(records[0]["calibrated"], records[1]["calibrated"])
    torch.testing.assert_close(records[0]["norm"]["running_mean"], every.mean(0))
    torch.testing.assert_close(records[0]["norm"]["running_var"], every.var(0, unbiased=False))

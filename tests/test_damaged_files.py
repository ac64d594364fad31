"""A truncated or overwritten model.safetensors, config.json or checkpoint: one `error:` line naming the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from genie.cli import main
from genie.models.hub import DamagedFileError
from genie.models.sampler import SamplerConfig
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import load_checkpoint
from genie.stages.tokenizer import TokenizerStage
from tests.stages.conftest import cli_fit_args
from tests.worlds import tiny_world_parts, write_tiny_world

ROOT = Path(__file__).resolve().parents[1]
DAMAGE = {
    "half": lambda data: data[: len(data) // 2],
    "last_byte": lambda data: data[:-1],
    "header_only": lambda data: data[:64],
    "empty": lambda data: b"",
    "zeros": lambda data: bytes(len(data)),
}


def damage(path: Path, how: str) -> Path:
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int, path: Path) -> str:
    """The command failed with exit code 2 and ended in a single stderr line that names ``path``; that line.

    Lines before it may be transformers' progress bars of the parts that did load (a world's other models).
    """
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    assert f"{path} is damaged or truncated" in last and "re-export or re-download" in last, err
    return last


@pytest.fixture
def tokenizer_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tiny_world_parts()[0].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how", list(DAMAGE))
def test_eval_of_a_damaged_model_safetensors_is_one_line(tokenizer_copy: Path, how: str, capsys):
    weights = damage(tokenizer_copy / "model.safetensors", how)
    capsys.readouterr()
    rc = main(["eval", "tokenizer", "--model", str(tokenizer_copy), "--data", str(tokenizer_copy / "none")])
    one_line_error(capsys, rc, weights)


def test_from_pretrained_raises_a_value_error_naming_the_file(tokenizer_copy: Path):
    VideoTokenizer.from_pretrained(tokenizer_copy)  # intact: loads
    weights = damage(tokenizer_copy / "model.safetensors", "half")
    with pytest.raises(DamagedFileError, match="incomplete metadata") as info:
        VideoTokenizer.from_pretrained(tokenizer_copy)
    assert isinstance(info.value, ValueError) and info.value.path == weights
    damage(tokenizer_copy / "config.json", "half")
    with pytest.raises(DamagedFileError, match="config.json is damaged or truncated \\(not valid JSON"):
        VideoTokenizer.from_pretrained(tokenizer_copy)


@pytest.mark.parametrize("part", ["dynamics/model.safetensors", "lam/config.json", "world.json"])
def test_rollout_of_a_world_with_a_damaged_file_is_one_line(tmp_path: Path, part: str, capsys):
    world = write_tiny_world(tmp_path / "world")
    broken = damage(world / part, "half")
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    capsys.readouterr()
    args = ["rollout", "--world", str(world), "--prompt", str(tmp_path / "p.png"), "--out", str(tmp_path / "o.gif")]
    rc = main([*args, "--actions", "1", "--device", "cpu"])
    one_line_error(capsys, rc, broken)


@pytest.fixture
def stage_ckpt(tmp_path: Path) -> Path:
    """A tokenizer stage checkpoint as `genie fit` writes it (the parts `genie export` reads)."""
    model = TokenizerConfig(
        image_size=16, patch_size=4, num_frames=3, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
        mlp_ratio=2.0, code_dim=8, num_codes=16,
    )  # fmt: skip
    stage = TokenizerStage(model=model)
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(stage.hparams), "state_dict": stage.state_dict(), "global_step": 2}, path)
    return path


@pytest.mark.parametrize("how", list(DAMAGE))
def test_export_of_a_damaged_checkpoint_is_one_line(stage_ckpt: Path, tmp_path: Path, how: str, capsys):
    assert main(["export", str(stage_ckpt), "--out", str(tmp_path / "ok")]) == 0  # intact: exports
    damage(stage_ckpt, how)
    capsys.readouterr()
    rc = main(["export", str(stage_ckpt), "--out", str(tmp_path / "m")])
    one_line_error(capsys, rc, stage_ckpt)


def test_fit_resuming_from_a_damaged_checkpoint_is_one_line(stage_ckpt: Path, tmp_path: Path, capsys):
    damage(stage_ckpt, "half")
    config = str(ROOT / "configs" / "tiny" / "tokenizer.yaml")
    args = cli_fit_args(config, tmp_path / "shards", tmp_path / "run", f"--ckpt_path={stage_ckpt}")
    capsys.readouterr()
    one_line_error(capsys, main(args), stage_ckpt)


def test_a_whole_checkpoint_keeps_its_own_error(tmp_path: Path):
    """Only a broken file is reported as damaged: weights_only refusing an intact foreign checkpoint is not."""
    path = tmp_path / "foreign.ckpt"
    torch.save({"sampler": SamplerConfig()}, path)  # a pickled object: intact, but not plain data
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)

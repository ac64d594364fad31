"""`genie transfer` as a user runs it: two arms (pretrained, scratch), their curves, the report, bad input.
Plumbing on an untrained 16 px world; whether pretraining pays is tested in tests/stages/test_transfer_learning.py."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from genie.cli import main
from genie.models.dynamics import DynamicsModel
from genie.transfer import add_arguments, check_inputs, steps_to_reach


def test_transfer_runs_both_arms_and_reports_their_curves(tiny_world: Path, robot_shards_16: Path, tmp_path: Path):
    out = tmp_path / "transfer"
    argv = ["transfer", "--pretrained", str(tiny_world), "--robot", str(robot_shards_16), "--steps", "2"]
    argv += ["--eval-every", "1", "--clips", "2", "--horizon", "2", "--out", str(out)]
    argv += ["--unseen", str(robot_shards_16 / "val"), "--fit", "--data.num_frames=4", "--data.batch_size=4"]
    assert main(argv) == 0
    report = json.loads((out / "transfer.json").read_text())
    for arm in ("pretrained", "scratch"):
        assert [p["step"] for p in report["curves"][arm]] == [0, 1, 2]
        assert {"psnr_mean", "ssim_mean", "delta_psnr_t4", "adapter_accuracy"} <= set(report["final"][arm])
        assert report["unseen"][arm]["psnr_mean"] > 0
    assert report["target_psnr"] == pytest.approx(report["final"]["scratch"]["psnr_mean"] - 0.1)
    assert report["steps_to_target"]["scratch"] is not None  # it reaches its own final PSNR, at the latest
    assert (out / "transfer.png").stat().st_size > 0
    # the scratch arm trained fresh weights, the pretrained arm went on from the bundle's
    source = DynamicsModel.from_pretrained(tiny_world / "dynamics").state_dict()
    for arm, same_start in (("pretrained", True), ("scratch", False)):
        tuned = DynamicsModel.from_pretrained(out / arm / "export" / "dynamics").state_dict()
        drift = max((tuned[k] - source[k]).abs().max().item() for k in source if source[k].is_floating_point())
        assert (drift < 0.05) == same_start, (arm, drift)  # 2 steps at lr 1e-3 move a weight by ~2e-3
    # an earlier run is not overwritten by accident
    assert main(argv) == 2


def test_steps_to_reach_is_the_first_evaluated_step_at_the_target():
    points = [{"step": 0, "psnr_mean": 10.0}, {"step": 50, "psnr_mean": 12.5}, {"step": 100, "psnr_mean": 12.0}]
    assert steps_to_reach(points, 12.0) == 50
    assert steps_to_reach(points, 10.0) == 0
    assert steps_to_reach(points, 13.0) is None


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_input_is_refused_before_training(tiny_world: Path, robot_shards_16: Path, tmp_path: Path):
    ok = ["--pretrained", str(tiny_world), "--robot", str(robot_shards_16), "--out", str(tmp_path / "t")]
    check_inputs(parse(*ok))
    with pytest.raises(FileNotFoundError, match="not a world bundle"):
        check_inputs(parse(*ok, "--pretrained", str(tmp_path)))
    with pytest.raises(ValueError, match="robot train shards .* do not exist"):
        check_inputs(parse(*ok, "--robot", str(tmp_path)))
    with pytest.raises(ValueError, match=">= 1"):
        check_inputs(parse(*ok, "--steps", "0"))
    big = tmp_path / "world32"
    shutil.copytree(tiny_world, big)
    config = json.loads((big / "tokenizer" / "config.json").read_text())
    (big / "tokenizer" / "config.json").write_text(json.dumps({**config, "image_size": 32}))  # a 32 px world
    with pytest.raises(ValueError, match="16x16 clips but the world .* is 32x32"):
        check_inputs(parse(*ok, "--pretrained", str(big)))

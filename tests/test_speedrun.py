"""`genie speedrun` on CPU with a half-minute budget: every stage trains for its share of the wall clock, the
world is built and every metric lands in the report (quality at this budget is not asserted: see the README)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pytest

from genie.cli import main

BUDGET_MINUTES = 0.5
METRICS = [
    "tokenizer_psnr", "tokenizer_ssim", "tokenizer_codebook_usage", "lam_codes_used", "lam_nmi",
    "lam_nmi_effective", "lam_nmi_effective_chance", "lam_nmi_effective_adjusted", "lam_transitions",
    "rollout_psnr_10_from_1", "rollout_ssim_10_from_1", "rollout_psnr_10_from_1_decoded", "copy_psnr_10_from_1",
    "delta_psnr_t4", "teacher_forced_token_accuracy",
]  # fmt: skip


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory, coinrun_shards) -> tuple[Path, dict, str]:  # coinrun_shards: skips without procgen
    out = tmp_path_factory.mktemp("speedrun")
    args = ["speedrun", "--budget-minutes", str(BUDGET_MINUTES), "--out", str(out / "run"), "--data", str(out / "data")]
    # --lam-training joint: the LAM trains on inside the dynamics stage (the default, frozen, is the same path less
    # that stage's one option), so the plumbing of both is covered: the world must take the dynamics stage's LAM
    assert main([*args, "--episodes", "16", "--preset", "cpu", "--true-actions", "--lam-training", "joint"]) == 0
    return out, json.loads((out / "run" / "speedrun.json").read_text()), str(out / "run" / "speedrun.png")


# the two tests below share ~70 s of plumbing (the clock split and the report; quality at this budget is not
# asserted): under `pytest -m slow`
@pytest.mark.slow
def test_every_stage_trains_for_its_share(speedrun):
    _, report, _ = speedrun
    budget = BUDGET_MINUTES * 60
    shares = [s["share"] for s in report["stages"].values()]
    assert list(report["stages"]) == ["tokenizer", "lam", "dynamics"] and math.isclose(sum(shares), 1, abs_tol=1e-3)
    for name, stage in report["stages"].items():
        share = budget * stage["share"]
        assert stage["budget_seconds"] == pytest.approx(share, abs=0.2)
        # stopped by the clock: trained about its share (Lightning checks the time between steps)
        assert 0.8 * share <= stage["train_seconds"] <= share + 15, (name, stage)
        assert stage["global_step"] >= 5 and math.isfinite(stage["last_train_loss"]), (name, stage)
        assert stage["global_step"] < stage["max_steps"]  # the clock stopped it, not the step count
    assert sum(s["wall_seconds"] for s in report["stages"].values()) <= budget + 60


@pytest.mark.slow
def test_the_report_has_every_metric_and_a_summary_picture(speedrun):
    out, report, png = speedrun
    m = report["metrics"]
    for key in METRICS:
        assert isinstance(m[key], float | int) and math.isfinite(m[key]), key
    assert len(m["rollout_psnr_per_step"]) == len(m["rollout_ssim_per_step"]) == 16
    assert m["eval_clips"] > 0 and report["data"]["clips"] > 0 and report["preset"] == "cpu"
    assert m["lam_transitions"] == 19 * m["eval_clips"]  # the LAM slides over every transition of the clips
    assert Path(png).stat().st_size > 10_000
    assert (out / "run" / "world" / "world.json").is_file()
    from safetensors.torch import load_file

    assert report["lam_training"] == "joint"
    joint, trained_apart, in_world = (
        load_file(out / "run" / p / "model.safetensors") for p in ("dynamics/export/lam", "lam/export", "world/lam")
    )
    assert all(joint[k].equal(in_world[k]) for k in joint)  # the world plays with the LAM the dynamics learned
    assert not joint["to_code.weight"].equal(trained_apart["to_code.weight"])  # which trained on in that stage
    from PIL import Image

    with Image.open(out / "run" / "rollouts.gif") as gif:  # real | inferred actions | each of the 6 latent actions
        assert gif.n_frames == 13 and gif.size == (3 * (8 * 64 + 7 * 2), 3 * 64)
    bound = report["true_actions"]  # the upper bound: the dynamics stage again, on CoinRun's own 15 actions
    assert bound["steps"] >= 5 and len(bound["rollout_psnr_per_step"]) == 16
    assert all(math.isfinite(bound[k]) for k in ("rollout_psnr_10_from_1", "delta_psnr_t4"))
    world = json.loads((out / "run" / "world_true_actions" / "world.json").read_text())
    assert world["num_actions"] == 15 and world["action_source"] == "true"
    # the data is cached: a second run with the same settings reuses the shards
    assert not report["data"]["reused"]
    from genie.speedrun import PRESETS, prepare_data

    args = argparse.Namespace(data=out / "data", episodes=16, seed=0, policy=None, overwrite_data=False)
    again = prepare_data(args, PRESETS["cpu"])
    assert again["reused"] and again["clips"] == report["data"]["clips"]


def test_bad_arguments_are_one_line(tmp_path: Path, capsys):
    base = ["speedrun", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--preset", "cpu"]
    for extra, text in ((["--budget-minutes", "0"], "--budget-minutes must be positive"),
                        (["--budget-minutes", "1", "--shares", "0.5,0.5"], "--shares must be 3 positive numbers"),
                        (["--budget-minutes", "1", "--shares", "a,b,c"], "--shares must be 3 numbers")):  # fmt: skip
        assert main([*base, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and text in err[0], err
    assert not (tmp_path / "data").exists()  # nothing was made before the arguments were checked


def test_a_cache_made_with_another_policy_is_refused_then_remade_on_request(tmp_path: Path, capsys):
    pytest.importorskip("procgen")
    from genie.speedrun import PRESETS, SpeedrunError, prepare_data

    preset = PRESETS["cpu"] | {"max_episode_frames": 24}
    args = argparse.Namespace(data=tmp_path / "data", episodes=2, seed=0, policy="explore", overwrite_data=False)
    first = prepare_data(args, preset)
    assert first["policy"] == "explore" and not first["reused"]
    args.policy = None  # the preset's: sticky
    with pytest.raises(SpeedrunError, match="--overwrite-data"):
        prepare_data(args, preset)
    args.overwrite_data = True
    again = prepare_data(args, preset)
    assert again["policy"] == PRESETS["cpu"]["policy"] and not again["reused"]
    settings = json.loads((tmp_path / "data" / "train" / "prep_settings.json").read_text())
    assert settings["policy"] == PRESETS["cpu"]["policy"]


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_speedrun.sh"


def test_gpu_speedrun_script_parses_and_tabulates_every_number(tmp_path: Path):
    """scripts/gpu_speedrun.sh: valid bash (shellcheck-clean where shellcheck is installed), and its report step
    copies speedrun.json/png to $OUT with a markdown table holding every number (REPORT_ONLY=1: no run)."""
    import shutil
    import subprocess

    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    report = {
        "budget_minutes": 8, "preset": "gpu", "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
        "data": {"seconds": 61.2, "reused": False},
        "stages": {"tokenizer": {"global_step": 4321, "train_seconds": 167.9}},
        "metrics": {"tokenizer_psnr": 36.123456, "delta_psnr_t4": 0.7321, "lam_nmi": None,
                    "rollout_psnr_per_step": [25.5, 24.25], "copy_psnr_per_step": [22.0, 21.0]},
    }  # fmt: skip
    (run / "speedrun.json").write_text(json.dumps(report))
    (run / "speedrun.png").write_bytes(b"\x89PNG fake")
    env = {**os.environ, "REPORT_ONLY": "1", "RUN_DIR": str(run), "OUT": str(out), "PYTHON": sys.executable}
    subprocess.run(["bash", str(SCRIPT)], check=True, env=env, capture_output=True, timeout=60)
    assert (out / "speedrun.json").read_text() == (run / "speedrun.json").read_text()
    assert (out / "speedrun.png").read_bytes() == b"\x89PNG fake"
    table = (out / "speedrun.md").read_text()
    assert "gpu preset, 8 min of training on NVIDIA H100 80GB HBM3" in table
    assert "| tokenizer PSNR (dB) | 36.12 |" in table and "| ΔtPSNR(4) (dB) | 0.7321 |" in table
    assert "| copying the prompt frame, same 10 steps: PSNR (dB) | 21.5 |" in table
    for row in ("| data.seconds | 61.2 |", "| stages.tokenizer.global_step | 4321 |", "| metrics.lam_nmi | - |",
                "| metrics.rollout_psnr_per_step | 25.5, 24.25 |", "| gpu | NVIDIA H100 80GB HBM3 |"):  # fmt: skip
        assert row in table, row


def test_lam_training_choices_are_the_stages():
    """The speedrun spells the dynamics stage's LAM_TRAINING choices itself (importing the stage would pull torch into
    argument parsing): they must stay the same, and every preset must pick one of them."""
    from genie import speedrun
    from genie.stages.dynamics import LAM_TRAINING

    parser = argparse.ArgumentParser()
    speedrun.add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "lam_training")
    assert tuple(action.choices) == LAM_TRAINING
    assert all(p["lam_training"] in LAM_TRAINING for p in speedrun.PRESETS.values())


def test_changed_mean_weights_each_step_by_its_changed_frames():
    from genie.speedrun import changed_mean

    report = {"changed_frames_per_step": [2, 0, 1, 5], "x": [10.0, None, 40.0, 99.0]}
    assert changed_mean(report, "x", steps=3) == (2 * 10.0 + 40.0) / 3
    assert changed_mean({"changed_frames_per_step": [0, 0], "x": [None, None]}, "x") is None


def test_prep_tokenize_and_a_joint_lam_are_refused_together(tmp_path, capsys):
    args = ["speedrun", "--budget-minutes", "1", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")]
    assert main([*args, "--prep-tokenize", "--lam-training", "joint"]) != 0
    assert "drop one of them" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before any data was made


@pytest.mark.slow
def test_the_dynamics_share_starts_by_tokenizing_the_shards(speedrun, tmp_path):
    """``--prep-tokenize`` (off by default; forced here at a 18 s dynamics share): the dynamics stage trains on token
    shards made within its share from the run's tokenizer and LAM; the world and its report come out as before."""
    out, _, _ = speedrun
    run = tmp_path / "run"
    args = ["speedrun", "--budget-minutes", str(BUDGET_MINUTES), "--out", str(run), "--data", str(out / "data")]
    assert main([*args, "--episodes", "16", "--preset", "cpu", "--prep-tokenize"]) == 0  # the first run's data
    report = json.loads((run / "speedrun.json").read_text())
    dyn = report["stages"]["dynamics"]
    assert dyn["train_shards"] == "tokens" and dyn["tokenize_seconds"] > 0 and dyn["global_step"] >= 5
    assert dyn["fit_seconds"] == pytest.approx(
        max(dyn["budget_seconds"] - dyn["tokenize_seconds"], dyn["budget_seconds"] / 2), abs=0.2
    )
    assert sorted(p.name for p in (run / "tokens" / "train").glob("*.tar"))  # shards of tokens + latent actions
    assert report["lam_training"] == "frozen" and math.isfinite(report["metrics"]["rollout_psnr_10_from_1"])

"""Learning test of the whole pipeline on the synthetic sprites: tokenizer + LAM -> token shards -> dynamics ->
world bundle -> ``genie eval world``.

What must hold on held-out clips (prompted with one real frame, rolled out 4+ steps):

- controllability: driving the world with the actions the LAM infers from the real clip tracks the real
  clip better than driving it with random actions (ΔtPSNR at t = 4 clearly positive);
- prediction: the rollout with inferred actions beats copying the prompt frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genie.cli import main

from .conftest import train_from_config

HORIZON = 6


@pytest.fixture(scope="session")
def sprites_world(sprites_shards: Path, sprites_tokenizer: tuple, sprites_lam: tuple, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    tok, lam = str(sprites_tokenizer[0]), str(sprites_lam[0])
    tokens = root / "tokens"
    for split in ("train", "val"):
        args = ["prep", "tokenize", "--data", str(sprites_shards / split), "--out", str(tokens / split)]
        assert main([*args, "--tokenizer", tok, "--lam", lam, "--device", "cpu"]) == 0
    stage, _ = train_from_config("tiny/dynamics.yaml", str(tokens / "train"), tokenizer=tok, lam=lam)
    dyn = stage.export(root / "dynamics")
    world = root / "bundle"
    args = ["export", "world", "--tokenizer", tok, "--lam", lam, "--dynamics", str(dyn), "--out", str(world)]
    assert main(args) == 0
    return world


def test_world_is_controllable_and_predicts(sprites_world: Path, sprites_shards: Path, tmp_path: Path):
    out = tmp_path / "eval"
    args = ["eval", "world", "--world", str(sprites_world), "--data", str(sprites_shards / "val"), "--out", str(out)]
    assert main([*args, "--clips", "48", "--horizon", str(HORIZON), "--steps", "4", "--device", "cpu"]) == 0
    r = json.loads((out / "world_eval.json").read_text())
    assert (out / "world_eval.png").stat().st_size > 0
    per_step = {k: [round(x, 2) for x in r[f"{k}_per_step"]] for k in ("psnr", "psnr_random", "copy_psnr")}
    print(
        f"teacher-forced acc {r['teacher_forced_token_accuracy']:.3f}; PSNR per step {per_step}; tokenizer "
        f"{[round(x, 2) for x in r['tokenizer_psnr_per_step']]}; ΔtPSNR(4) {r['delta_psnr_t4']:.2f}"
    )
    assert r["clips"] == 48 and r["horizon"] == HORIZON
    assert r["delta_psnr_t4"] > 1.0
    assert r["psnr_mean"] > r["copy_psnr_mean"] + 1.0

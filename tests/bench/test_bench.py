"""The benchmarks run end to end on tiny sizes and write their JSON reports."""

from __future__ import annotations

import json

import pytest

from genie.cli import main


def test_bench_sample_reports_cache_and_nocache(tmp_path):
    out = tmp_path / "s.json"
    assert (
        main(
            [
                "bench",
                "sample",
                "--grid",
                "4",
                "--width",
                "32",
                "--heads",
                "2",
                "--depth",
                "1",
                "--mlp",
                "64",
                "--codes",
                "64",
                "--context",
                "3",
                "--frames",
                "2",
                "--steps",
                "2",
                "--window",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["cache", "nocache"] and all(r["ms_per_frame"] > 0 for r in rows)


def test_bench_train_takes_model_dims(tmp_path):
    out = tmp_path / "t.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--stage",
                "tokenizer",
                "--image-size",
                "32",
                "--frames",
                "2",
                "--batch-size",
                "2",
                "--patch",
                "8",
                "--width",
                "32",
                "--heads",
                "2",
                "--depth",
                "1",
                "--mlp",
                "64",
                "--codes",
                "64",
                "--precision",
                "32",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())["results"]
    assert (row["width"], row["patch"], row["image"], row["batch"]) == (32, 8, 32, 2)
    assert row["s_per_step"] > 0 and row["GFLOP_per_step"] > 0


def test_bench_data_table(tmp_path):
    out = tmp_path / "d.json"
    assert (
        main(
            [
                "bench",
                "data",
                "--sizes",
                "32",
                "--workers",
                "0",
                "--batches",
                "2",
                "--batch-size",
                "2",
                "--num-frames",
                "4",
                "--clip-frames",
                "8",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())["results"]
    assert row["frames_per_s"] > 0


def test_bench_sample_reads_a_stage_config(tmp_path):
    out = tmp_path / "s.json"
    args = ["bench", "sample", "--config", "configs/tiny/dynamics.yaml", "--context", "2", "--frames", "1"]
    assert main([*args, "--steps", "2", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["width"], r["tokens"], r["conditioning"]) for r in rows} == {(96, 36, "film")}


def test_bench_train_dynamics_times_token_and_video_batches(tmp_path):
    out = tmp_path / "d.json"
    args = ["bench", "train", "--stage", "dynamics", "--batch-size", "2", "--frames", "3", "--precision", "32"]
    assert main([*args, "--steps", "1", "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["inputs"] for r in rows] == ["tokens", "frames"]  # frames: untrained stand-in tokenizer + LAM first
    assert all(r["s_per_step"] > 0 and r["image"] == 24 for r in rows)


def test_bench_train_sizes_the_dynamics_grid_from_image_size_and_patch():
    """--image-size 64 --patch 8 means 8x8 tokens for the dynamics model too (it has grid_size, not image_size)."""
    import argparse

    from genie.bench.train import apply_overrides

    sizes = dict(frames=None, width=None, heads=None, codes=None, actions=None, depth=None, mlp=None)
    args = argparse.Namespace(image_size=64, patch=8, **sizes)
    assert apply_overrides({"grid_size": 6}, {"grid_size", "width"}, args)["grid_size"] == 8
    assert "grid_size" not in apply_overrides({}, {"image_size", "patch_size"}, args)  # the tokenizer's own fields


def test_flop_counter_counts_the_cpu_fast_linear():
    """The fp32 CPU linear runs oneDNN's inner product; the benchmark's FLOP count must include it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from genie.bench.train import _count_onednn_flops
    from genie.models import cpu_ops

    if not cpu_ops.onednn_available():
        pytest.skip("PyTorch built without oneDNN")
    _count_onednn_flops()
    x, w = torch.randn(600, 32), torch.randn(16, 32)
    with FlopCounterMode(display=False) as counter:
        cpu_ops.linear(x, w)
    assert counter.get_total_flops() == 2 * 600 * 32 * 16


def test_bench_sample_times_a_world_end_to_end(tmp_path, capsys):
    from tests.worlds import write_tiny_world

    world = write_tiny_world(tmp_path / "world", steps=3)
    out = tmp_path / "w.json"
    args = ["bench", "sample", "--world", str(world), "--frames", "2", "--batch-size", "3", "--json", str(out)]
    args += ["--modes", "eager"]  # compiling is tested in tests/models/test_dynamics.py
    assert main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["what"], r["batch"]) for r in rows] == [("world.step", 1), ("world x3", 3), ("dynamics only", 1)]
    for r in rows:
        assert r["steps"] == 3 and r["ms_per_step"] > 0 and r["mode"] == "eager"
    assert rows[1]["frames_per_s"] == pytest.approx(3000 / rows[1]["ms_per_step"])
    assert main(["bench", "sample", "--world", str(world), "--modes", "cache"]) != 0
    assert "eager and compiled" in capsys.readouterr().err


def test_bench_sample_builds_an_untrained_world_from_stage_configs(tmp_path, capsys):
    import yaml

    small = {"width": 32, "num_heads": 2, "mlp_ratio": 2.0, "num_frames": 4, "image_size": 16, "patch_size": 4}
    models = {
        "tokenizer": {**small, "encoder_depth": 1, "decoder_depth": 1, "code_dim": 8, "num_codes": 32},
        "lam": {**small, "encoder_depth": 1, "decoder_depth": 1, "code_dim": 4, "num_actions": 3},
        "dynamics": {"width": 32, "num_heads": 2, "depth": 1, "num_codes": 32, "grid_size": 4, "num_actions": 3},
    }
    for name, model in models.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"model": model}}}))
    out = tmp_path / "w.json"
    args = ["bench", "sample", "--world", str(tmp_path), "--frames", "2", "--steps", "2", "--json", str(out)]
    args += ["--modes", "eager"]
    assert main([*args, "--batch-size", "2"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["what"] == "world.step" and rows[0]["steps"] == 2 and rows[0]["tokens"] == 16
    (tmp_path / "lam.yaml").unlink()
    assert main(args) != 0
    assert "lam.yaml is missing" in capsys.readouterr().err

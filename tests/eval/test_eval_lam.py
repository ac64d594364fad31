"""`genie eval lam` on shards with true actions: JSON with usage and NMI, and a PNG."""

from __future__ import annotations

import json

import torch

from genie.cli import main
from genie.eval.actions import COINRUN_EFFECTIVE
from genie.eval.metrics import adjusted_nmi, contingency, nmi_chance, nmi_from_contingency
from genie.models.lam import LAMConfig, LatentActionModel


def test_eval_lam_reports_usage_nmi_and_confusion(tmp_path):
    shards = tmp_path / "sprites"
    assert (
        main(
            [
                "prep",
                "sprites",
                "--out",
                str(shards),
                "--episodes",
                "4",
                "--val-episodes",
                "4",
                "--size",
                "32",
                "--clip-frames",
                "8",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    model_dir = tmp_path / "lam"
    LatentActionModel(
        LAMConfig(
            image_size=32,
            patch_size=8,
            num_frames=8,
            width=32,
            encoder_depth=1,
            decoder_depth=1,
            num_heads=2,
            code_dim=8,
            num_actions=4,
        )
    ).save_pretrained(model_dir)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "lam",
                "--model",
                str(model_dir),
                "--data",
                str(shards / "val"),
                "--num-frames",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "lam_eval.json").read_text())
    assert report["clips"] == 4 and report["num_actions"] == 4
    assert abs(sum(report["usage_histogram"]) - 1) < 1e-6 and 1 <= report["codes_used"] <= 4
    assert 0 <= report["nmi"] <= 1 and len(report["confusion"]) >= 2  # true actions were found
    assert report["data_source"] == "sprites" and "nmi_effective" not in report  # no table: raw actions only
    assert 0 <= report["train_eval_agreement"] <= 1 and report["latent_norm"] == "batch"
    assert (out / "lam_eval.png").stat().st_size > 0


def test_eval_lam_on_coinrun_reports_raw_and_effective_nmi(coinrun_shards, tmp_path, capsys):
    """CoinRun clips name their source, so NMI is also scored against the 9 effective actions and the movements."""
    model_dir = tmp_path / "lam"
    config = LAMConfig(
        image_size=64, patch_size=16, num_frames=4, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
        code_dim=8, num_actions=6,
    )  # fmt: skip
    LatentActionModel(config).save_pretrained(model_dir)
    out = tmp_path / "eval"
    args = ["eval", "lam", "--model", str(model_dir), "--data", str(coinrun_shards / "val"), "--num-frames", "4"]
    assert main([*args, "--clips", "8", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "lam_eval.json").read_text())
    assert report["data_source"] == "coinrun" and report["clips"] == 8
    for key in ("nmi", "nmi_effective", "nmi_movement"):
        assert 0 <= report[key] <= 1 and 0 <= report[f"{key}_chance"] <= 1, key
        assert report[f"{key}_adjusted"] == adjusted_nmi(report[key], report[f"{key}_chance"])
    assert report["transitions_with_true_actions"] == 8 * 3
    assert len(report["effective_action_classes"]) == 9 and len(report["movement_action_classes"]) == 6
    assert report["effective_action_classes"][4] == [4, 9, 10, 11, 12, 13, 14]
    assert 0 <= report["train_eval_agreement"] <= 1
    printed = capsys.readouterr().out
    assert "effective actions" in printed and "agree with training mode" in printed
    assert "chance" in printed and "on 24 transitions" in printed
    # clips longer than the LAM's 4-frame window: it slides, and every transition counts
    assert main([*args[:-1], "12", "--clips", "8", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "lam_eval.json").read_text())["transitions_with_true_actions"] == 8 * 11


def test_chance_nmi_is_what_unrelated_labels_score_and_adjusted_nmi_removes_it():
    g = torch.Generator().manual_seed(0)
    effective = torch.tensor(COINRUN_EFFECTIVE)
    for n, biased in ((96, True), (5000, False)):
        true = effective[torch.randint(0, 15, (n,), generator=g)]
        unrelated = torch.randint(0, 6, (n,), generator=g)
        table = contingency(unrelated, true, 6, 9)
        nmi, chance = nmi_from_contingency(table), nmi_chance(table)
        assert (nmi > 0.08) == biased and (chance > 0.08) == biased  # 96 samples: ~0.14 for nothing at all
        assert abs(adjusted_nmi(nmi, chance)) < 0.2 and abs(nmi - chance) < 0.05
        same = contingency(true % 6, true, 6, 9)  # the codes determine the classes up to merging some
        assert nmi_from_contingency(same) > 0.7 and adjusted_nmi(nmi_from_contingency(same), nmi_chance(same)) > 0.65
    perfect = contingency(true, true, 9, 9)
    assert nmi_from_contingency(perfect) == 1.0 and adjusted_nmi(1.0, nmi_chance(perfect)) == 1.0


def test_data_source_of_unreadable_shards_is_unknown(tmp_path):
    from genie.eval.lam import data_source

    assert data_source(str(tmp_path / "missing")) is None  # then only the raw-action NMI is reported


def test_eval_lam_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["eval", "lam", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not an exported model folder" in capsys.readouterr().err

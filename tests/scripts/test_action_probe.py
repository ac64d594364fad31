"""scripts/action_probe.py: both probe networks run end to end on real CoinRun clips and report their NMI line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "action_probe.py"


def load_script():
    spec = importlib.util.spec_from_file_location("action_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("net, extra", [("cnn", ["--frames", "3"]), ("lam", ["--crop", "32"])])
def test_probe_reports_accuracy_and_nmi(coinrun_shards: Path, capsys, net: str, extra: list[str]) -> None:
    probe = load_script()
    shards = ["--train", str(coinrun_shards / "train"), "--val", str(coinrun_shards / "val")]
    probe.main([*shards, "--clip-frames", "16", "--steps", "3", "--batch-size", "4", "--net", net, *extra])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{net}, frames"), line
    nmi = float(re.search(r"NMI (\d\.\d+) \(chance", line).group(1))
    assert 0.0 <= nmi <= 1.0


@pytest.mark.parametrize("extra", [["--crop", "80"], ["--net", "lam", "--crop", "20"]])
def test_probe_refuses_a_crop_before_reading_any_data(tmp_path: Path, capsys, extra: list[str]) -> None:
    """Larger than the frame, or not a multiple of the LAM's patch size: a one-line usage error, and no shard is read
    (the paths do not exist)."""
    probe = load_script()
    with pytest.raises(SystemExit):
        probe.main(["--train", str(tmp_path / "none"), "--val", str(tmp_path / "none"), *extra])
    assert "--crop" in capsys.readouterr().err

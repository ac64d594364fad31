"""`genie prep inspect`: counts, actions, a contact sheet, and no crash on broken shards."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.inspect import sheet_size
from genie.cli import main
from genie.data.contract import ShardWriter, npy_bytes, read_samples, write_sample


def inspect(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["prep", "inspect", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if rc == 0 else {}


def test_report_on_a_coinrun_folder(coinrun_shards, tmp_path, capsys):
    shards = sorted(coinrun_shards.rglob("*.tar"))
    expected = {s: json.loads((coinrun_shards / s / "summary.json").read_text())["clips"] for s in ("train", "val")}
    sheet = tmp_path / "sheet.png"
    rc, report = inspect(capsys, str(coinrun_shards), "--sheet", str(sheet))
    assert rc == 0
    clips = sum(expected.values())
    assert report["shards"] == len(shards)
    assert report["clips"] == report["samples"] == clips and report["bad"] == 0 and not report["shard_errors"]
    assert {g: v["clips"] for g, v in report["groups"].items()} == expected
    assert report["resolutions"] == {"64x64": clips}
    assert report["frames_per_clip"] == {"min": 16, "mean": 16.0, "max": 16}
    assert report["fps"] == {"15": clips} and report["lossless"] == clips
    assert report["members"] == {"actions.npy": clips, "json": clips, "mp4": clips}
    actions = report["actions"]
    assert actions["present"] and actions["clips"] == clips
    assert actions["kind"] == "discrete [T-1]" and actions["dtype"] == "int64"
    assert 8 <= actions["distinct_values"] <= 15 and actions["min"] >= 0 and actions["max"] <= 14
    assert report["sheet"] == str(sheet)
    with Image.open(sheet) as img:
        assert img.size == sheet_size(min(8, clips), 8, 64, 64)


def test_table_output_and_default_sheet_location(coinrun_shards, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(coinrun_shards / "val", folder)
    assert main(["prep", "inspect", str(folder), "--clips", "2", "--frames", "3", "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "64x64" in out and "discrete" in out and "contact_sheet.png" in out
    with Image.open(folder / "contact_sheet.png") as img:
        assert img.size == sheet_size(2, 3, 128, 128)


def test_brace_pattern_single_tar_and_missing_shards(coinrun_shards, capsys):
    train = coinrun_shards / "train"
    n = len(list(train.glob("*.tar")))
    _, report = inspect(capsys, str(train / f"train-{{000000..{n - 1:06d}}}.tar"), "--no-sheet")
    assert report["shards"] == n and not report["shard_errors"] and report["sheet"] is None
    _, one = inspect(capsys, str(train / "train-000000.tar"), "--no-sheet")
    assert one["shards"] == 1 and one["clips"] == len(read_samples(train / "train-000000.tar"))
    _, missing = inspect(capsys, str(train / f"train-{{000000..{n:06d}}}.tar"), "--no-sheet")
    assert len(missing["shard_errors"]) == 1 and missing["clips"] == report["clips"]


def test_no_shards_is_a_clear_error(tmp_path, capsys):
    (tmp_path / ".parts").mkdir()
    (tmp_path / ".parts" / "job.tar").write_bytes(b"")  # an unfinished prep run's parts are not shards
    assert main(["prep", "inspect", str(tmp_path)]) == 2
    assert "no .tar shards" in capsys.readouterr().err


def corrupt_folder(src: Path, dst: Path) -> str:
    """Copy of ``src``'s shards: shard 0 rewritten with 4 broken samples, the last shard truncated.

    Returns:
        The key of the sample whose mp4 is cut (only decoding finds it).
    """
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.json", "*.png"))
    first = sorted(dst.glob("*.tar"))[0]
    good = read_samples(first)
    assert len(good) >= 5
    broken = [
        {**good[0][1], "json": b"{not json"},
        {**good[1][1], "actions.npy": b"\x93NUMPY garbage"},
        {k: v for k, v in good[2][1].items() if k != "mp4"},
        {**good[3][1], "mp4": good[3][1]["mp4"][:300]},  # looks like an mp4, fails to decode
    ]
    with tarfile.open(first, "w", format=tarfile.GNU_FORMAT) as tar:
        for (key, _), members in zip(good, broken, strict=False):
            write_sample(tar, key, members)
        for key, members in good[4:]:
            write_sample(tar, key, members)
    last = sorted(dst.glob("*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return good[3][0]


def test_broken_samples_and_shards_are_counted_not_fatal(coinrun_shards, tmp_path, capsys):
    folder = tmp_path / "broken"
    cut = corrupt_folder(coinrun_shards / "train", folder)
    rc, report = inspect(capsys, str(folder), "--decode-all", "--clips", "30")
    assert rc == 0
    assert len(report["shard_errors"]) == 1 and "end of data" in report["shard_errors"][0]
    # bad json, actions and missing mp4 are caught by the scan (plus maybe the sample the truncation cut)
    assert 3 <= report["bad"] <= 4
    reasons = " ".join(report["bad_examples"])
    assert "unreadable metadata" in reasons and "actions.npy unreadable" in reasons and "no video" in reasons
    # the cut mp4 is only found by decoding: in the sheet (it is picked: --clips covers all) and --decode-all
    assert any(cut in e for e in report["undecodable"])
    assert any(cut in e for e in report["sheet_errors"])
    assert report["sheet"] and Path(report["sheet"]).exists()
    assert main(["prep", "inspect", str(folder), "--no-sheet", "--strict"]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_truncation_at_a_member_boundary_is_detected(coinrun_shards, tmp_path, capsys):
    src = sorted((coinrun_shards / "train").glob("*.tar"))[0]
    with tarfile.open(src) as tar:
        cut = tar.getmembers()[6].offset  # a header boundary: tarfile alone reads a shorter, valid tar
    shard = tmp_path / "cut-000000.tar"
    shard.write_bytes(src.read_bytes()[:cut])
    _, report = inspect(capsys, str(shard), "--no-sheet")
    assert report["samples"] == 2 and len(report["shard_errors"]) == 1
    assert "truncated" in report["shard_errors"][0]


def test_continuous_actions_are_described(tmp_path, capsys):
    import numpy as np

    from genie.data.contract import ClipMeta
    from genie.data.video import encode_clip

    with ShardWriter(tmp_path, shard_size=10) as writer:
        for i in range(3):
            meta = ClipMeta(source="robot", fps=10, frames=4, width=8, height=8, video_id=f"r{i}")
            writer.write(
                f"r{i}_000000",
                {
                    "mp4": encode_clip(np.zeros((4, 8, 8, 3), np.uint8), 10, lossless=True),
                    "json": meta.to_bytes(),
                    "actions.npy": npy_bytes(np.full((3, 7), 0.5, np.float32)),
                },
            )
    _, report = inspect(capsys, str(tmp_path), "--no-sheet")
    assert report["actions"]["kind"] == "continuous [T-1, 7]" and report["actions"]["dtype"] == "float32"
    assert "distinct_values" not in report["actions"] and report["clips"] == 3


@pytest.mark.parametrize("bad_args", [["--clips", "0"], ["--frames", "0"]])
def test_bad_arguments(coinrun_shards, capsys, bad_args):
    assert main(["prep", "inspect", str(coinrun_shards), *bad_args]) == 2

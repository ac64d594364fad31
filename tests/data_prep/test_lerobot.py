"""`genie prep lerobot`: LeRobot-layout datasets (v2.1 and v3.0) -> shards with aligned actions.

Every dataset here is written by the test itself (tiny synthetic frames encoded with PyAV, parquet
with pyarrow): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from genie.cli import main
from genie.data.contract import ClipMeta, npy_load, read_samples
from genie.data.video import decode_clip

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

FPS, W, H, CLIP, FRAMES, ACTION_DIM = 10, 64, 48, 8, 20, 3
CAMERA = "observation.images.top"


def level(episode: int, t: int) -> int:
    """Each frame is one flat grey level that names it: frame t of episode e."""
    return 20 + 8 * t + 3 * episode


def action_rows(episode: int, rows: int) -> np.ndarray:
    t = np.arange(rows, dtype=np.float32)
    return np.stack([np.full_like(t, episode), t, np.sin(t)], axis=1).astype(np.float32)


def encode(frames: list[np.ndarray], codec: str) -> bytes:
    """An mp4 as LeRobot writes them (AV1 by default, H.264 in older datasets), frame i at i / FPS."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "12"} if codec == "libsvtav1" else {"crf": "10", "g": "5"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def frames_of(episode: int, n: int) -> list[np.ndarray]:
    return [np.full((H, W, 3), level(episode, t), np.uint8) for t in range(n)]


def rows_table(episode: int, rows: int, first_index: int, with_action: bool = True) -> pa.Table:
    cols = {
        "episode_index": pa.array([episode] * rows, pa.int64()),
        "frame_index": pa.array(range(rows), pa.int64()),
        "timestamp": pa.array([t / FPS for t in range(rows)], pa.float32()),
        "index": pa.array(range(first_index, first_index + rows), pa.int64()),
        "task_index": pa.array([0] * rows, pa.int64()),
    }
    if with_action:
        cols = {"action": pa.array(action_rows(episode, rows).tolist(), pa.list_(pa.float32())), **cols}
    return pa.table(cols)


def info_json(version: str, episodes: int, frames: int, **paths: str) -> dict:
    return {
        "codebase_version": version,
        "robot_type": "test_arm",
        "total_episodes": episodes,
        "total_frames": frames,
        "chunks_size": 1000,
        "fps": FPS,
        **paths,
        "features": {
            "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": ["x", "y", "z"]},
            "observation.state": {"dtype": "float32", "shape": [2]},
            CAMERA: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"]},
            "timestamp": {"dtype": "float32", "shape": [1]},
            "frame_index": {"dtype": "int64", "shape": [1]},
            "episode_index": {"dtype": "int64", "shape": [1]},
        },
    }


def write_v2(root: Path, specs: list[dict]) -> Path:
    """A v2.1 dataset; each spec: frames (video), rows (parquet), action (column present), codec."""
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "videos" / "chunk-000" / CAMERA).mkdir(parents=True)
    index, episodes = 0, []
    for e, spec in enumerate(specs):
        rows, frames = spec.get("rows", FRAMES), spec.get("frames", FRAMES)
        pq.write_table(
            rows_table(e, rows, index, spec.get("action", True)), root / f"data/chunk-000/episode_{e:06d}.parquet"
        )
        video = encode(frames_of(e, frames), spec.get("codec", "libx264"))
        (root / f"videos/chunk-000/{CAMERA}/episode_{e:06d}.mp4").write_bytes(video)
        episodes.append({"episode_index": e, "tasks": [f"task {e % 2}"], "length": rows})
        index += rows
    paths = {
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info_json("v2.1", len(specs), index, **paths)))
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (root / "meta" / "tasks.jsonl").write_text('{"task_index": 0, "task": "task 0"}\n')
    return root


def write_v3(root: Path, episodes: int) -> Path:
    """A v3.0 dataset: all episodes in one data file and one AV1 video, located by meta/episodes."""
    for d in ("meta/episodes/chunk-000", "data/chunk-000", f"videos/{CAMERA}/chunk-000"):
        (root / d).mkdir(parents=True)
    tables, frames, meta = [], [], []
    for e in range(episodes):
        tables.append(rows_table(e, FRAMES, e * FRAMES))
        frames += frames_of(e, FRAMES)
        meta.append(
            {
                "episode_index": e,
                "length": FRAMES,
                "tasks": ["stack the blocks"],
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": e * FRAMES,
                "dataset_to_index": (e + 1) * FRAMES,
                f"videos/{CAMERA}/chunk_index": 0,
                f"videos/{CAMERA}/file_index": 0,
                f"videos/{CAMERA}/from_timestamp": e * FRAMES / FPS,
                f"videos/{CAMERA}/to_timestamp": (e + 1) * FRAMES / FPS,
            }
        )
    pq.write_table(pa.concat_tables(tables), root / "data/chunk-000/file-000.parquet")
    (root / f"videos/{CAMERA}/chunk-000/file-000.mp4").write_bytes(encode(frames, "libsvtav1"))
    pq.write_table(pa.Table.from_pylist(meta), root / "meta/episodes/chunk-000/file-000.parquet")
    paths = {
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info_json("v3.0", episodes, episodes * FRAMES, **paths)))
    return root


def prep(src: Path, out: Path, *extra: str) -> int:
    args = ["prep", "lerobot", str(src), "--out", str(out), "--clip-frames", str(CLIP), "--size", "32", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        return main([*args, "--lossless", "--workers", "0"])


def samples(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(folder.glob("*.tar")) for s in read_samples(p)]


def check_clips(got: list[tuple[str, dict[str, bytes]]]) -> set[int]:
    """Every clip's actions are the parquet's rows [s, s + T - 1) and its frames are source frames [s, s + T)."""
    episodes = set()
    for key, members in got:
        meta = ClipMeta.from_bytes(members["json"])
        e, s = meta.extra["episode"], meta.extra["start_frame"]
        episodes.add(e)
        assert "." not in key and key == f"{meta.video_id}_{meta.clip_index:06d}" and s == meta.clip_index * CLIP
        assert (meta.fps, meta.frames, meta.width, meta.height) == (FPS, CLIP, 32, 32)
        assert meta.extra["action_dim"] == ACTION_DIM and meta.extra["camera"] == CAMERA
        actions = npy_load(members["actions.npy"])
        assert actions.dtype == np.float32 and actions.shape == (CLIP - 1, ACTION_DIM)
        np.testing.assert_array_equal(actions, action_rows(e, FRAMES)[s : s + CLIP - 1])
        frames = decode_clip(members["mp4"], list(range(CLIP)))
        assert frames.shape == (CLIP, 32, 32, 3)
        want = np.array([level(e, s + i) for i in range(CLIP)], dtype=float)
        np.testing.assert_allclose(frames.reshape(CLIP, -1).mean(axis=1), want, atol=2.5)
    return episodes


def test_v21_clips_actions_and_frames_line_up(tmp_path):
    src = write_v2(tmp_path / "ds", [{}, {}, {}])
    assert prep(src, tmp_path / "out", "--val-episodes", "1") == 0
    train, val = samples(tmp_path / "out" / "train"), samples(tmp_path / "out" / "val")
    # 20 frames -> 2 clips of 8 per episode (4 frames left over); 2 train episodes, 1 val
    assert len(train) == 4 and len(val) == 2
    assert check_clips(train).isdisjoint(check_clips(val))
    summary = json.loads((tmp_path / "out" / "train" / "summary.json").read_text())
    assert summary["clips"] == 4 and summary["num_skipped"] == 0 and summary["camera"] == CAMERA
    assert ClipMeta.from_bytes(train[0][1]["json"]).extra["tasks"] in (["task 0"], ["task 1"])


def test_v30_with_av1_video(tmp_path):
    src = write_v3(tmp_path / "ds", 3)
    assert prep(src, tmp_path / "out", "--val-episodes", "0", "--camera", "top") == 0
    got = samples(tmp_path / "out" / "train")
    assert len(got) == 6 and check_clips(got) == {0, 1, 2}
    assert not (tmp_path / "out" / "val").exists()


def test_bad_episodes_are_skipped_and_named(tmp_path, capsys):
    specs = [{}, {"action": False}, {"rows": FRAMES - 2}, {}, {"frames": FRAMES + 1, "rows": FRAMES + 1}]
    src = write_v2(tmp_path / "ds", specs)
    (src / f"videos/chunk-000/{CAMERA}/episode_000004.mp4").write_bytes(b"not a video")
    args = ["prep", "lerobot", str(src), "--out", str(tmp_path / "out"), "--clip-frames", str(CLIP)]
    assert main([*args, "--size", "32", "--val-episodes", "0", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "train" / "summary.json").read_text())
    reasons = {s["input"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"episode 1", "episode 2", "episode 4"} and summary["num_skipped"] == 3
    assert "no 'action' column" in reasons["episode 1"] and "episode_000001.parquet" in reasons["episode 1"]
    assert f"{FRAMES} frames" in reasons["episode 2"] and f"{FRAMES - 2} rows" in reasons["episode 2"]
    assert "unreadable video" in reasons["episode 4"] and "episode_000004.mp4" in reasons["episode 4"]
    for name in reasons:
        assert f"skipped {name}:" in out
    # the good episodes are all there
    assert summary["clips"] == 4 and summary["ok"] == 2
    assert {ClipMeta.from_bytes(m["json"]).extra["episode"] for _, m in samples(tmp_path / "out" / "train")} == {0, 3}


def test_missing_files_are_a_skipped_episode(tmp_path):
    src = write_v2(tmp_path / "ds", [{}, {}, {}])
    (src / f"videos/chunk-000/{CAMERA}/episode_000001.mp4").unlink()
    (src / "data/chunk-000/episode_000002.parquet").unlink()
    assert prep(src, tmp_path / "out", "--val-episodes", "0") == 0
    summary = json.loads((tmp_path / "out" / "train" / "summary.json").read_text())
    reasons = {s["input"]: s["reason"] for s in summary["skipped"]}
    assert reasons["episode 1"].startswith("missing videos/") and reasons["episode 2"].startswith("missing data/")
    assert summary["clips"] == 2


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    return rc, capsys.readouterr().err.strip()


def test_malformed_dataset_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(["prep", "lerobot", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "meta/info.json not found" in err and "root folder" in err

    src = write_v2(tmp_path / "ds", [{}, {}])
    info = json.loads((src / "meta/info.json").read_text())
    del info["features"][CAMERA]
    (src / "meta/info.json").write_text(json.dumps(info))
    rc, err = run_cli(["prep", "lerobot", str(src), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "no camera" in err and "info.json" in err

    src = write_v2(tmp_path / "ds2", [{}, {}])
    rc, err = run_cli(["prep", "lerobot", str(src), "--out", str(tmp_path / "o3"), "--camera", "wrist"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "wrist" in err and CAMERA in err

    (src / "meta/info.json").write_text("{not json")
    rc, err = run_cli(["prep", "lerobot", str(src), "--out", str(tmp_path / "o4")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "not valid JSON" in err

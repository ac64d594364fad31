"""Whole videos in video2dataset's shard layout: windowed, resized and cropped while loading.

The shards are written here, in the layout video2dataset writes (``{key}.mp4``, ``{key}.json``
with ``url``/``key``/``status``/``video_metadata`` (ffprobe's output), ``{key}.txt`` caption),
with videos of several sizes, aspects, lengths, frame rates and keyframe intervals.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from genie.cli import main
from genie.data.contract import WHOLE_VIDEO, write_sample
from genie.data.datamodule import VideoDataModule
from genie.data.loader import ClipStream, DataError, expand_shards, total_skipped
from genie.data.video import decode_resized, encode_clip, probe_video, resize_center_crop

# (height, width, frames, fps, gop): landscape 640x360 with one long GOP, portrait, square, and a
# video smaller than the 32 px the tests ask for (upscaled)
VIDEOS = [(360, 640, 36, 30, 250), (160, 96, 30, 24, 12), (100, 100, 20, 25, 8), (28, 44, 16, 15, 16)]
SIZE = 32


def source_video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth moving content; the blue level says which frame it is (6 levels apart)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = 127 + 100 * np.sin((xx + 4 * t) / (width / 6) + seed)
        out[t, ..., 1] = 127 + 100 * np.cos((yy - 3 * t) / (height / 5) + seed)
        out[t, ..., 2] = 30 + 6 * t
    return out


def v2d_json(key: str, height: int, width: int, frames: int, fps: int, **over) -> bytes:
    """The json video2dataset writes beside each video (with its ffprobe subsampler on)."""
    meta = {
        "url": f"https://videos.example.com/clip/{key}.mp4",
        "key": key,
        "status": "success",
        "error_message": None,
        "caption": f"video {key}",
        "duration": frames / fps,
        "video_metadata": {
            "streams": [
                {
                    "index": 0,
                    "codec_name": "h264",
                    "codec_type": "video",
                    "width": width,
                    "height": height,
                    "r_frame_rate": f"{fps}/1",
                    "avg_frame_rate": f"{fps}/1",
                    "nb_frames": str(frames),
                }
            ],
            "format": {"format_name": "mov,mp4,m4a,3gp,3g2,mj2", "duration": f"{frames / fps:.6f}"},
        },
    }
    meta.update(over)
    return json.dumps(meta).encode()


def write_v2d_shards(out: Path, per_shard: int = 2) -> dict[str, np.ndarray]:
    """Shards ``00000.tar ...`` of the VIDEOS; returns {key: source frames}."""
    out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for s in range(0, len(VIDEOS), per_shard):
        with tarfile.open(out / f"{s // per_shard:05d}.tar", "w") as tar:
            for i, (h, w, n, fps, gop) in enumerate(VIDEOS[s : s + per_shard], start=s):
                key = f"{i:09d}"
                frames = source_video(n, h, w, i)
                members = {
                    "mp4": encode_clip(frames, fps, gop=gop),
                    "json": v2d_json(key, h, w, n, fps),
                    "txt": f"video {key}".encode(),
                }
                write_sample(tar, key, members)
                sources[key] = frames
    return sources


@pytest.fixture(scope="module")
def v2d(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("v2d") / "shards"
    return out, write_v2d_shards(out)


def _keys(stream) -> list[str]:
    return [k for b in stream for k in b["keys"]]


def assert_window_matches(frames: np.ndarray, source: np.ndarray, idx: np.ndarray) -> None:
    """``frames`` are ``source[idx]`` resized and cropped: close to them, and farther from the neighbours."""
    ref = np.stack([resize_center_crop(f, SIZE) for f in source]).astype(np.float32)
    got = frames.astype(np.float32)
    for j, i in enumerate(idx):
        err = np.abs(got[j] - ref[i]).mean()
        # two generations of crf-18 H.264 at 28x44 -> 32 px: ~4 levels; the neighbour check below is the sharp one
        assert err < 4.5, f"frame {i}: mean abs error {err:.2f}"
        for k in (i - 1, i + 1):
            if 0 <= k < len(ref):
                assert np.abs(got[j] - ref[k]).mean() > err + 1.0, f"frame {i} looks like frame {k}"


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_whole_videos_come_out_as_resized_windows(v2d, backend):
    folder, sources = v2d
    ds = ClipStream(
        str(folder), num_frames=4, frame_stride=3, batch_size=2, train=False, resolution=SIZE, backend=backend
    )
    batches = list(ds)
    assert sorted(_keys(batches)) == sorted(sources)
    assert all(b["skipped"] == 0 for b in batches)
    starts = []
    for b in batches:
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape[1:] == (4, SIZE, SIZE, 3)
        assert "actions" not in b
        for key, start, frames in zip(b["keys"], b["starts"], b["frames"], strict=True):
            idx = int(start) + 3 * np.arange(4)
            assert idx[-1] < len(sources[key])
            assert_window_matches(frames.numpy(), sources[key], idx)
            starts.append(int(start))
    assert any(starts)  # windows are spread over the whole video, not always its start
    # training: random windows over the whole video, endless
    it = iter(ClipStream(str(folder), num_frames=4, frame_stride=3, batch_size=3, resolution=SIZE, backend=backend))
    for _ in range(3):
        b = next(it)
        assert b["frames"].shape == (3, 4, SIZE, SIZE, 3)
        for key, start, frames in zip(b["keys"], b["starts"], b["frames"], strict=True):
            assert_window_matches(frames.numpy(), sources[key], int(start) + 3 * np.arange(4))


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_decode_resized_deep_in_a_long_gop(backend):
    frames = source_video(40, 360, 640, 0)
    data = encode_clip(frames, 30.0, gop=250)
    info = probe_video(data)
    assert (info.frames, info.width, info.height, info.fps) == (40, 640, 360, 30.0)
    # 27: decord cannot output the 48x27 it scales to (see genie.data.video), the frames are still right
    for size, idx in ((SIZE, [37, 30, 33]), (27, [0, 1, 39]), (53, [20, 21, 22])):
        got = decode_resized(data, idx, size, backend, info)
        assert got.shape == (3, size, size, 3) and got.dtype == np.uint8
        ref = np.stack([resize_center_crop(f, size) for f in frames[idx]])
        assert np.abs(got.astype(float) - ref).mean() < 4.0
    with pytest.raises(Exception, match="40 frames"):
        decode_resized(data, [38, 40], SIZE, backend, info)


def test_probe_counts_frames_of_containers_without_an_index():
    frames = source_video(12, 48, 64, 1)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        st = c.add_stream("libx264", rate=12)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            c.mux(st.encode(vf))
        c.mux(st.encode())
    info = probe_video(buf.getvalue())
    assert (info.frames, info.width, info.height) == (12, 64, 48)
    got = decode_resized(buf.getvalue(), [3, 9], 16, "pyav", info)
    ref = np.stack([resize_center_crop(f, 16) for f in frames[[3, 9]]])
    assert np.abs(got.astype(float) - ref).mean() < 4.0


def _bad_shard(path: Path) -> list[str]:
    """Good whole videos between broken ones; returns the good keys."""
    good = source_video(20, 72, 128, 5)
    mp4 = encode_clip(good, 25.0, gop=8)
    with tarfile.open(path, "w") as tar:
        write_sample(tar, "000000100", {"mp4": mp4, "json": v2d_json("000000100", 72, 128, 20, 25)})
        write_sample(tar, "000000101", {"mp4": mp4[: len(mp4) // 3], "json": v2d_json("000000101", 72, 128, 20, 25)})
        write_sample(tar, "000000102", {"mp4": b"\x00" * 3000, "json": v2d_json("000000102", 72, 128, 20, 25)})
        failed = v2d_json("000000103", 72, 128, 20, 25, status="failed_to_download", error_message="HTTP 404")
        write_sample(tar, "000000103", {"mp4": mp4, "json": failed})
        short = encode_clip(good[:5], 25.0)
        write_sample(tar, "000000104", {"mp4": short, "json": v2d_json("000000104", 72, 128, 5, 25)})
        write_sample(tar, "000000105", {"mp4": mp4, "json": b"{not json"})
        write_sample(tar, "000000106", {"mp4": mp4})  # no json
        write_sample(tar, "000000107", {"txt": b"caption only"})
        write_sample(tar, "000000108", {"mp4": mp4, "json": v2d_json("000000108", 72, 128, 20, 25)})
    return ["000000100", "000000108"]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_corrupt_whole_videos_are_skipped_and_counted(tmp_path, backend):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = _bad_shard(folder / "00000.tar")
    ds = ClipStream(
        str(folder), num_frames=4, frame_stride=2, batch_size=4, train=False, resolution=SIZE, backend=backend
    )
    batches = list(ds)
    assert _keys(batches) == good
    seen: dict[int, int] = {}
    for b in batches:
        total = total_skipped(seen, b)
    assert total == 7
    reasons = " ".join(ds.stats.reasons)
    assert "status" in reasons and "window needs 7" in reasons and "bad json" in reasons
    # training keeps going past them
    it = iter(ClipStream(str(folder), num_frames=4, frame_stride=2, batch_size=2, resolution=SIZE, shuffle_buffer=4))
    assert all(sorted(next(it)["keys"]) == good for _ in range(3))


def test_whole_videos_need_a_resolution(v2d):
    folder, _ = v2d
    ds = ClipStream(str(folder), num_frames=4, batch_size=2, train=False)
    assert list(ds) == []
    assert ds.stats.skipped == len(VIDEOS) and "needs a resolution" in " ".join(ds.stats.reasons)
    with pytest.raises(DataError, match="no readable clips"):
        next(iter(ClipStream(str(folder), num_frames=4, batch_size=2)))


def test_our_clips_and_whole_videos_in_one_stream(v2d, shard_factory, clip_pixels):
    folder, sources = v2d
    ours, our_keys = shard_factory("ours", clips=3, size=SIZE)
    ds = ClipStream([str(folder), str(ours)], num_frames=4, batch_size=7, train=False, resolution=SIZE)
    (batch,) = list(ds)
    assert sorted(batch["keys"]) == sorted([*sources, *our_keys])
    assert batch["frames"].shape == (7, 4, SIZE, SIZE, 3)
    for key, start, frames in zip(batch["keys"], batch["starts"], batch["frames"], strict=True):
        idx = int(start) + np.arange(4)
        if key in our_keys:  # the fast path: exact, untouched
            assert np.array_equal(frames.numpy(), clip_pixels(our_keys.index(key), 12, SIZE)[idx])
        else:
            assert_window_matches(frames.numpy(), sources[key], idx)


def test_resize_our_clips_of_another_size(shard_factory, clip_pixels):
    folder, keys = shard_factory("big", clips=2, size=16)
    assert list(ClipStream(str(folder), num_frames=3, batch_size=2, train=False, resolution=8)) == []
    (b,) = list(ClipStream(str(folder), num_frames=3, batch_size=2, train=False, resolution=8, resize=True))
    assert b["frames"].shape == (2, 3, 8, 8, 3) and b["actions"].shape == (2, 2)
    for c, (start, frames) in enumerate(zip(b["starts"], b["frames"], strict=True)):
        ref = np.stack([resize_center_crop(f, 8) for f in clip_pixels(c, 12, 16)[int(start) + np.arange(3)]])
        assert np.abs(frames.numpy().astype(int) - ref).max() <= 2
    with pytest.raises(DataError, match="resolution"):
        ClipStream(str(folder), resize=True)


def test_datamodule_reads_video2dataset_shards(v2d, shard_factory):
    folder, sources = v2d
    dm = VideoDataModule(
        str(folder), val_shards=str(folder), num_frames=4, frame_stride=2, batch_size=2, num_workers=1,
        resolution=SIZE, pin_memory=False,
    )  # fmt: skip
    meta = dm.check(resolution=SIZE)
    assert meta.extra[WHOLE_VIDEO] and (meta.width, meta.height, meta.frames) == (640, 360, 36)
    b = next(iter(dm.train_dataloader()))
    assert b["frames"].shape == (2, 4, SIZE, SIZE, 3) and b["frames"].dtype == torch.uint8
    assert sorted(_keys(dm.val_dataloader())) == sorted(sources)
    with pytest.raises(DataError, match="expects 64x64"):
        dm.check(resolution=64)
    with pytest.raises(DataError, match="set data.resolution"):
        VideoDataModule(str(folder), num_frames=4, num_workers=0).check()
    # our clips of another size: refused before training unless resized
    ours, _ = shard_factory("ours16", clips=2, size=16)
    with pytest.raises(DataError, match="re-run"):
        VideoDataModule(str(ours), num_frames=4, num_workers=0, resolution=SIZE).check(SIZE)
    dm = VideoDataModule(str(ours), num_frames=4, num_workers=0, resolution=SIZE, resize=True, pin_memory=False)
    assert dm.check(SIZE).width == 16
    assert next(iter(dm.train_dataloader()))["frames"].shape[1:] == (4, SIZE, SIZE, 3)


def test_shuffle_buffer_is_capped_in_bytes():
    ds = ClipStream.__new__(ClipStream)
    ds.shuffle_buffer, ds.shuffle_bytes = 1000, 350
    consumed = []

    def samples():
        for i in range(40):
            consumed.append(i)
            yield {"__key__": str(i), "mp4": b"x" * (100 if i != 10 else 1000)}

    held = []
    out = []
    for s in ds._shuffled(samples(), random.Random(0)):
        out.append(int(s["__key__"]))
        held.append(len(consumed) - len(out))
    assert sorted(out) == list(range(40)) and out != list(range(40))
    assert max(held) <= 3  # 350 bytes hold three 100-byte samples; the 1000-byte one pushes others out


def test_hidden_folders_are_not_read(v2d, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(v2d[0], folder)
    (folder / ".parts-p0001").mkdir()
    (folder / ".parts-p0001" / "half-done.tar").write_bytes(b"")
    assert expand_shards(str(folder)) == sorted(str(p) for p in folder.glob("*.tar"))


def test_inspect_does_not_call_video2dataset_shards_broken(v2d, tmp_path, capsys):
    folder, sources = v2d
    sheet = tmp_path / "sheet.png"
    assert main(["prep", "inspect", str(folder), "--json", "--sheet", str(sheet), "--decode-all"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == 0 and not report["shard_errors"] and not report["undecodable"]
    assert report["clips"] == report["whole_videos"] == len(VIDEOS)
    assert report["resolutions"] == {f"{w}x{h}": 1 for h, w, *_ in VIDEOS}
    assert report["frames_per_clip"]["max"] == 36 and report["sources"] == {"videos.example.com": len(VIDEOS)}
    assert report["sheet"] == str(sheet) and sheet.exists()
    # broken ones are still called broken
    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_shard(bad / "00000.tar")
    assert main(["prep", "inspect", str(bad), "--json", "--no-sheet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["whole_videos"] == report["clips"] == 3  # the two good ones and the too-short one
    assert report["bad"] == 6
    assert main(["prep", "inspect", str(folder), "--no-sheet"]) == 0
    assert "whole videos" in capsys.readouterr().out


def test_long_videos_give_windows_in_proportion_to_their_length(tmp_path):
    """A pass over whole videos takes one window per `video_window_every` frames (stratified over the video), so a
    long video is not seen as rarely as a short one; the windows are still the right frames."""
    folder = tmp_path / "long"
    folder.mkdir()
    lengths = {"000000000": 120, "000000001": 24}  # 5x longer
    sources = {}
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, (key, n) in enumerate(lengths.items()):
            sources[key] = source_video(n, 36, 36, i)
            mp4 = encode_clip(sources[key], 25, gop=8, lossless=True)
            write_sample(tar, key, {"mp4": mp4, "json": v2d_json(key, 36, 36, n, 25)})

    def one_pass(**kw) -> list[tuple[str, int]]:
        ds = ClipStream(str(folder), num_frames=4, batch_size=1, resolution=SIZE, shuffle_buffer=64, seed=2, **kw)
        it = iter(ds)
        out = []
        while True:
            b = next(it)
            if b["position"][0] > 0:  # the second pass (block) began
                return out
            out.append((b["keys"][0], int(b["starts"][0])))
            if len(out) == 1:
                idx = int(b["starts"][0]) + np.arange(4)
                assert_window_matches(b["frames"][0].numpy(), sources[b["keys"][0]], idx)

    windows = one_pass(video_window_every=24)
    counts = {k: sum(1 for key, _ in windows if key == k) for k in lengths}
    assert counts == {"000000000": 4, "000000001": 1}  # (120 - 3) // 24 and at least one
    long_starts = sorted(s for k, s in windows if k == "000000000")
    assert [s * 4 // 117 for s in long_starts] == [0, 1, 2, 3]  # one window in each quarter of the valid starts
    assert len(one_pass(video_window_every=24, max_video_windows=2)) == 3  # capped: 2 + 1
    assert len(one_pass(video_window_every=None)) == 2  # the old behaviour: one window per video

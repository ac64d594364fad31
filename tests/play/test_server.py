"""``genie play``'s HTTP API: episodes per session, uploads, downloads and the errors a page can hit."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from genie.cli import build_parser, main
from genie.play.server import build_app
from tests.play.conftest import Served


def frame_of(reply: dict) -> np.ndarray:
    assert reply["frame"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["frame"].split(",", 1)[1]))))


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_page_and_info(served: Served):
    status, page = served.request("/")
    assert status == 200 and b"genie play" in page and b"/api/step" in page
    status, info = served.request("/api/info")
    assert status == 200 and info["num_actions"] == 5 and info["image_size"] == 16
    assert [p["name"] for p in info["prompts"]] == ["left.png", "top.png"]  # WORLD/prompts, sorted
    assert set(info["arrows"]) <= {"ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight"} and len(info["arrows"]) == 4
    assert len(set(info["arrows"].values())) == 4  # four different actions
    status, thumb = served.request("/api/prompt/1.png")
    assert status == 200 and np.asarray(Image.open(io.BytesIO(thumb)))[:8].min() == 255  # the top-half prompt
    assert served.request("/api/prompt/9.png")[0] == 404
    assert served.request("/nowhere")[0] == 404


def test_reset_step_and_download(served: Served):
    sid = "test-session-1"
    status, first = served.request("/api/reset", {"session": sid, "prompt": 0})
    assert status == 200 and first["step"] == 0 and frame_of(first).shape == (16, 16, 3)
    frames = [frame_of(first)]
    for a in (0, 3, 3, 1):
        status, reply = served.request("/api/step", {"session": sid, "action": a})
        assert status == 200 and reply["latency_ms"] > 0
        frames.append(frame_of(reply))
    assert reply["step"] == 4 and reply["actions"] == [0, 3, 3, 1]
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])  # stepping changes the frame
    status, gif = served.request(f"/api/episode?session={sid}&format=gif")
    with Image.open(io.BytesIO(gif)) as im:
        assert status == 200 and im.n_frames == 5 and im.size == (256, 256)  # upscaled 16x
    status, mp4 = served.request(f"/api/episode?session={sid}&format=mp4")
    assert status == 200 and mp4[4:8] == b"ftyp"
    # a reset starts a new episode in the same session
    served.request("/api/reset", {"session": sid, "prompt": 1})
    status, gif = served.request(f"/api/episode?session={sid}&format=gif")
    with Image.open(io.BytesIO(gif)) as im:
        assert im.n_frames == 1


def test_sessions_do_not_corrupt_each_other(served: Served):
    actions = [4, 0, 2, 2, 1, 3]

    def alone(sid: str) -> list[np.ndarray]:
        out = [frame_of(served.request("/api/reset", {"session": sid, "prompt": 0})[1])]
        return out + [frame_of(served.request("/api/step", {"session": sid, "action": a})[1]) for a in actions]

    reference = alone("alone-000")
    # two tabs interleaved: one runs the same episode, the other something else on another prompt
    a = [frame_of(served.request("/api/reset", {"session": "tab-a-000", "prompt": 0})[1])]
    served.request("/api/reset", {"session": "tab-b-000", "prompt": 1})
    for i, act in enumerate(actions):
        served.request("/api/step", {"session": "tab-b-000", "action": (act + i) % 5})
        a.append(frame_of(served.request("/api/step", {"session": "tab-a-000", "action": act})[1]))
    assert all(np.array_equal(x, y) for x, y in zip(reference, a, strict=True))
    assert served.request("/api/step", {"session": "tab-b-000", "action": 0})[1]["step"] == 7


def test_uploads_are_checked(served: Served):
    big = np.zeros((40, 60, 3), np.uint8)
    big[:, 30:] = 255
    status, reply = served.request("/api/upload?session=upload-01", raw=png(big, "JPEG"))
    assert status == 200 and reply["prompt"] == "upload" and frame_of(reply).shape == (16, 16, 3)
    assert served.request("/api/step", {"session": "upload-01", "action": 2})[0] == 200
    status, err = served.request("/api/upload?session=upload-01", raw=b"%PDF-1.4 not an image")
    assert status == 415 and "not an image" in err["error"]
    status, err = served.request("/api/upload?session=upload-01", raw=b"")
    assert status == 400 and "empty" in err["error"]
    limit = served.app.max_upload_bytes
    status, err = served.request("/api/upload?session=upload-01", raw=b"x" * (limit + 1))
    assert status == 413 and "limit" in err["error"]
    # small file, huge picture (a decompression bomb): refused by its pixel count
    bomb = Image.new("1", (9000, 9000))
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    status, err = served.request("/api/upload?session=upload-01", raw=buf.getvalue())
    assert status == 413 and "megapixels" in err["error"], err


def test_request_errors_are_messages(served: Served):
    cases = [
        ({"session": "err-session", "action": 0}, 409, "press reset"),  # never reset
        ({"session": "x", "action": 0}, 400, "session id"),
        ({"action": 0}, 400, "session id"),
    ]
    for body, code, text in cases:
        status, err = served.request("/api/step", body)
        assert status == code and text in err["error"], (body, err)
    served.request("/api/reset", {"session": "err-session", "prompt": 0})
    for action in (5, -1, "2", 1.5, True, None):
        status, err = served.request("/api/step", {"session": "err-session", "action": action})
        assert status == 400 and "0..4" in err["error"], (action, err)
    assert served.request("/api/reset", {"session": "err-session", "prompt": 7})[0] == 400
    status, err = served.request("/api/step", raw=b"{not json")
    assert status == 400 and "JSON" in err["error"]
    status, err = served.request("/api/episode?session=err-session&format=avi")
    assert status == 400 and "gif or mp4" in err["error"]


def test_old_sessions_are_dropped_beyond_the_limit(served: Served):
    app = served.app
    keep, app.max_sessions = app.max_sessions, 2
    try:
        for i in range(3):
            served.request("/api/reset", {"session": f"lru-{i:05d}", "prompt": 0})
        assert served.request("/api/step", {"session": "lru-00000", "action": 0})[0] == 409
        assert served.request("/api/step", {"session": "lru-00002", "action": 0})[0] == 200
    finally:
        app.max_sessions = keep


def test_cli_defaults_bind_localhost_and_take_prompts_from_data(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "sprites"
    sprites = ["prep", "sprites", "--out", str(out), "--size", "16", "--distractors", "0"]
    assert main([*sprites, "--episodes", "2", "--val-episodes", "3", "--clip-frames", "4", "--workers", "0"]) == 0
    prompt = tmp_path / "p.png"
    Image.fromarray(np.full((30, 20, 3), 90, np.uint8)).save(prompt)
    argv = ["play", "--world", str(tiny_world), "--data", str(out / "val"), "--prompt", str(prompt)]
    argv += ["--arrows", "0,1,2,3"]
    args = build_parser(argv).parse_args(argv)
    assert args.host == "127.0.0.1"
    app = build_app(args)
    names = [p.name for p in app.prompts]
    assert names[0] == "p.png" and sum(n.startswith("clip ") for n in names) == 3, names
    assert app.arrows == {"ArrowUp": 0, "ArrowDown": 1, "ArrowLeft": 2, "ArrowRight": 3}


def test_cli_errors_are_one_line(tiny_world: Path, tmp_path: Path, capsys):
    cases = [(["--arrows", "0,1"], "up,down,left,right"), (["--prompt", str(tmp_path / "no.png")], "no.png")]
    for extra, text in cases:
        assert main(["play", "--world", str(tiny_world), *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and text in err[0], err
    assert main(["play", "--world", str(tmp_path / "nowhere")]) == 2
    assert "genie export world" in capsys.readouterr().err

"""``genie play --world DIR``: step a world from the browser, keys picking the latent actions.

A small HTTP server from the standard library (nothing to install) serves one page (``page.html``) and a
JSON API. Every browser tab makes its own session id, and every session is its own episode: a
:meth:`World.fork` sharing the loaded models, with its own frames, KV caches and sampling generator, so
tabs never see each other's steps. Model calls are serialised by one lock (a CPU or one GPU gains nothing
from running two at once, and it keeps forks safe).

API (all JSON unless said otherwise)::

    GET  /                                   the page
    GET  /api/info                           actions, image size, arrow mapping, prompts
    GET  /api/prompt/<i>.png                 a prompt's (last) frame
    POST /api/reset   {session, prompt}      start an episode from prompt i -> frame
    POST /api/upload?session=S   <image>     start an episode from an uploaded image -> frame
    POST /api/step    {session, action}      one latent action -> frame, latency
    GET  /api/episode?session=S&format=gif   the episode so far as a gif or mp4 download

Prompts come from ``--prompt FILE`` (an image or a video whose last frames are context), the first
frames of held-out clips in ``--data SHARDS``, and any ``WORLD/prompts/*.png``; with none, a grey frame
(then upload one in the page). Binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from genie.models.kinds import check_sampler
from genie.play.keys import arrow_actions, parse_arrows
from genie.world import World

PAGE = Path(__file__).with_name("page.html")
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
DRAIN_LIMIT = 64 << 20  # an oversized upload up to this size is read and dropped before the 413 reply
MAX_EPISODE_FRAMES = 5000  # per session; a longer episode keeps stepping but only its last frames download


class PlayError(ValueError):
    """A request the page (or a person with curl) must fix; becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class Prompt:
    """Where an episode can start: context frames uint8 (T, H, W, 3) and a name for the picker."""

    name: str
    frames_THWC: np.ndarray


@dataclass
class Session:
    """One tab's episode."""

    world: World
    frames: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 each, reset frame first
    actions: list[int] = field(default_factory=list)
    prompt: str = ""


def png_bytes(frame_HWC: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame_HWC).save(buf, format="PNG")
    return buf.getvalue()


def data_url(frame_HWC: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(frame_HWC)).decode()


def decode_upload(data: bytes, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
    """Uploaded image bytes -> uint8 (size, size, 3), resized and centre-cropped; PlayError if not an image."""
    from PIL import Image, UnidentifiedImageError

    from genie.data.video import resize_center_crop

    if not data:
        raise PlayError("the upload is empty: pick an image file (png, jpg, webp, ...)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise PlayError(
                    f"the image is {im.width}x{im.height}, over {max_pixels // 1_000_000} megapixels: upload a "
                    "smaller one",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            frame = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        if isinstance(e, PlayError):
            raise
        raise PlayError(
            "the upload is not an image this page can read (png, jpg, webp, bmp, gif): pick an image file",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        ) from None
    return resize_center_crop(frame, size)


class PlayApp:
    """The server's state: one loaded world, the prompts, and the sessions (one per browser tab).

    Args:
        world: the loaded world; sessions are forks of it.
        prompts: where episodes can start (at least one).
        arrows: arrow key -> latent action; None works it out from the first prompt (:mod:`genie.play.keys`).
        seed: sampling seed of every new episode (the same actions from the same prompt replay the same).
        max_sessions: sessions kept; the least recently used one is dropped beyond it.
        max_upload_bytes: larger uploads are refused with HTTP 413.
    """

    def __init__(
        self,
        world: World,
        prompts: list[Prompt],
        arrows: dict[str, int] | None = None,
        seed: int = 0,
        max_sessions: int = 32,
        max_upload_bytes: int = 8 << 20,
        name: str = "world",
    ):
        if not prompts:
            raise ValueError("PlayApp needs at least one prompt")
        self.world, self.prompts, self.seed, self.name = world, prompts, seed, name
        self.max_sessions, self.max_upload_bytes = max_sessions, max_upload_bytes
        self.model_lock = threading.Lock()  # one model call at a time (forks share the models)
        self.sessions_lock = threading.Lock()
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.arrows = arrows if arrows is not None else self.find_arrows()

    # -- set-up -----------------------------------------------------------------------------------------

    def find_arrows(self, steps: int = 2) -> dict[str, int]:
        """Roll every action ``steps`` times from the first prompt (one batched rollout) and map the arrows."""
        import torch

        world = self.world.fork(self.seed)
        A = world.num_actions
        prompt_ATHWC = np.repeat(self.prompts[0].frames_THWC[None], A, axis=0)  # the prompt once per action
        actions_A = torch.arange(A, device=world.device)
        with self.model_lock:
            frames = [world.begin(world.as_frames(prompt_ATHWC, "prompt"))]  # (A, H, W, 3) each
            frames += [world.advance(actions_A) for _ in range(steps)]
        return arrow_actions(np.stack(frames, axis=1))  # (A, steps + 1, H, W, 3)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_actions": self.world.num_actions,
            "image_size": self.world.image_size,
            "arrows": self.arrows,
            "prompts": [{"index": i, "name": p.name, "frames": len(p.frames_THWC)} for i, p in enumerate(self.prompts)],
            "max_upload_bytes": self.max_upload_bytes,
        }

    # -- sessions ---------------------------------------------------------------------------------------

    def session(self, session_id: Any, create: bool = False) -> Session:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise PlayError("missing or malformed session id (8-64 letters, digits, - or _): reload the page")
        with self.sessions_lock:
            s = self.sessions.get(session_id)
            if s is None:
                if not create:
                    raise PlayError("unknown session (the server restarted or dropped it): press reset", 409)
                s = self.sessions[session_id] = Session(self.world.fork(self.seed))
                while len(self.sessions) > self.max_sessions:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(session_id)
            return s

    def start(self, session_id: Any, frames_THWC: np.ndarray, name: str) -> dict[str, Any]:
        """Begin a session's episode from context frames; returns the first frame."""
        s = self.session(session_id, create=True)
        t0 = time.perf_counter()
        with self.model_lock:
            s.world.seed(self.seed)
            frame = s.world.reset(frames_THWC)
        s.frames, s.actions, s.prompt = [frame], [], name
        return self.frame_reply(s, time.perf_counter() - t0)

    def reset(self, session_id: Any, prompt: Any) -> dict[str, Any]:
        if not isinstance(prompt, int) or not 0 <= prompt < len(self.prompts):
            raise PlayError(f"prompt must be an index in 0..{len(self.prompts) - 1}, got {prompt!r}")
        p = self.prompts[prompt]
        return self.start(session_id, p.frames_THWC, p.name)

    def upload(self, session_id: Any, data: bytes) -> dict[str, Any]:
        frame = decode_upload(data, self.world.image_size)
        return self.start(session_id, frame[None], "upload")

    def step(self, session_id: Any, action: Any) -> dict[str, Any]:
        s = self.session(session_id)
        A = self.world.num_actions
        if not isinstance(action, int) or isinstance(action, bool) or not 0 <= action < A:
            raise PlayError(f"action must be an integer in 0..{A - 1}, got {action!r}")
        t0 = time.perf_counter()
        with self.model_lock:
            frame = s.world.step(action)
        s.frames.append(frame)
        s.actions.append(action)
        del s.frames[:-MAX_EPISODE_FRAMES]
        return self.frame_reply(s, time.perf_counter() - t0)

    def frame_reply(self, s: Session, seconds: float) -> dict[str, Any]:
        return {
            "frame": data_url(s.frames[-1]),
            "step": len(s.actions),
            "latency_ms": round(seconds * 1000, 1),
            "prompt": s.prompt,
            "actions": s.actions[-64:],
        }

    def episode(self, session_id: Any, fmt: str) -> bytes:
        """The session's frames so far as gif or mp4 bytes, upscaled to at least 256 px."""
        from genie.rollout import write_video

        if fmt not in ("gif", "mp4"):
            raise PlayError(f"format must be gif or mp4, got {fmt!r}")
        s = self.session(session_id)
        frames = np.stack(s.frames)
        scale = max(1, 256 // self.world.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            return write_video(frames, Path(tmp) / f"episode.{fmt}", fps=8, scale=scale).read_bytes()


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`PlayApp` on ``self.server.app``; PlayError -> 4xx JSON."""

    server_version = "genie-play"

    @property
    def app(self) -> PlayApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json")

    def handle_errors(self, fn: Any) -> None:
        try:
            fn()
        except PlayError as e:
            self.send_json({"error": str(e)}, int(e.status))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def read_body(self, limit: int) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            if length <= DRAIN_LIMIT:  # read it away so the client sees our answer, not a broken pipe
                left = length
                while left > 0:
                    left -= len(self.rfile.read(min(1 << 20, left))) or left
            else:
                self.close_connection = True
            raise PlayError(
                f"the upload is {length / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit: pick a smaller image",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return self.rfile.read(length)

    def read_json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.read_body(1 << 16) or b"{}")
        except json.JSONDecodeError:
            raise PlayError("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise PlayError("the request body must be a JSON object")
        return body

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}

        def route() -> None:
            if url.path in ("/", "/index.html"):
                self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self.send_json(self.app.info())
            elif m := re.fullmatch(r"/api/prompt/(\d+)\.png", url.path):
                i = int(m.group(1))
                if i >= len(self.app.prompts):
                    raise PlayError(f"no prompt {i}", HTTPStatus.NOT_FOUND)
                self.send(200, png_bytes(self.app.prompts[i].frames_THWC[-1]), "image/png")
            elif url.path == "/api/episode":
                fmt = query.get("format", "gif")
                body = self.app.episode(query.get("session"), fmt)
                mime = "image/gif" if fmt == "gif" else "video/mp4"
                name = f"{self.app.name}-episode.{fmt}"
                self.send(200, body, mime, {"Content-Disposition": f'attachment; filename="{name}"'})
            else:
                raise PlayError(f"no such page: {url.path}", HTTPStatus.NOT_FOUND)

        self.handle_errors(route)

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}

        def route() -> None:
            if url.path == "/api/reset":
                body = self.read_json()
                self.send_json(self.app.reset(body.get("session"), body.get("prompt", 0)))
            elif url.path == "/api/step":
                body = self.read_json()
                self.send_json(self.app.step(body.get("session"), body.get("action")))
            elif url.path == "/api/upload":
                data = self.read_body(self.app.max_upload_bytes)
                self.send_json(self.app.upload(query.get("session"), data))
            else:
                raise PlayError(f"no such endpoint: {url.path}", HTTPStatus.NOT_FOUND)

        self.handle_errors(route)


def make_server(app: PlayApp, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for ``app`` (port 0 picks a free port: see ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


# -- prompts ------------------------------------------------------------------------------------------------


def load_prompts(world: World, world_dir: Path, prompt: Path | None, data: str | None, count: int) -> list[Prompt]:
    """Gather the prompts (see the module docstring); a grey frame when there are none."""
    from genie.rollout import load_prompt

    S, T = world.image_size, world.dynamics.config.num_frames
    prompts = []
    if prompt is not None:
        prompts.append(Prompt(prompt.name, load_prompt(prompt, S, T)))
    for png in sorted((world_dir / "prompts").glob("*.png")):
        prompts.append(Prompt(png.name, load_prompt(png, S, T)))
    if data:
        from genie.data.loader import ClipStream

        stream = ClipStream(data, num_frames=1, batch_size=1, train=False, max_clips=count)
        for batch in stream:
            prompts.append(Prompt(f"clip {batch['keys'][0]}", batch["frames"][0].numpy()))
            if len(prompts) >= count + (prompt is not None):
                break
        if not prompts:
            raise ValueError(f"--data {data} has no readable clips of this world's size ({S}x{S})")
    if not prompts:
        prompts.append(Prompt("grey", np.full((1, S, S, 3), 128, np.uint8)))
    return prompts


# -- CLI ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, required=True, help="world bundle folder (genie export world)")
    parser.add_argument("--prompt", type=Path, default=None, help="an image, or a video whose last frames are context")
    parser.add_argument("--data", default=None, help="held-out shards whose clips' first frames are offered as prompts")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts taken from --data (default 8)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--arrows", default="auto", help="up,down,left,right actions, e.g. 2,0,3,1 (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of every episode (default 0)")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest image upload accepted (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the world's step (faster frames after a compile)"
    )


def build_app(args: argparse.Namespace) -> PlayApp:
    from genie.eval.common import pick_device

    world = World.from_pretrained(args.world, device=pick_device(args.device), seed=args.seed)
    if args.compile:
        compiled = dataclasses.replace(world.sampler_config, compile=True)
        check_sampler(world.dynamics, compiled)  # a kind without a compiled step: one line, before the server starts
        world.sampler_config = compiled
        print("compiling the world's step on the first frame (seconds to a minute; cached for later runs)", flush=True)
    prompts = load_prompts(world, args.world, args.prompt, args.data, args.num_prompts)
    if prompts[0].name == "grey":
        print("no --prompt, --data or WORLD/prompts: episodes start from a grey frame (upload an image in the page)")
    arrows = None if args.arrows == "auto" else parse_arrows(args.arrows, world.num_actions)
    if arrows is None:
        print(f"mapping the arrow keys: {world.num_actions} actions x 2 steps from '{prompts[0].name}' ...", flush=True)
    return PlayApp(
        world, prompts, arrows, seed=args.seed, max_upload_bytes=int(args.max_upload_mb * 2**20), name=args.world.name
    )


def run(args: argparse.Namespace) -> None:
    app = build_app(args)
    server = make_server(app, args.host, args.port, args.verbose)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}, reachable from other machines; the page has no authentication")
    arrows = ", ".join(f"{k.removeprefix('Arrow').lower()}={v}" for k, v in app.arrows.items())
    print(f"{app.world.num_actions} latent actions (keys 1-{min(app.world.num_actions, 9)}; arrows {arrows})")
    print(f"playing {args.world} at http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()

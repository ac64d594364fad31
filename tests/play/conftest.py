"""A running ``genie play`` server on the tiny untrained world, shared by the play tests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genie.cli import build_parser
from genie.play.server import PlayApp, build_app, make_server


@dataclass
class Served:
    app: PlayApp
    url: str

    def request(self, path: str, body: Any = None, raw: bytes | None = None, method: str | None = None) -> tuple:
        """(status, parsed JSON or bytes) of one request; errors are returned, not raised."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if data is None else "POST"))
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                status, payload, kind = res.status, res.read(), res.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, payload, kind = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, json.loads(payload) if kind.startswith("application/json") else payload


def write_prompts(world: Path) -> None:
    """Two prompt PNGs in WORLD/prompts (a left-half and a top-half white frame, 16x16)."""
    from PIL import Image

    (world / "prompts").mkdir(exist_ok=True)
    for name, sl in (("left", np.s_[:, :8]), ("top", np.s_[:8, :])):
        frame = np.zeros((16, 16, 3), np.uint8)
        frame[sl] = 255
        Image.fromarray(frame).save(world / "prompts" / f"{name}.png")


@pytest.fixture(scope="session")
def served(tiny_world: Path) -> Iterator[Served]:
    """``genie play --world TINY --port 0`` (free port), built through the CLI's own parser."""
    write_prompts(tiny_world)
    args = build_parser(["play"]).parse_args(["play", "--world", str(tiny_world), "--port", "0", "--device", "cpu"])
    app = build_app(args)
    server = make_server(app, args.host, args.port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield Served(app, f"http://{host}:{port}")
    server.shutdown()
    server.server_close()

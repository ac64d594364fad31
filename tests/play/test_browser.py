"""The play page in a real browser: headless Debian Chromium driven by Playwright.

Skips when Chromium (``apt-get install chromium``) or the ``playwright`` package is missing, unless
``GENIE_REQUIRE_BROWSER=1`` (CI sets it, so there a missing browser fails instead of hiding). The
screenshots go to ``$GENIE_ARTIFACTS`` (CI: ``artifacts/``), else the test's temporary folder.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.play.conftest import Served

CHROMIUM = os.environ.get("GENIE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# as root in a sandbox with no network: no sandboxing, and none of Chromium's background connections
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("GENIE_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("GENIE_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_for_step(page, n: int) -> str:
    """Wait until the page shows step n; return the frame's image data URL."""
    page.wait_for_selector(f"#frame[data-step='{n}']", timeout=30_000)
    return page.get_attribute("#frame", "src")


def wait_until_idle(page, at_least: int) -> int:
    """Wait until the page shows step ``at_least`` or later with no step in flight; return the step shown.

    A key press is a keydown and a keyup: on a loaded machine the keyup can reach the page after the first step's
    reply, and then the key counts as held for one more step (a held key streams), so a press is >= 1 step.
    """
    page.wait_for_function(
        f"(() => {{ const f = document.querySelector('#frame'); "
        f"return Number(f.dataset.step) >= {at_least} && !f.classList.contains('busy'); }})()",
        timeout=30_000,
    )
    return int(page.get_attribute("#frame", "data-step"))


def test_keys_step_the_world_in_the_page(served: Served, browser, artifacts: Path):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(served.url)
    first = wait_for_step(page, 0)
    assert page.locator("#actions button").count() == 5
    assert page.locator("#prompts img").count() == 2
    # crisp pixel scaling: the 16 px frame is shown large and not smoothed
    box = page.locator("#frame").bounding_box()
    assert box["width"] >= 400
    assert page.eval_on_selector("#frame", "e => getComputedStyle(e).imageRendering") in ("pixelated", "crisp-edges")

    page.keyboard.press("2")
    steps = wait_until_idle(page, 1)
    assert page.get_attribute("#frame", "src") != first  # the frame changed
    assert page.inner_text("#history").split() == ["1"] * steps  # key 2 is action 1
    up = served.app.arrows["ArrowUp"]
    page.keyboard.press("ArrowUp")
    steps = wait_until_idle(page, steps + 1)
    assert page.inner_text("#history").split()[-1] == str(up)
    assert "ms model" in page.inner_text("#stats")
    page.screenshot(path=str(artifacts / "play.png"))

    # download the episode as a gif: the reset's frame and one per step
    with page.expect_download() as download:
        page.click("#gif")
    gif = artifacts / "play-episode.gif"
    download.value.save_as(gif)
    with Image.open(gif) as im:
        assert im.n_frames == steps + 1

    # reset starts over; picking the other prompt shows it
    page.click("#reset")
    wait_for_step(page, 0)
    page.click("#prompts img[data-prompt='1']")
    page.wait_for_function("document.querySelector('#stats').textContent.includes('top.png')")
    assert not errors, errors


def test_tabs_keep_their_own_episodes_and_bad_uploads_are_explained(served: Served, browser, artifacts: Path, tmp_path):
    context = browser.new_context()
    a, b = context.new_page(), context.new_page()
    for page in (a, b):
        page.goto(served.url)
        wait_for_step(page, 0)
    for key in ("1", "3", "4"):
        a.keyboard.press(key)
    wait_until_idle(a, 3)
    b.keyboard.press("5")
    b_steps = wait_until_idle(b, 1)
    # each press is one step, or more when its keyup arrives late (see wait_until_idle): runs of one action
    assert [k for k, _ in itertools.groupby(a.inner_text("#history").split())] == ["0", "2", "3"]
    assert b.inner_text("#history").split() == ["4"] * b_steps

    # an upload that is not an image: a message, and the episode is untouched
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"this is not a png")
    b.set_input_files("#upload", str(fake))
    b.wait_for_function("document.querySelector('#message').textContent.includes('not an image')")
    assert b.get_attribute("#frame", "data-step") == str(b_steps)
    # a real image starts a new episode from it
    photo = tmp_path / "photo.png"
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (32, 1, 3))).save(photo)
    b.set_input_files("#upload", str(photo))
    b.wait_for_function("document.querySelector('#stats').textContent.includes('prompt upload')")
    assert b.get_attribute("#frame", "data-step") == "0" and b.inner_text("#message") == ""
    b.screenshot(path=str(artifacts / "play-upload.png"))
    context.close()


def test_holding_a_key_streams_frames_and_shows_the_rate(served: Served, browser):
    page = browser.new_page()
    page.goto(served.url)
    wait_for_step(page, 0)
    page.keyboard.down("2")  # one keydown; Playwright sends no auto-repeat, so every step past the first is streamed
    page.wait_for_function("Number(document.querySelector('#frame').dataset.step) >= 6", timeout=30_000)
    assert "frames/s" in page.inner_text("#fps")
    page.keyboard.up("2")
    page.wait_for_function("document.querySelector('#fps').textContent === ''", timeout=30_000)  # stream ended
    stopped = int(page.get_attribute("#frame", "data-step"))
    page.wait_for_timeout(500)
    assert int(page.get_attribute("#frame", "data-step")) == stopped  # released: no more steps
    assert set(page.inner_text("#history").split()) == {"1"}

"""The gateway's pages in a real headless browser (Debian's chromium driven by Playwright).

A real ``masa-rt serve`` (the shipped model, the shipped ``examples/pour_milk.npz``
reference) and a real ``masa-rt web`` with a token file run as processes; the headset page
replays ``examples/demos/pour_milk.npz`` through the gateway and the dashboard page must
show that session in pour_milk's phases, by name. Skips, with the reason, where chromium
or Playwright is missing (Playwright's own browser download is not needed: the test
points it at the system's chromium, ``MASA_RT_CHROMIUM`` or ``chromium`` on PATH).

``MASA_RT_WEB_SCREENSHOTS=DIR`` keeps a screenshot of each page there (docs/img has the
ones in the docs); otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from web_helpers import RECORDING, REFERENCE, pour_milk_phases

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = (os.environ.get("MASA_RT_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get "
                       "install chromium; or set MASA_RT_CHROMIUM to a Chromium binary)"),
]
TOKEN = "operator-token-0123456789"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def _process(args: list[str], pattern: str, timeout: float = 60.0) -> Iterator[re.Match]:
    """``masa-rt ARGS`` until the log line matching ``pattern``; SIGTERM at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "masa_rt.cli", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            line = proc.stderr.readline()
            assert line, f"masa-rt {args[0]} exited ({proc.wait()}) before {pattern!r}"
            if m := re.search(pattern, line):
                break
            assert time.monotonic() < deadline, f"masa-rt {args[0]}: no {pattern!r}"
        # Keep reading its log, so that a full pipe never blocks the process.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield m
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory) -> Iterator[str]:
    """One server and one gateway for the module's tests (each starts in seconds)."""
    tokens = tmp_path_factory.mktemp("web") / "tokens"
    tokens.write_text(f"operator {TOKEN}\n")
    tokens.chmod(0o600)
    serve = ["serve", "--reference", str(REFERENCE), "--bind", "tcp://127.0.0.1:0",
             "--pub", "tcp://127.0.0.1:0"]
    with _process(serve, r"event=serving bind=(\S+) pub=(\S+)") as served:
        web = ["web", "--server", served.group(1), "--pub", served.group(2), "--port", "0",
               "--token-file", str(tokens)]
        with _process(web, r"event=web_serving url=(\S+)") as listening:
            yield listening.group(1)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses root
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


def _page(browser, url: str, errors: list[str]):
    page = browser.new_page(viewport={"width": 1280, "height": 640})
    page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
    page.on("console", lambda m: m.type == "error" and errors.append(f"{url}: {m.text}"))
    page.goto(url)
    return page


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MASA_RT_WEB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_headset_replay_shows_up_on_the_dashboard_by_phase_name(gateway_url, browser,
                                                                  tmp_path):
    phases = set(pour_milk_phases())
    errors: list[str] = []
    dashboard = _page(browser, f"{gateway_url}/dashboard#token={TOKEN}", errors)
    headset = _page(browser, f"{gateway_url}/headset#token={TOKEN}&recording=pour_milk.npz",
                    errors)
    headset.wait_for_function("document.querySelector('#recording').value === "
                              "'pour_milk.npz'", timeout=10_000)
    headset.check("#loop")
    headset.click("#replay")

    # The headset page shows the phase it is in, by name.
    headset.wait_for_function(f"{sorted(phases)}.includes("
                              "document.querySelector('#phase').textContent)", timeout=15_000)
    # The dashboard shows the session, its phase by name and the bar split into phases.
    seen = set()
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and len(seen) < 5:
        cell = dashboard.text_content("tr[data-session] td.phase", timeout=10_000) or ""
        seen.add(cell.rsplit(" ", 1)[0])
        time.sleep(0.2)
    assert len(seen) >= 5 and seen <= phases, f"dashboard phases {seen}"
    # Within a loop or two every phase has been located: the bar is the reference's phases
    # in the reference's order.
    dashboard.wait_for_function(f"document.querySelectorAll('.bar .seg').length === "
                                f"{len(phases)}", timeout=30_000)
    segments = dashboard.eval_on_selector_all(".bar .seg", "els => els.map(e => e.dataset.phase)")
    assert segments == pour_milk_phases()
    assert dashboard.text_content("tr[data-session] td.activity") == "pour_milk"
    assert "live from tcp://" in dashboard.text_content("#status")

    shots = _shots(tmp_path)
    bottom = dashboard.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
    dashboard.screenshot(path=str(shots / "web_dashboard.png"),
                         clip={"x": 0, "y": 0, "width": 1280, "height": bottom + 16})
    headset.screenshot(path=str(shots / "web_headset.png"))
    headset.click("#stop")
    headset.close()
    dashboard.close()
    assert not errors, errors


def test_webxr_hands_stream_through_the_gateway(gateway_url, browser):
    """The XR path of the headset page, on a stand-in for WebXR (tests/fake_webxr.js) that
    plays the pour_milk recording as WebXR hand joints: the page streams webxr_hands25,
    the server converts it to the model's h2o_hands and answers with pour_milk's phases."""
    from masa_rt.skeleton import LAYOUTS, convert

    with np.load(RECORDING) as f:
        webxr = convert(f["joints"], "h2o_hands", "webxr_hands25")  # metacarpals: NaN
    frames = [[None if np.isnan(p).any() else p.tolist() for p in frame] for frame in webxr]
    names = [n[2:] for n in LAYOUTS["webxr_hands25"].joint_names[:25]]
    errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.add_init_script(f"window.__xrFrames = {json.dumps(frames)};"
                         f"window.__xrJointNames = {json.dumps(names)};")
    page.add_init_script(path=str(Path(__file__).with_name("fake_webxr.js")))
    page.goto(f"{gateway_url}/headset#token={TOKEN}")
    page.wait_for_function("!document.querySelector('#xr').disabled", timeout=10_000)
    page.click("#xr")
    page.wait_for_function("document.querySelector('#status').textContent"
                           ".startsWith('streaming WebXR hands')", timeout=10_000)
    seen = set()
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and len(seen) < 4:
        seen.add(page.text_content("#phase"))
        time.sleep(0.2)
    assert not errors, errors
    assert len(seen - {"–"}) >= 3 and seen - {"–"} <= set(pour_milk_phases()), seen
    assert page.text_content("#activity") == "pour_milk"
    assert page.text_content("#counts").endswith(" answered · 0 rejected")
    page.close()


def test_a_wrong_token_is_refused_in_the_page(gateway_url, browser):
    errors: list[str] = []
    page = _page(browser, f"{gateway_url}/dashboard#token=wrong-token-0123456789", errors)
    page.wait_for_function("document.querySelector('#status').textContent"
                           ".startsWith('refused')", timeout=10_000)
    assert page.text_content("#status") == "refused: unauthorised: unknown token"
    page.close()

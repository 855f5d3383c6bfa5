"""engine.watch: rendering is a pure function; the loop is checked against a live server."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import zmq
from fake_pipeline import FakePipeline

from clients.inlet import Estimate, EstimateInlet
from clients.outlet import PoseOutlet
from engine.server import Server, ServerConfig
from engine.watch import Dashboard, WatchConfig, latency_ms, progress_bar, render


def est(session: str = "s1", **kw) -> Estimate:
    fields = dict(session=session, seq=7, t_capture=10.0, t_server_recv=10.001,
                  t_server_send=10.0015, phase_id=1, phase_name="pour", phase_progress=0.5,
                  progress=0.42, confidence=0.91, state="tracking", activity="pour_milk",
                  t_received=10.002)
    return Estimate(**{**fields, **kw})


def test_progress_bar_clamps():
    assert progress_bar(0.5, 10) == "[#####.....]  50%"
    assert progress_bar(1.7, 4) == "[####] 100%"
    assert progress_bar(float("nan"), 4) == "[....]   0%"


def test_latency_uses_the_clock_offset_when_known():
    e = est()
    assert latency_ms(e, None) == pytest.approx((0.5, "server"), abs=1e-9)
    assert latency_ms(e, 0.0)[0] == pytest.approx(1.5)
    # Server clock 100 s ahead of the headset's: capture happened at server time 110.0.
    assert latency_ms(est(t_server_send=110.0025), 100.0)[0] == pytest.approx(2.5)


def test_render_lines_for_given_estimates():
    latest = {"b": est("b", phase_name=None, state="waiting", progress=0.0),
              "a": est("a")}
    lines = render(latest, WatchConfig(clock_offset=0.0))
    assert lines[0].split()[:4] == ["session", "activity", "phase", "progress"]
    assert lines[1].split() == ["a", "pour_milk", "pour", "[########............]", "42%",
                                "0.91", "tracking", "1.50", "ms"]
    assert lines[2].split()[:3] == ["b", "pour_milk", "-"] and "waiting" in lines[2]
    assert len(lines) == 3  # offset known: no footnote
    cfg = WatchConfig()
    assert render({}, cfg)[1:] == [
        f"(no estimates yet from {cfg.address}: is `masa-rt serve` running and publishing "
        "there? see --address)",
        "* server-side latency (receive -> send); pass --clock-offset for e2e"]


def test_long_names_are_cut_to_keep_columns():
    line = render({"x": est("x" * 40, activity="a" * 30)}, WatchConfig(clock_offset=0.0))[1]
    assert line.index("pour ") == render({"y": est("y")}, WatchConfig(clock_offset=0.0))[1] \
        .index("pour ")


def test_tty_redraws_in_place_plain_appends():
    out = io.StringIO()
    dash = Dashboard(WatchConfig(), out, tty=True)
    dash.update(est())
    dash.draw(10.0)
    dash.draw(10.1)
    first, second = out.getvalue().split("\x1b[3F\x1b[J")  # up 3 lines, clear, redraw
    assert first == second and "pour_milk" in first
    plain = io.StringIO()
    dash = Dashboard(WatchConfig(), plain, tty=False)
    dash.update(est())
    dash.draw(10.0)
    assert "\x1b" not in plain.getvalue() and plain.getvalue().count("pour_milk") == 1


def test_silent_sessions_are_forgotten():
    dash = Dashboard(WatchConfig(forget_s=5.0), io.StringIO(), tty=False)
    dash.update(est("old", t_received=0.0))
    dash.update(est("new", t_received=9.0))
    dash.draw(10.0)
    assert list(dash.latest) == ["new"]


def test_dashboard_follows_a_live_server():
    server = Server(FakePipeline(), ServerConfig(bind="tcp://127.0.0.1:0",
                                                 pub_bind="tcp://127.0.0.1:0"))
    ctx = zmq.Context()
    with server:
        out = io.StringIO()
        dash = Dashboard(WatchConfig(server.pub_address, tty_hz=50.0), out, tty=False)
        stop = threading.Event()
        with EstimateInlet(server.pub_address, context=ctx) as inlet, \
                PoseOutlet(server.address, session="live", fps=90.0, context=ctx) as outlet:
            thread = threading.Thread(target=dash.run, args=(inlet, 10.0, stop))
            thread.start()
            deadline = time.monotonic() + 5.0
            while dash.received == 0:  # the SUB joins asynchronously: stream until seen
                assert time.monotonic() < deadline, "dashboard saw nothing"
                outlet.push(np.zeros((42, 3), np.float32))
                outlet.pull(0.01)
            stop.set()
            thread.join(5.0)
    ctx.term()
    assert "live" in out.getvalue() and "phase" in out.getvalue()

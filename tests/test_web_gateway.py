"""The web gateway without a browser: its WebSocket bridge to a real server, token
refusal, session ownership per token, recordings, and the phase extents it learns.

Real sockets on loopback throughout (a real ``engine.server.Server``, the gateway on
uvicorn, the ``websockets`` client); every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")
from web_helpers import (  # noqa: E402
    RECORDING,
    pour_milk_phases,
    running_gateway,
    shipped_server,
)
from websockets.exceptions import ConnectionClosed  # noqa: E402

from clients.web.config import GatewayConfig  # noqa: E402
from clients.web.phases import PhaseMap  # noqa: E402
from masa_rt import protocol as P  # noqa: E402
from masa_rt.skeleton import LAYOUTS  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "clients" / "web" / "static"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


@pytest.fixture(scope="module")
def server():
    with shipped_server() as srv:
        yield srv


def _config(server, tmp_path: Path | None = None, **kw) -> GatewayConfig:
    token_file = None
    if tmp_path is not None:
        token_file = tmp_path / "tokens"
        token_file.write_text("".join(f"{n} {t}\n" for n, t in TOKENS.items()))
        token_file.chmod(0o600)
    return GatewayConfig(server=server.address, pub=server.pub_address, port=0,
                         token_file=token_file, **kw)


def _ws_url(url: str, path: str) -> str:
    return url.replace("http://", "ws://") + path


@contextlib.contextmanager
def _open(url: str, path: str = "/ws/headset", token: str | None = None):
    """A WebSocket past the auth message: (socket, auth_ok)."""
    with ws_client.connect(_ws_url(url, path), open_timeout=5) as ws:
        ws.send(msgpack.packb({"v": 1, "type": "auth", "token": token}))
        yield ws, msgpack.unpackb(ws.recv(timeout=5))


def _close_code(url: str, path: str, first: bytes | None) -> tuple[int, str]:
    """(code, reason) the gateway closes with after ``first`` (None: nothing sent)."""
    with ws_client.connect(_ws_url(url, path), open_timeout=5) as ws:
        if first is not None:
            with contextlib.suppress(ConnectionClosed):  # it may be closed already
                ws.send(first)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(3):  # an admitted page's auth_ok comes first
                ws.recv(timeout=5)
    return closed.value.rcvd.code, closed.value.rcvd.reason


def _next(ws, kind: str, timeout: float = 5.0) -> dict:
    """The next message of type ``kind`` (others skipped), decoded by the protocol module."""
    while True:
        msg = P.decode(ws.recv(timeout=timeout))
        if msg["type"] == kind:
            return msg


def _frames() -> np.ndarray:
    with np.load(RECORDING) as f:
        return f["joints"]


def test_bridge_streams_a_recording_and_gets_estimates(server):
    joints = _frames()
    with running_gateway(_config(server)) as url:
        with _open(url) as (ws, auth):
            assert auth["type"] == "auth_ok" and auth["name"] is None and not auth["tokens"]
            ws.send(P.encode(P.hello("web-test", "h2o_hands", 30.0, 0.0, reference="pour_milk")))
            welcome = _next(ws, "welcome")
            assert welcome["references"] == ["pour_milk"] and welcome["shape"] == [42, 3]
            estimates = []
            for k in range(60):
                ws.send(P.encode(P.frame("web-test", k, 1.0 + k / 30.0, joints[k])))
                estimates.append(_next(ws, "estimate"))
        assert [e["seq"] for e in estimates] == list(range(60))
        named = {e["phase_name"] for e in estimates} - {None}
        assert named and named <= set(pour_milk_phases())
        stats = json.loads(urllib.request.urlopen(url + "/stats", timeout=5).read())
    assert stats["messages_to_server"] == 61 and stats["messages_to_pages"] >= 61
    assert stats["pages.headset"] == 1


def test_bridge_serves_webxr_hands_converted_to_the_model_layout(server):
    hands = np.zeros((50, 3), np.float32) + np.arange(50, dtype=np.float32)[:, None] / 50
    with running_gateway(_config(server)) as url, _open(url) as (ws, _):
        ws.send(P.encode(P.hello("web-xr", "webxr_hands25", 30.0, 0.0)))
        welcome = _next(ws, "welcome")
        assert welcome["shape"] == [50, 3] and welcome["model_layout"] == "h2o_hands"
        ws.send(P.encode(P.frame("web-xr", 0, 1.0, hands)))
        assert _next(ws, "estimate")["seq"] == 0


def test_wrong_token_is_refused_with_a_reason_and_counted(server, tmp_path):
    wrong = msgpack.packb({"v": 1, "type": "auth", "token": "x" * 22})
    with running_gateway(_config(server, tmp_path, auth_timeout_s=0.5)) as url:
        for path in ("/ws/headset", "/ws/dashboard"):
            assert _close_code(url, path, wrong) == (4401, "unauthorised: unknown token")
        assert _close_code(url, "/ws/headset", None)[0] == 4408  # no auth message in time
        assert _close_code(url, "/ws/headset", b"\xc1 not msgpack")[0] == 4400
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(url + "/recordings", timeout=5)
        assert http.value.code == 401
        with _open(url, token=TOKENS["alice"]) as (_, auth):
            assert auth["name"] == "alice" and auth["tokens"]
        request = urllib.request.Request(url + "/stats",
                                         headers={"Authorization": f"Bearer {TOKENS['bob']}"})
        stats = json.loads(urllib.request.urlopen(request, timeout=5).read())
    assert stats["refused.unauthorised"] == 2 and stats["refused.auth_timeout"] == 1
    assert stats["refused.bad_auth"] == 1 and stats["refused.unauthorised_http"] == 1


def test_sessions_belong_to_the_token_that_opened_them(server, tmp_path):
    frame = _frames()[0]
    cfg = _config(server, tmp_path, max_sessions_per_client=1)
    with running_gateway(cfg) as url, _open(url, token=TOKENS["alice"]) as (alice, _), \
            _open(url, token=TOKENS["bob"]) as (bob, _):
        alice.send(P.encode(P.hello("alices", "h2o_hands", 30.0, 0.0)))
        _next(alice, "welcome")
        bob.send(P.encode(P.frame("alices", 0, 1.0, frame)))
        refused = _next(bob, "error")
        assert (refused["reason"], refused["seq"]) == ("session_owner", 0)
        bob.send(P.encode(P.hello("alices", "h2o_hands", 30.0, 0.0)))
        assert _next(bob, "error")["reason"] == "session_owner"
        alice.send(P.encode(P.hello("second", "h2o_hands", 30.0, 0.0)))
        assert _next(alice, "error")["reason"] == "too_many_sessions"
        alice.send(P.encode(P.frame("alices", 0, 1.0, frame)))  # the owner streams on
        assert _next(alice, "estimate")["seq"] == 0
        alice.send("text, not msgpack")
        assert _next(alice, "error")["reason"] == "malformed"
        alice.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
        assert _next(alice, "error")["reason"] == "too_large"
        alice.send(b"\xc1")  # not msgpack: passed on, the server refuses and counts it
        assert _next(alice, "error")["reason"] == "malformed"
    assert server.stats()["counters"].get("rejected.malformed", 0) >= 1


def test_dashboard_socket_shows_live_sessions(server):
    joints = _frames()
    with running_gateway(_config(server, snapshot_hz=20.0)) as url, \
            _open(url) as (head, _), _open(url, "/ws/dashboard") as (dash, _):
        head.send(P.encode(P.hello("dash-test", "h2o_hands", 30.0, 0.0, reference="pour_milk")))
        _next(head, "welcome")
        for k in range(50):  # within the rate limit's burst (2 x fps, one second)
            head.send(P.encode(P.frame("dash-test", k, 1.0 + k / 30.0, joints[k])))
            _next(head, "estimate")
        for _ in range(50):  # snapshots come 20 a second; the PUB stream may lag a little
            snap = msgpack.unpackb(dash.recv(timeout=5))
            row = [s for s in snap["sessions"] if s["session"] == "dash-test"]
            if row and row[0]["seq"] == 49 and snap["server"]:
                break
    assert row and row[0]["seq"] == 49 and row[0]["activity"] == "pour_milk"
    segments = snap["phases"]["pour_milk"]
    assert segments and {s["name"] for s in segments} <= set(pour_milk_phases())
    assert snap["server"]["counters"]["frames_in"] >= 50


def test_gateway_speaks_curve_to_a_secure_server(tmp_path):
    from clients.web.keys import load_gateway_keys
    from engine.security import create_keypair

    keydir = tmp_path / "keys"
    create_keypair(keydir, "server", server=True)
    create_keypair(keydir, "web", operator=True)  # the dashboard reads every session
    curve = load_gateway_keys(keydir, "web")
    with shipped_server(keydir=str(keydir)) as secure:
        cfg = GatewayConfig(server=secure.address, pub=secure.pub_address,
                            token_file=_config(secure, tmp_path).token_file)
        with running_gateway(cfg, curve) as url, \
                _open(url, token=TOKENS["alice"]) as (ws, _), \
                _open(url, "/ws/dashboard", token=TOKENS["bob"]) as (dash, _):
            ws.send(P.encode(P.hello("secure-web", "h2o_hands", 30.0, 0.0)))
            assert _next(ws, "welcome")["session"] == "secure-web"
            for k in range(10):
                ws.send(P.encode(P.frame("secure-web", k, 1.0 + k / 30.0, _frames()[k])))
                _next(ws, "estimate")
            # The dashboard reads every session's estimates off the secure PUB socket.
            for _ in range(50):
                snap = msgpack.unpackb(dash.recv(timeout=5))
                if any(r["session"] == "secure-web" for r in snap["sessions"]):
                    break
            assert [r["seq"] for r in snap["sessions"] if r["session"] == "secure-web"]
        for listed in keydir.glob("*/web.key"):  # revoked: the page hears why
            listed.unlink()
        with running_gateway(cfg, curve) as url, \
                _open(url, token=TOKENS["alice"]) as (ws, _):
            refused = _next(ws, "error")
            stats = json.loads(urllib.request.urlopen(urllib.request.Request(
                url + "/stats", headers={"Authorization": f"Bearer {TOKENS['bob']}"}),
                timeout=5).read())
    assert refused["reason"] == "unauthorised" and "CURVE key" in refused["detail"]
    assert stats["refused_by_server.unauthorised"] >= 1


def test_pages_beyond_the_cap_are_refused_and_counted(server):
    with running_gateway(_config(server, max_headset_pages=1)) as url, _open(url) as (first, _):
        assert _close_code(url, "/ws/headset", msgpack.packb({"v": 1, "type": "auth"})) == \
            (4429, "too_many_pages: 1 pages are streaming already")
        first.send(P.encode(P.hello("still-here", "h2o_hands", 30.0, 0.0)))
        assert _next(first, "welcome")["session"] == "still-here"
        stats = json.loads(urllib.request.urlopen(url + "/stats", timeout=5).read())
    assert stats["refused.too_many_pages"] == 1


def test_an_upload_that_would_unpack_too_large_is_refused(server):
    with running_gateway(_config(server, max_unpacked_bytes=1000)) as url:
        upload = urllib.request.Request(url + "/recordings?name=big.npz",
                                        data=RECORDING.read_bytes(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(upload, timeout=5)
    assert refused.value.code == 422
    assert re.fullmatch(r"big\.npz: its arrays unpack to \d+ bytes, over 1000",
                        json.loads(refused.value.read())["error"])


def test_recordings_listed_served_and_junk_uploads_refused(server):
    with running_gateway(_config(server)) as url:
        names = json.loads(urllib.request.urlopen(url + "/recordings", timeout=5).read())
        assert "pour_milk.npz" in names
        rec = msgpack.unpackb(urllib.request.urlopen(url + "/recordings/pour_milk.npz",
                                                     timeout=5).read())
        data = np.frombuffer(rec["data"], "<f4").reshape(rec["shape"])
        np.testing.assert_array_equal(data, _frames())
        upload = urllib.request.Request(url + "/recordings?name=mine.npz",
                                        data=RECORDING.read_bytes(), method="POST")
        assert msgpack.unpackb(urllib.request.urlopen(upload, timeout=5).read())["layout"] \
            == "h2o_hands"
        junk = urllib.request.Request(url + "/recordings?name=junk.npz", data=b"junk",
                                      method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(junk, timeout=5)
        assert refused.value.code == 422
        assert json.loads(refused.value.read())["error"].startswith("junk.npz: not a .npz")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "/recordings/..%2Fpour_milk.npz", timeout=5)
        assert missing.value.code == 404


def test_phase_map_locates_phases_from_two_estimates_each():
    phases = PhaseMap()
    extents = {0: (0.0, 0.25), 1: (0.25, 0.7), 2: (0.7, 1.0)}
    for pid, (start, end) in extents.items():
        for pp in (0.0, 0.2, 0.9, 1.0):  # the clipped ends must not spoil the fit
            progress = start + pp * (end - start) + (0.05 if pp in (0.0, 1.0) else 0.0)
            phases.observe("task", pid, f"p{pid}", pp, progress)
    got = phases.segments("task")
    assert [s["name"] for s in got] == ["p0", "p1", "p2"]
    for seg in got:
        assert (seg["start"], seg["end"]) == pytest.approx(extents[seg["id"]])
    phases.observe("other", 0, "only", 0.5, 0.5)  # one estimate: not located yet
    assert phases.segments("other") == []


def test_page_joint_names_are_the_layout_table():
    text = (STATIC / "webxr_joints.js").read_text()
    names = re.findall(r'"([a-z-]+)"', text.split("WEBXR_JOINTS = [")[1].split("];")[0])
    layout = LAYOUTS["webxr_hands25"].joint_names
    assert [f"l_{n}" for n in names] + [f"r_{n}" for n in names] == list(layout)


def test_the_gateway_imports_neither_torch_nor_the_engine():
    code = ("import sys, clients.web.app, clients.web.serve; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('engine')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""CURVE + ZAP allow-list (engine.security) with real sockets on loopback, no sleeps.

A minimal protocol server in a thread (ROUTER + PUB, configured with engine.security
exactly as engine.server is) stands in for the engine; a raw TCP proxy between client
and server records the bytes on the wire to show what an eavesdropper on the Wi-Fi sees.
"""

from __future__ import annotations

import argparse
import logging
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from clients import EstimateInlet, PoseOutlet, ServerError, local_clock
from clients._sockets import CurveKeys, new_socket
from engine.security import (
    SecurityConfig,
    apply_server_curve,
    create_keypair,
    is_loopback,
    list_keys,
    load_client_keys,
    plain_mode_warning,
    start_authenticator,
)
from engine.security_commands import keys_list, keys_new, register
from masa_rt import protocol as P

SHAPE = (42, 3)
MARKER = "PLAINTEXT_MARKER"
NOTHING_S = 0.5  # how long "gets nothing" waits


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """Server key, 'alice' on the allow-list, 'mallory' with a keypair but not listed."""
    d = tmp_path / "keys"
    create_keypair(d, "server", server=True)
    create_keypair(d, "alice")
    create_keypair(d, "mallory")
    (d / "clients" / "mallory.key").unlink()
    return d


class MiniServer:
    """Just enough of the protocol: hello -> welcome, frame -> estimate (+ PUB), ping -> pong.

    With ``keydir`` its sockets are secured by engine.security, as the real server's are.
    """

    def __init__(self, keydir: Path | None = None) -> None:
        self.config = SecurityConfig(keydir)
        self.received: list[dict] = []
        self.user_ids: list[str | None] = []
        self._ctx = zmq.Context()
        self.auth = start_authenticator(self._ctx, keydir) if keydir else None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock in (self._router, self._pub):
            sock.linger = 0
            if keydir:
                apply_server_curve(sock, keydir)
        self.port = self._router.bind_to_random_port("tcp://127.0.0.1")
        self.pub_port = self._pub.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def __enter__(self) -> MiniServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._router.close()
        self._pub.close()
        if self.auth is not None:
            self.auth.stop()  # before term: the ZAP socket lives in this context
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            ident, payload = self._router.recv_multipart(copy=False)
            self.user_ids.append(payload.get("User-Id") if self.auth else None)
            msg = P.decode(payload.bytes)
            self.received.append(msg)
            reply = self._answer(msg, self.user_ids[-1])
            if reply is not None:
                self._router.send_multipart([ident.bytes, P.encode(reply)])

    def _answer(self, msg: dict, user: str | None) -> dict | None:
        now = time.perf_counter()
        if msg["type"] == "hello":
            return P.welcome(msg["session"], now, model="mini", references=["pour_milk"],
                             fps=msg["fps"], layout=msg["layout"], shape=SHAPE, window=8)
        if msg["type"] == "ping":
            return P.pong(msg["client_time"], now)
        if msg["type"] == "frame":
            est = P.estimate(msg["session"], msg["seq"], msg["t"], now, now, phase_id=0,
                             phase_name="phase0", phase_progress=0.5,
                             progress=float(np.nanmean(msg["joints"])), confidence=0.9,
                             state="tracking", activity="pour_milk")
            # The real server's topics: under --secure, the owner's key first
            tenant = user.encode() if user else None
            self._pub.send_multipart([P.topic(msg["session"], tenant), P.encode(est)])
            return est
        return None


class TcpProxy:
    """Relays 127.0.0.1:port <-> target, keeping a copy of every byte (a wire sniffer)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def wire(self) -> bytes:
        with self._lock:
            return bytes(self.recorded)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2.0)
            for s in (client, upstream):
                s.settimeout(0.05)
                self._socks.append(s)
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                dst.close()
                return
            with self._lock:
                self.recorded += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        for s in [*self._socks, self._listener]:
            s.close()


def _pose(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def _pull_until(puller, deadline_s: float = 5.0):
    end = local_clock() + deadline_s
    while local_clock() < end:
        got = puller.pull(timeout=0.05)
        if got is not None:
            return got
    pytest.fail("nothing arrived before the deadline")


def _raw_dealer(ctx: zmq.Context, address: str, keys: CurveKeys | None) -> zmq.Socket:
    sock = new_socket(ctx, zmq.DEALER, curve=keys, linger_ms=0)
    sock.connect(address)
    return sock


# ---------------------------------------------------------------------- key files


def test_keypairs_land_in_the_layout_with_private_secrets(keydir: Path):
    for sub, name in (("server", "server"), ("private", "alice")):
        secret = keydir / sub / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert not (secret.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    assert stat.S_IMODE((keydir / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((keydir / "server").stat().st_mode) == 0o700
    assert (keydir / "clients" / "alice.key").is_file()
    assert "secret-key" not in (keydir / "clients" / "alice.key").read_text()
    assert "secret-key" not in (keydir / "server" / "server.key").read_text()
    assert not list(keydir.glob(".new-key-*"))  # the private staging dir is gone
    keys = {(k.role, k.name): k for k in list_keys(keydir)}
    assert set(keys) == {("server", "server"), ("client", "alice"), ("client", "mallory")}
    assert all(k.secret_mode_ok and k.secret_file is not None for k in keys.values())
    loaded = load_client_keys(keydir, "alice")
    assert loaded.public.decode() == keys["client", "alice"].public
    assert loaded.server_public.decode() == keys["server", "server"].public
    assert len(loaded.secret) == 40  # Z85 of 32 bytes


def test_keypair_refusals(keydir: Path):
    with pytest.raises(ValueError, match="exists"):
        create_keypair(keydir, "alice")
    with pytest.raises(ValueError, match="already holds a server key"):
        create_keypair(keydir, "other", server=True)
    for bad in ("../evil", ".hidden", "", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="bad key name"):
            create_keypair(keydir, bad)
    old = load_client_keys(keydir, "alice").public
    create_keypair(keydir, "alice", force=True)
    assert load_client_keys(keydir, "alice").public != old
    secret = keydir / "private" / "alice.key_secret"
    secret.chmod(0o644)  # a secret others can read is refused, as ssh does
    with pytest.raises(ValueError, match="chmod 600"):
        load_client_keys(keydir, "alice")
    with pytest.raises(FileNotFoundError):
        load_client_keys(keydir, "nobody")
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        with pytest.raises(FileNotFoundError, match="no server key"):
            apply_server_curve(sock, keydir / "nowhere")
    finally:
        sock.close(linger=0)


def test_keys_cli(tmp_path: Path):
    parser = argparse.ArgumentParser(prog="masa-rt")
    register(parser.add_subparsers(dest="command"))
    d = tmp_path / "k"
    for argv in (["keys", "new", "srv", "--server", "--dir", str(d)],
                 ["keys", "new", "headset1", "--dir", str(d)]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    assert stat.S_IMODE((d / "server" / "srv.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "private" / "headset1.key_secret").stat().st_mode) == 0o600
    assert (d / "clients" / "headset1.key").is_file()
    lines: list[str] = []
    assert keys_list(d, out=lines.append) == 2
    assert lines[0].split()[:2] == ["server", "srv"] and lines[1].split()[:2] == ["client",
                                                                                "headset1"]
    printed: list[str] = []
    keys_new("headset2", d, out=printed.append)
    assert any("allow-listed" in line for line in printed)
    args = parser.parse_args(["keys", "list", "--dir", str(d)])
    assert args.func(args) == 0


# ---------------------------------------------------------------------- ZAP allow-list


def test_listed_client_round_trip_over_curve(keydir: Path):
    alice = load_client_keys(keydir, "alice")
    with MiniServer(keydir) as server, \
            PoseOutlet(server.address, session="alice-1", curve=alice) as outlet, \
            EstimateInlet(f"tcp://127.0.0.1:{server.pub_port}", "alice-1",
                          curve=alice) as inlet:
        assert outlet.welcome["model"] == "mini"
        end = local_clock() + 5.0
        est = pub = None
        while pub is None:  # a SUB's subscription takes a moment: push until it flows
            assert local_clock() < end, "no estimate on the PUB socket"
            outlet.push(_pose(0.75))
            est = est or outlet.pull(timeout=0.05)
            pub = inlet.pull(timeout=0.05)
        est = est or _pull_until(outlet)
        assert est.session == "alice-1" and est.progress == pytest.approx(0.75)
        assert pub.session == "alice-1" and pub.progress == pytest.approx(0.75)
        assert outlet.time_correction(probes=2) is not None
        # The server learns who is talking: the ZAP user id is alice's public key.
        assert set(server.user_ids) == {alice.public.decode()}
        assert server.auth.denied == 0 and server.auth.allowed >= 2


def test_unlisted_null_and_wrong_server_key_clients_get_nothing(keydir: Path, caplog):
    mallory = load_client_keys(keydir, "mallory")
    alice = load_client_keys(keydir, "alice")
    impostor = CurveKeys(zmq.curve_keypair()[0], alice.public, alice.secret)  # wrong server
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        with caplog.at_level(logging.WARNING, "masa_rt.security"), MiniServer(keydir) as server:
            socks += [_raw_dealer(ctx, server.address, keys)
                      for keys in (mallory, None, impostor)]
            hello = P.encode(P.hello("sneaky", "h2o_hands", 30.0, 0.0))
            for sock in socks:
                sock.send(hello)  # queued: a DEALER without IMMEDIATE accepts it locally
            end = local_clock() + NOTHING_S
            while local_clock() < end:
                assert not any(s.poll(10) for s in socks), "a refused client got a reply"
            assert server.received == []  # nothing reached the application
            assert server.auth.denied >= 1 and server.auth.allowed == 0
            assert any("zap_denied" in r.message and mallory.public.decode() in r.message
                       for r in caplog.records)
            # ... while a listed client on the same server is served.
            with PoseOutlet(server.address, curve=alice) as outlet:
                assert outlet.welcome is not None
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def test_outlet_reports_unauthorised_quickly(keydir: Path):
    with MiniServer(keydir) as server:
        outlet = PoseOutlet(server.address, curve=load_client_keys(keydir, "mallory"))
        t0 = local_clock()
        with pytest.raises(ServerError) as err:
            outlet.open(timeout=3.0)
        assert err.value.reason == "unauthorised"
        assert local_clock() - t0 < 2.0  # refused in the handshake, not timed out
        assert server.received == []


def test_removing_a_key_revokes_new_connections(keydir: Path):
    alice = load_client_keys(keydir, "alice")
    with MiniServer(keydir) as server:
        with PoseOutlet(server.address, curve=alice):
            pass
        (keydir / "clients" / "alice.key").unlink()
        with pytest.raises(ServerError, match="unauthorised"):
            PoseOutlet(server.address, curve=alice).open(timeout=3.0)
        assert server.auth.denied >= 1


def test_missing_keydir_is_a_clear_error(tmp_path: Path):
    ctx = zmq.Context()
    try:
        with pytest.raises(FileNotFoundError, match="key directory"):
            start_authenticator(ctx, tmp_path / "absent")
    finally:
        ctx.term()


# ---------------------------------------------------------------------- on the wire


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "curve"])
def test_traffic_is_not_plaintext_with_curve(keydir: Path, secure: bool):
    """The marker is on the wire in plain mode (so the sniffer works) and absent with CURVE."""
    curve = load_client_keys(keydir, "alice") if secure else None
    joints = _pose(0.0)
    joints[0] = 1234.5  # a recognisable float pattern in the frame (row-major: 3 in a row)
    pattern = np.float32(1234.5).tobytes() * 2
    with MiniServer(keydir if secure else None) as server:
        proxy = TcpProxy(server.port)
        try:
            with PoseOutlet(proxy.address, session=MARKER, curve=curve) as outlet:
                outlet.push(joints)
                est = _pull_until(outlet)
                assert est.session == MARKER
            wire = proxy.wire()
        finally:
            proxy.close()
    assert len(wire) > 200  # the proxy did carry the session
    seen = [MARKER.encode() in wire, b"pour_milk" in wire, b"h2o_hands" in wire,
            pattern in wire]
    assert seen == ([False] * 4 if secure else [True] * 4)


# ---------------------------------------------------------------------- plain mode


@pytest.mark.parametrize("bind,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.10:5555", True),
    ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True), ("tcp://lo:5555", True),
    ("tcp://[::ffff:127.0.0.1]:5555", True), ("ipc:///tmp/masa.sock", True),
    ("inproc://engine", True), ("tcp://127.0.0.1:*", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://[::]:5555", False),
    ("tcp://192.168.1.20:5555", False), ("tcp://10.0.0.1:5555", False),
    ("tcp://eth0:5555", False), ("tcp://wlan0:*", False), ("tcp://my-host.lan:5555", False),
    ("tcp://128.0.0.1:5555", False), ("ws://0.0.0.0:8080/masa", False),
    ("ws://127.0.0.1:8080/masa", True), ("pgm://eth0;239.192.1.1:5555", False),
    ("127.0.0.1:5555", False),
])
def test_is_loopback(bind: str, local: bool):
    assert is_loopback(bind) is local


def test_plain_mode_warning_only_off_loopback(caplog):
    with caplog.at_level(logging.WARNING, "masa_rt.security"):
        assert plain_mode_warning("tcp://127.0.0.1:5555") is None
        assert caplog.records == []
        text = plain_mode_warning("tcp://0.0.0.0:5555")
    assert text is not None and "NOT encrypted" in text and "--secure" in text
    assert any("event=plain_mode" in r.message and "0.0.0.0" in r.message
               for r in caplog.records)


def test_security_config_defaults_to_plain():
    assert not SecurityConfig().secure and SecurityConfig(Path("k")).secure

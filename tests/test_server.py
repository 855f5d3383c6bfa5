"""engine.server against a fake pipeline: real ROUTER/DEALER/PUB sockets on loopback.

Every wait is a poll with a deadline; nothing sleeps. The fake pipeline answers each frame
with an estimate derived from its seq, so tests can check what came back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from fake_pipeline import SHAPE, FakePipeline

from clients._sockets import CurveKeys
from engine.counters import LatencyHistogram
from engine.security import create_keypair, is_loopback, load_client_keys
from engine.server import Server, ServerConfig
from masa_rt import protocol as P

DEADLINE = 5.0


class Client:
    """A bare DEALER speaking the protocol: send dicts or raw bytes, receive decoded maps."""

    def __init__(self, ctx: zmq.Context, address: str, curve: CurveKeys | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # a CURVE client of a --secure server
            self.sock.curve_serverkey = curve.server_public
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
        self.sock.connect(address)

    def send(self, msg: dict | bytes) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else P.encode(msg))

    def recv(self, timeout: float = DEADLINE) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return P.decode(self.sock.recv())

    def expect(self, kind: str, timeout: float = DEADLINE) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and msg["type"] == kind:
                return msg
        raise AssertionError(f"no {kind!r} within {timeout} s")

    def hello(self, session: str, fps: float = 30.0, **kw) -> dict:
        self.send(P.hello(session, kw.pop("layout", "h2o_hands"), fps, time.perf_counter(), **kw))
        return self.recv()

    def frame(self, session: str, seq: int, t: float | None = None,
              joints: np.ndarray | None = None) -> None:
        j = np.zeros(SHAPE, np.float32) if joints is None else joints
        self.send(P.frame(session, seq, time.perf_counter() if t is None else t, j))


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def make_server(**cfg) -> tuple[Server, FakePipeline]:
    pipe = FakePipeline()
    config = ServerConfig(bind="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0", **cfg)
    return Server(pipe, config).start_in_thread(), pipe


@pytest.fixture
def server():
    srv, pipe = make_server()
    yield srv, pipe
    srv.stop()


@pytest.fixture
def client(ctx, server):
    c = Client(ctx, server[0].address)
    yield c
    c.sock.close()


def wait_for(predicate, timeout: float = DEADLINE) -> None:
    """Poll a condition the server thread will make true (counters are plain ints)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.001)


# --------------------------------------------------------------------------- happy path


def test_hello_welcome(client):
    w = client.hello("s1", fps=90.0)
    assert w["type"] == "welcome" and w["session"] == "s1"
    assert w["shape"] == list(SHAPE) and w["fps"] == 90.0 and w["layout"] == "h2o_hands"
    assert w["last_seq"] == -1 and w["resumed"] is False and w["model"] == "fake"
    assert w["references"] == ["pour_milk"] and w["window"] == 32


def test_frames_get_estimates_with_seq_and_timestamps(client, server):
    client.hello("s1")
    for seq in range(5):
        t0 = time.perf_counter()
        client.frame("s1", seq, t=t0)
        est = client.expect("estimate")
        assert est["seq"] == seq and est["session"] == "s1"
        assert est["t_capture"] == t0
        assert t0 <= est["t_server_recv"] <= est["t_server_send"] <= time.perf_counter()
        assert est["progress"] == pytest.approx(seq / 100)
        assert est["phase_name"] == f"phase{seq % 3}" and est["state"] == "tracking"
    wait_for(lambda: server[0].counters.estimates_out == 5)  # counted just after the send
    assert server[0].counters.frames_in == 5


def test_ping_pong(client):
    client.send(P.ping(123.5))
    pong = client.expect("pong")
    assert pong["client_time"] == 123.5
    assert abs(pong["server_time"] - time.perf_counter()) < 1.0


def test_stats_request_server_and_session(client):
    client.hello("s1")
    for seq in range(3):
        client.frame("s1", seq)
        client.expect("estimate")
    client.send(P.stats())
    reply = client.expect("stats_reply")
    assert reply["counters"]["frames_in"] == 3 and reply["counters"]["sessions_active"] == 1
    assert reply["latency"]["count"] == 3 and reply["latency"]["p99_us"] > 0
    client.send(P.stats("s1"))
    mine = client.expect("stats_reply")
    assert mine["session"] == "s1" and mine["counters"]["last_seq"] == 2


def test_pub_republishes_with_session_topic(ctx, client, server):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"s1")
    sub.connect(server[0].pub_address)
    client.hello("s1")
    # A SUB joins asynchronously: keep streaming until the subscription is in place.
    deadline, seq = time.monotonic() + DEADLINE, 0
    while not sub.poll(10):
        assert time.monotonic() < deadline, "nothing published"
        client.frame("s1", seq)
        seq += 1
    topic, data = sub.recv_multipart()
    assert topic == b"s1" and P.decode(data)["type"] == "estimate"
    sub.close()


def test_resume_rebinds_identity_and_keeps_last_seq(ctx, client, server):
    client.hello("s1")
    for seq in range(3):
        client.frame("s1", seq)
        client.expect("estimate")
    other = Client(ctx, server[0].address)  # the headset reconnected: new routing id
    w = other.hello("s1", resume=True)
    assert w["resumed"] is True and w["last_seq"] == 2
    other.frame("s1", 3)
    assert other.expect("estimate")["seq"] == 3
    client.frame("s1", 4)  # answers go to the connection each frame came from
    assert client.expect("estimate")["seq"] == 4
    assert other.hello("s1", resume=True, layout="penn13")["reason"] == "wrong_layout"
    other.sock.close()


def test_seq_gaps_are_counted_as_lost(client, server):
    client.hello("s1")
    for seq in (0, 1, 5):
        client.frame("s1", seq)
        client.expect("estimate")
    assert server[0].counters.frames_lost == 3


def test_hello_without_resume_restarts_the_session(client):
    client.hello("s1")
    client.frame("s1", 7)
    client.expect("estimate")
    w = client.hello("s1", resume=False)
    assert w["resumed"] is False and w["last_seq"] == -1
    client.frame("s1", 0)  # numbering starts again
    assert client.expect("estimate")["seq"] == 0


def test_bye_closes_session(client, server):
    client.hello("s1")
    client.send(P.bye("s1"))
    wait_for(lambda: server[0].counters.sessions_closed == 1)
    client.frame("s1", 0)
    assert client.expect("error")["reason"] == "unknown_session"


def test_idle_session_expires(ctx):
    srv, pipe = make_server(idle_timeout_s=0.05, sweep_s=0.01)
    c = Client(ctx, srv.address)
    try:
        assert c.hello("s1")["session_timeout"] == 0.05
        wait_for(lambda: srv.counters.sessions_expired == 1)
        assert "s1" not in pipe.open
    finally:
        c.sock.close()
        srv.stop()


# --------------------------------------------------------------------------- rejections


def _raw(**fields) -> bytes:
    return msgpack.packb({"v": 1, **fields}, use_bin_type=True)


def _wire_joints(a: np.ndarray, dtype: str = "<f4") -> dict:
    return {"dtype": dtype, "shape": list(a.shape), "data": a.astype(dtype).tobytes()}


def _frame_raw(seq: int, joints: dict) -> bytes:
    return _raw(type="frame", session="s1", seq=seq, t=1.0, joints=joints)


INF = np.full(SHAPE, np.inf, np.float32)
BAD = {
    "malformed": b"\xc1\xc1 not msgpack",
    "bad_version": msgpack.packb({"v": 99, "type": "ping", "client_time": 1.0}),
    "unknown_type": _raw(type="teleport"),
    "non_finite": _frame_raw(0, _wire_joints(INF)),
    "bad_shape": _frame_raw(0, _wire_joints(np.zeros((21, 3), np.float32))),
    "bad_dtype": _frame_raw(0, _wire_joints(np.zeros(SHAPE), "<f8")),
    "too_large": b"\x00" * (P.MAX_MESSAGE_BYTES + 10),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_message_gets_error_and_is_counted(client, server, reason):
    client.hello("s1")
    client.send(BAD[reason])
    err = client.expect("error")
    assert err["reason"] == reason
    assert server[0].counters.rejected[reason] == 1
    client.frame("s1", 0)  # the session survives its own bad message
    assert client.expect("estimate")["seq"] == 0


def test_server_message_types_from_a_client_are_unknown_types(client, server):
    client.send(P.pong(1.0, 2.0))
    assert client.expect("error")["reason"] == "unknown_type"


def test_multipart_message_is_malformed(client, server):
    client.sock.send_multipart([b"a", b"b"])
    assert client.expect("error")["reason"] == "malformed"


@pytest.mark.parametrize("seqs, reason", [((5, 5), "duplicate"), ((5, 3), "out_of_order")])
def test_sequence_rules(client, server, seqs, reason):
    client.hello("s1")
    client.frame("s1", seqs[0])
    client.expect("estimate")
    client.frame("s1", seqs[1])
    err = client.expect("error")
    assert (err["reason"], err["seq"], err["session"]) == (reason, seqs[1], "s1")
    assert server[0].counters.rejected[reason] == 1
    assert server[0].sessions["s1"].counters.rejected[reason] == 1


def test_frame_for_unknown_session(client, server):
    client.frame("nobody", 0)
    err = client.expect("error")
    assert err["reason"] == "unknown_session" and err["seq"] is None
    assert server[0].counters.rejected["unknown_session"] == 1


@pytest.mark.parametrize("kw, reason", [({"layout": "penn13"}, "wrong_layout"),
                                        ({"reference": "juggle"}, "unknown_reference")])
def test_hello_refused(client, server, kw, reason):
    err = client.hello("s1", **kw)
    assert err["type"] == "error" and err["reason"] == reason
    assert server[0].counters.rejected[reason] == 1 and not server[0].sessions


def test_max_sessions(ctx):
    srv, _ = make_server(max_sessions=2)
    c = Client(ctx, srv.address)
    try:
        assert c.hello("a")["type"] == "welcome" and c.hello("b")["type"] == "welcome"
        err = c.hello("c")
        assert err["reason"] == "overloaded" and "max_sessions" in err["detail"]
        assert c.hello("a", resume=True)["type"] == "welcome"  # existing ones still may
    finally:
        c.sock.close()
        srv.stop()


def test_rate_limit_only_hits_the_flooding_session(ctx, server):
    srv = server[0]
    flood, calm = Client(ctx, srv.address), Client(ctx, srv.address)
    flood.hello("flood", fps=1.0)  # allowed 2 frames/s, burst of 8
    calm.hello("calm", fps=90.0)
    for seq in range(50):
        flood.frame("flood", seq)
    calm.frame("calm", 0)
    assert calm.expect("estimate")["seq"] == 0
    wait_for(lambda: srv.counters.messages_in >= 53)
    assert srv.counters.rejected["rate_limited"] >= 40
    assert srv.sessions["flood"].counters.frames_in <= 10
    assert srv.sessions["calm"].counters.rejected.total() == 0
    flood.sock.close()
    calm.sock.close()


def test_garbage_flood_does_not_crash_and_everything_is_counted(ctx, server):
    srv = server[0]
    rng = np.random.default_rng(0)
    bad, good = Client(ctx, srv.address), Client(ctx, srv.address)
    good.hello("good")
    n = 3000
    for i in range(n):
        bad.send(rng.bytes(int(rng.integers(0, 200))) if i % 2 else _raw(type=int(i)))
    good.frame("good", 0)
    assert good.expect("estimate")["seq"] == 0
    wait_for(lambda: srv.counters.messages_in >= n + 2)
    assert sum(srv.counters.rejected.values()) == n
    assert srv._thread.is_alive()
    bad.sock.close()
    good.sock.close()


# --------------------------------------------------------------------------- engine faults


def test_engine_error_drops_frames_but_server_survives(client, server):
    srv, pipe = server
    client.hello("s1")
    pipe.fail_next = True
    client.frame("s1", 0)
    wait_for(lambda: srv.counters.dropped["engine_error"] == 1)
    client.frame("s1", 1)
    assert client.expect("estimate")["seq"] == 1


def test_stalled_engine_frames_time_out_as_dropped(ctx):
    srv, pipe = make_server(in_flight_timeout_s=0.05, sweep_s=0.01)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        pipe.hold = True
        c.frame("s1", 0)
        wait_for(lambda: srv.counters.dropped["engine_timeout"] == 1)
        pipe.hold = False
        c.frame("s1", 1)
        assert c.expect("estimate")["seq"] == 1
    finally:
        c.sock.close()
        srv.stop()


def test_every_accepted_frame_is_answered_or_dropped(ctx, server):
    """The accounting invariant, with a client that vanishes while frames are in flight."""
    srv, pipe = server
    c = Client(ctx, srv.address)
    c.hello("s1")
    pipe.hold = True
    for seq in range(20):
        c.frame("s1", seq)
    wait_for(lambda: srv.counters.frames_in == 20)
    c.sock.close()
    pipe.hold = False
    # The server thread counts a frame's end just after taking it out of flight: wait for
    # the balance, not only for _in_flight == 0.
    wait_for(lambda: srv._in_flight == 0 and srv.counters.estimates_out
             + srv.counters.dropped.total() == 20)
    counters = srv.stats()["counters"]
    assert counters["estimates_out"] + counters["dropped"] == counters["frames_in"] == 20


def test_stop_returns_final_counters_and_report(ctx):
    srv, _ = make_server()
    c = Client(ctx, srv.address)
    c.hello("s1")
    c.frame("s1", 0)
    c.expect("estimate")
    final = srv.stop()
    c.sock.close()
    assert final["counters"]["frames_in"] == 1 and final["counters"]["estimates_out"] == 1
    assert final["latency"]["count"] == 1
    table = srv.report()
    assert "frames_in" in table and "latency.p99_us" in table


# --------------------------------------------------------------------------- pieces


def test_latency_histogram_percentiles_are_close_and_never_optimistic():
    h = LatencyHistogram()
    samples = np.random.default_rng(1).lognormal(mean=5, sigma=1, size=10_000)
    for s in samples:
        h.record(float(s))
    for q in (50, 99, 99.9):
        exact = float(np.percentile(samples, q))
        assert exact * 0.999 <= h.percentile(q) <= exact * 1.13
    assert h.summary()["count"] == 10_000
    empty = LatencyHistogram().to_wire()
    assert empty["p99_us"] is None and empty["buckets"] == []


def test_loopback_detection():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://10.0.0.2:1")


def test_non_loopback_bind_warns(caplog):
    srv = Server(FakePipeline(), ServerConfig(bind="tcp://0.0.0.0:0",
                                              pub_bind="tcp://127.0.0.1:0"))
    with caplog.at_level("WARNING", logger="masa_rt.server"):
        srv.start_in_thread()
        srv.stop()
    assert any("plain_mode" in r.getMessage() for r in caplog.records)


def test_serving_path_does_not_import_torch():
    code = "import sys, engine.server, engine.watch; assert 'torch' not in sys.modules"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------- issue #7 gaps


def test_sessions_per_client_are_limited_and_freed_by_bye_and_expiry(ctx):
    """Plain mode: the client is its connection; 'too_many_sessions' past the limit."""
    srv, _ = make_server(max_sessions_per_client=2, idle_timeout_s=1.0, sweep_s=0.01)
    c, d = Client(ctx, srv.address), Client(ctx, srv.address)
    try:
        assert c.hello("a")["type"] == "welcome" and c.hello("b")["type"] == "welcome"
        err = c.hello("c")
        assert err["reason"] == "too_many_sessions" and err["seq"] is None
        assert "max_sessions_per_client=2" in err["detail"] and "c" not in srv.sessions
        assert c.hello("a")["resumed"] is False  # restarting its own takes no new slot
        assert d.hello("c")["type"] == "welcome"  # another client has its own quota
        assert d.hello("a", resume=True)["resumed"] is True  # plain: a reconnect takes it
        assert c.hello("c2")["type"] == "welcome"  # ... and frees c's slot
        assert d.hello("d2")["reason"] == "too_many_sessions"  # d holds c and a
        d.send(P.bye("a"))
        assert d.hello("d2")["type"] == "welcome"  # a bye frees a slot
        assert srv.counters.rejected["too_many_sessions"] == 2
        wait_for(lambda: srv.counters.sessions_expired == 4)  # all four go silent
        assert c.hello("x")["type"] == "welcome" and c.hello("y")["type"] == "welcome"
        assert sorted(srv._owned.values()) == [2]  # expired sessions gave their slots back
    finally:
        for x in (c, d):
            x.sock.close()
        srv.stop()


def test_plain_mode_any_connection_may_feed_and_close_a_session(ctx, client, server):
    """Today's rule without CURVE (nobody is authenticated): documented, kept."""
    client.hello("s1")
    other = Client(ctx, server[0].address)
    other.frame("s1", 0)
    assert other.expect("estimate")["seq"] == 0
    other.send(P.bye("s1"))
    wait_for(lambda: server[0].counters.sessions_closed == 1)
    other.sock.close()


def _record_submits(pipe: FakePipeline) -> list[int]:
    """The seqs the server hands to the engine, in order (the pipeline still runs them)."""
    submitted: list[int] = []
    submit = pipe.submit
    pipe.submit = lambda sid, seq, t, j: submitted.append(seq) or submit(sid, seq, t, j)
    return submitted


def test_stale_frames_are_dropped_before_the_engine_computes_them(ctx):
    """Frames that waited past in_flight_timeout_s are never handed to the engine."""
    srv, pipe = make_server(engine_depth=1, in_flight_timeout_s=0.2, sweep_s=100.0)
    submitted = _record_submits(pipe)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        pipe.hold = True  # a stalled engine: frame 0 is in it, 1..3 wait in the server
        for seq in range(4):
            c.frame("s1", seq)
        wait_for(lambda: srv.counters.frames_in == 4)
        time.sleep(0.3)  # past the deadline (the sweep is off: _feed must drop them)
        pipe.hold = False
        assert c.expect("estimate")["seq"] == 0  # already in the engine: answered
        wait_for(lambda: srv.counters.dropped["stale"] == 3)
        c.frame("s1", 4)
        assert c.expect("estimate")["seq"] == 4
        assert submitted == [0, 4]  # 1..3 never reached the engine
        wait_for(lambda: srv.counters.estimates_out == 2)  # counted just after the send
        counters = srv.stats()["counters"]
        assert counters["estimates_out"] + counters["dropped"] == counters["frames_in"] == 5
        assert counters["dropped.stale"] == 3
    finally:
        c.sock.close()
        srv.stop()


def test_stalled_engine_waiting_frames_are_swept_as_stale(ctx):
    """With the engine stuck, the sweep drops the waiting frames ('stale') and the one
    in the engine ('engine_timeout'): every frame accounted for, none computed late."""
    srv, pipe = make_server(engine_depth=1, in_flight_timeout_s=0.05, sweep_s=0.01)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        pipe.hold = True
        for seq in range(10):
            c.frame("s1", seq)
        wait_for(lambda: srv._in_flight == 0 and srv.counters.frames_in == 10)
        # A timed-out frame frees its engine place for the next one that is still fresh;
        # the others went stale waiting and never reached the engine.
        in_engine = [q for _s, q, _t in pipe.queue]
        assert in_engine[0] == 0 and in_engine == sorted(in_engine)
        dropped = srv.counters.dropped
        assert dropped["engine_timeout"] == len(in_engine) and dropped["stale"] > 0
        assert dropped.total() == 10
    finally:
        c.sock.close()
        srv.stop()


@pytest.fixture
def keydir(tmp_path):
    d = tmp_path / "keys"
    create_keypair(d, "server", server=True)
    for name in ("alice", "bob"):
        create_keypair(d, name)
    return d


def test_secure_sessions_are_bound_to_the_client_key(ctx, keydir):
    """--secure: only alice's key may feed, resume, restart, close or query her session."""
    srv, pipe = make_server(keydir=str(keydir))
    alice_keys, bob_keys = (load_client_keys(keydir, n) for n in ("alice", "bob"))
    alice, bob = Client(ctx, srv.address, alice_keys), Client(ctx, srv.address, bob_keys)
    try:
        assert alice.hello("s1")["type"] == "welcome"
        alice.frame("s1", 0)
        assert alice.expect("estimate")["seq"] == 0
        bob.frame("s1", 5)
        err = bob.expect("error")
        assert (err["reason"], err["seq"], err["session"]) == ("session_owner", 5, "s1")
        for resume in (True, False):
            err = bob.hello("s1", resume=resume)
            assert err["reason"] == "session_owner" and err["seq"] is None
        bob.send(P.stats("s1"))
        assert bob.expect("error")["reason"] == "session_owner"
        bob.send(P.bye("s1"))
        assert bob.expect("error")["reason"] == "session_owner"
        # Nothing of that touched the session: same state, seq 1 is next, answers to alice.
        assert srv.sessions["s1"].last_seq == 0 and srv.counters.sessions_closed == 0
        alice.frame("s1", 1)
        assert alice.expect("estimate")["seq"] == 1
        assert srv.counters.rejected["session_owner"] == 5
        assert srv.sessions["s1"].counters.rejected["session_owner"] == 5
        assert srv.sessions["s1"].owner == alice_keys.public
        # Alice on a new connection (same key) resumes; bob has sessions of his own.
        again = Client(ctx, srv.address, alice_keys)
        assert again.hello("s1", resume=True)["last_seq"] == 1
        again.sock.close()
        assert bob.hello("s2")["type"] == "welcome"
        bob.frame("s2", 0)
        assert bob.expect("estimate")["seq"] == 0
    finally:
        for x in (alice, bob):
            x.sock.close()
        srv.stop()


def test_secure_session_limit_counts_per_key_not_per_connection(ctx, keydir):
    srv, _ = make_server(keydir=str(keydir), max_sessions_per_client=2)
    alice_keys = load_client_keys(keydir, "alice")
    conns = [Client(ctx, srv.address, alice_keys) for _ in range(3)]
    bob = Client(ctx, srv.address, load_client_keys(keydir, "bob"))
    try:
        assert conns[0].hello("a1")["type"] == "welcome"
        assert conns[1].hello("a2")["type"] == "welcome"
        assert conns[2].hello("a3")["reason"] == "too_many_sessions"  # same key, new link
        assert bob.hello("b1")["type"] == "welcome"
    finally:
        for x in (*conns, bob):
            x.sock.close()
        srv.stop()


def test_transit_delay_is_lag_above_a_windowed_minimum():
    from engine.server import TransitDelay

    d = TransitDelay(window_s=10.0, now=0.0)
    assert d.queued_for(5.0, now=0.0) == 0.0  # the first frame sets the baseline
    assert d.queued_for(5.5, now=1.0) == pytest.approx(0.5)  # waited half a second
    assert d.queued_for(4.0, now=2.0) == 0.0  # a faster transit lowers the baseline
    assert d.queued_for(9.0, now=11.0) == pytest.approx(5.0)  # previous window still counts
    # A client clock that jumped forward by 5 s reads as queued for at most two windows.
    assert d.queued_for(9.0, now=21.0) == 0.0


def test_frames_that_queued_on_the_way_are_shed_before_the_engine(ctx):
    """A frame whose capture->receipt delay is max_queue_delay_s above the session's usual
    one waited in a queue (libzmq, OS): refused as 'overloaded' with its seq, counted in
    queued_too_long, never computed; a fresh frame after it is answered."""
    srv, pipe = make_server(max_queue_delay_s=0.5)
    submitted = _record_submits(pipe)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        t0 = time.perf_counter()
        c.frame("s1", 0, t=t0)
        assert c.expect("estimate")["seq"] == 0
        time.sleep(0.8)
        c.frame("s1", 1, t=t0 + 0.01)  # captured just after frame 0, arrives 0.8 s late
        err = c.expect("error")
        assert (err["reason"], err["seq"]) == ("overloaded", 1) and "queued" in err["detail"]
        c.frame("s1", 2)
        assert c.expect("estimate")["seq"] == 2
        counters = srv.stats()["counters"]
        assert counters["queued_too_long"] == 1 == counters["rejected.overloaded"]
        assert submitted == [0, 2]
    finally:
        c.sock.close()
        srv.stop()


def test_frames_still_queued_at_shutdown_are_counted(ctx):
    """Stopping never loses a frame silently: what waits for the engine, or still sits in
    libzmq's queue, is counted as dropped 'shutdown'."""
    srv, pipe = make_server(engine_depth=1, in_flight_timeout_s=60.0, sweep_s=100.0)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        pipe.hold = True  # the engine answers nothing: frames wait in the server
        for seq in range(5):
            c.frame("s1", seq)
        wait_for(lambda: srv.counters.frames_in == 5)
        final = srv.stop()["counters"]
    finally:
        c.sock.close()
    assert final["dropped.shutdown"] == 5 == final["frames_in"]
    assert final["estimates_out"] == 0


def test_transit_baseline_holds_while_the_server_is_backlogged():
    from engine.server import TransitDelay

    d = TransitDelay(window_s=10.0, now=0.0)
    d.queued_for(1.0, now=0.0)
    # A standing 3 s queue for three windows: without rotation it stays 3 s late.
    for now in (11.0, 21.0, 31.0):
        assert d.queued_for(4.0, now=now, rotate=False) == pytest.approx(3.0)
    assert d.queued_for(4.0, now=41.0) == pytest.approx(3.0)  # rotates: previous = 1.0
    assert d.queued_for(4.0, now=52.0) == 0.0  # two windows later the new level is normal


def test_a_shed_frame_does_not_move_the_session_seq(ctx):
    """A frame refused on arrival was never validated: its seq (here absurdly high) must not
    make the session's next frames 'out_of_order'; the seqs it skipped are not 'lost'."""
    srv, _pipe = make_server(max_queue_delay_s=0.5)
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        t0 = time.perf_counter()
        c.frame("s1", 0, t=t0)
        c.expect("estimate")
        time.sleep(0.8)
        c.frame("s1", 1 << 40, t=t0 + 0.01)  # arrives 0.8 s late: shed
        assert c.expect("error")["reason"] == "overloaded"
        c.frame("s1", 1)
        assert c.expect("estimate")["seq"] == 1
        assert srv.stats()["counters"]["frames_lost"] == 0
    finally:
        c.sock.close()
        srv.stop()


# --------------------------------------------------------------------------- seq and time


def test_capture_time_must_increase(ctx):
    """A frame whose t is not after the last accepted frame's is 'out_of_order' with its seq
    (the resampler would otherwise drop it unanswered); the session streams on."""
    srv, _pipe = make_server()
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        c.frame("s1", 0, t=10.0)
        assert c.expect("estimate")["seq"] == 0
        for seq, t in ((1, 10.0), (2, 9.5)):
            c.frame("s1", seq, t=t)
            err = c.expect("error")
            assert (err["reason"], err["seq"]) == ("out_of_order", seq)
            assert "capture time" in err["detail"]
        c.frame("s1", 3, t=10.1)
        assert c.expect("estimate")["seq"] == 3
        counters = srv.stats()["counters"]
        assert counters["rejected.out_of_order"] == 2 and counters["frames_in"] == 2
        assert counters["frames_lost"] == 0  # seq 1 and 2 arrived: refused, not lost
    finally:
        c.sock.close()
        srv.stop()


def test_a_seq_jump_is_counted_once_and_stats_survive(ctx):
    """Seq gaps wider than max_seq_gap are a renumbering, not lost frames: summed as lost,
    three jumps to 2**63 - 1 overflowed the 64-bit counters and broke every 'stats'."""
    srv, _pipe = make_server()
    c = Client(ctx, srv.address)
    try:
        for i in range(3):
            c.hello("s1")  # restart: last_seq -1
            c.frame("s1", 0, t=10.0 * i + 1.0)
            c.expect("estimate")
            c.frame("s1", P.MAX_SEQ, t=10.0 * i + 2.0)
            assert c.expect("estimate")["seq"] == P.MAX_SEQ
        c.frame("s1", 0, t=100.0)  # below last_seq: refused, nothing moves
        assert c.expect("error")["reason"] == "out_of_order"
        c.send(P.stats())
        reply = c.expect("stats_reply")
        assert reply["counters"]["seq_jumps"] == 3 and reply["counters"]["frames_lost"] == 0
    finally:
        c.sock.close()
        srv.stop()


def test_an_idle_server_is_not_backlogged(ctx):
    """Frames are shed on arrival, and the transit-delay window held, only while the
    previous drain left messages queued; a quiet session never sees that path (the flag
    used to be True for every message, so one client clock step made frames stale for
    good)."""
    srv, _pipe = make_server()
    seen: list[bool] = []
    handle = srv._handle

    def spy(*args, **kw):
        seen.append(srv._backlogged)
        return handle(*args, **kw)

    srv._handle = spy
    c = Client(ctx, srv.address)
    try:
        c.hello("s1")
        for seq in range(5):
            c.frame("s1", seq)
            c.expect("estimate")
        assert len(seen) == 6 and not any(seen)
    finally:
        c.sock.close()
        srv.stop()


def test_the_shed_path_leaves_bad_headers_to_validation():
    """Under backlog a frame is judged from its header; a seq above MAX_SEQ or a stamp not
    after the last accepted one must take the normal path and get its own reason."""
    srv = Server(FakePipeline(), ServerConfig())
    from engine.server import Peer, Session, TokenBucket

    s = Session(id="s1", identity=b"a", owner=b"a", layout="h2o_hands", fps=30.0,
                shape=SHAPE, bucket=TokenBucket(60.0, 60.0, 0.0), last_seen=0.0,
                last_seq=3, last_t=5.0)
    srv.sessions["s1"] = s
    peer = Peer(b"a", b"a")
    frame = {"type": "frame", "session": "s1"}
    for seq, t in ((P.MAX_SEQ + 1, 6.0), (4, 5.0), (4, 4.0), (3, 6.0)):
        assert srv._shed_on_arrival(peer, {**frame, "seq": seq, "t": t}, 100.0) is False
    assert s.lag is None and s.refused_seq == -1  # nothing recorded for them


# --------------------------------------------------------------------------- logging


def test_log_limiter_counts_what_it_holds_back(caplog):
    import logging

    from engine.counters import LogLimiter

    now = [0.0]
    logger = logging.getLogger("test.limiter")
    limiter = LogLimiter(logger, burst=3, period_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.limiter"):
        for i in range(50):
            limiter.log(logging.INFO, "hello", "event=hello n=%d", i)
        limiter.log(logging.INFO, "other", "event=other")  # its own budget
        now[0] = 10.0
        limiter.log(logging.INFO, "hello", "event=hello n=%d", 50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["event=hello n=0", "event=hello n=1", "event=hello n=2", "event=other",
                     "event=hello suppressed=47 over=10s", "event=hello n=50"]


def test_rejections_are_summarised_at_info(ctx, caplog):
    """Each rejection logs at DEBUG; the server adds one INFO line per log_summary_s with
    the counts by reason, so a flood of bad messages shows without one line each."""
    import logging

    srv, _pipe = make_server(log_summary_s=0.2, sweep_s=0.05)
    c = Client(ctx, srv.address)
    try:
        with caplog.at_level(logging.INFO, logger="masa_rt.server"):
            for _ in range(5):
                c.send(b"\x00 not msgpack")
                assert c.expect("error")["reason"] == "malformed"
            c.send(P.frame("nobody", 0, 1.0, np.zeros(SHAPE, np.float32)))
            assert c.expect("error")["reason"] == "unknown_session"
            wait_for(lambda: any("rejected_summary" in r.getMessage() for r in caplog.records))
        (line,) = [r.getMessage() for r in caplog.records if "rejected_summary" in r.getMessage()]
        assert "total=6 malformed=5 unknown_session=1" in line
    finally:
        c.sock.close()
        srv.stop()


def test_an_error_reply_that_cannot_be_sent_is_counted():
    """A rejection is counted whether or not its reply gets out; one that does not (the
    peer's pipe full, the peer gone) is counted again in replies_unsent, never silent."""
    srv = Server(FakePipeline(), ServerConfig(bind="tcp://127.0.0.1:0",
                                              pub_bind="tcp://127.0.0.1:0"))
    srv._send = lambda ident, data: "send_hwm"  # as a full pipe answers
    srv._reject(b"peer", "malformed", "not msgpack")
    srv._send = lambda ident, data: None  # sent
    srv._reject(b"peer", "malformed", "not msgpack")
    assert srv.counters.rejected["malformed"] == 2 and srv.counters.replies_unsent == 1
    assert srv.counters.flat()["replies_unsent"] == 1  # in the stats reply

"""Who gets which answer (docs/protocol.md, "Sockets"), with real sockets and two or more
connections: an estimate goes to the connection that sent its frame; under --secure a key
reads only its own sessions' estimates on the PUB socket (operators read all); hellos are
rate-limited per client; frames refused while decoding are not counted as lost; the auth
counters are in ``stats``."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from fake_pipeline import SHAPE, FakePipeline

from clients import EstimateInlet, PoseOutlet, local_clock
from engine.security import create_keypair, load_client_keys
from engine.server import Server, ServerConfig
from masa_rt import protocol as P

JOINTS = np.zeros(SHAPE, np.float32)


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def answers(sock: zmq.Socket, n: int, timeout: float = 5.0) -> list[dict]:
    """The next ``n`` messages on ``sock`` (fewer if ``timeout`` passes first)."""
    out, end = [], time.monotonic() + timeout
    while len(out) < n and sock.poll(max(1, int((end - time.monotonic()) * 1000))):
        out.append(P.decode(sock.recv()))
    return out


@pytest.fixture
def plain():
    pipe = FakePipeline()
    server = Server(pipe, ServerConfig(bind="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0"))
    server.start_in_thread()
    ctx = zmq.Context()
    yield server, pipe, ctx
    server.stop()
    ctx.destroy(linger=0)


def test_answers_go_to_the_connection_that_sent_the_frame(plain):
    """A plain-mode peer that resumes a session while its frames are in flight does not
    get their answers: the headset that sent them does (issue 31)."""
    server, pipe, ctx = plain
    headset, other = dealer(ctx, server.address), dealer(ctx, server.address)
    headset.send(P.encode(P.hello("s", "h2o_hands", 30.0, 0.0)))
    assert answers(headset, 1)[0]["type"] == "welcome"
    pipe.hold = True  # the engine stalls: three frames stay in flight
    for seq in range(3):
        headset.send(P.encode(P.frame("s", seq, 1.0 + seq / 30, JOINTS)))
    end = time.monotonic() + 5.0
    while len(server.sessions["s"].in_flight) < 3:
        assert time.monotonic() < end
        time.sleep(0.01)
    other.send(P.encode(P.hello("s", "h2o_hands", 30.0, 0.0, resume=True)))
    welcome = answers(other, 1)[0]
    assert welcome["type"] == "welcome" and welcome["resumed"] and welcome["last_seq"] == 2
    pipe.hold = False
    got = answers(headset, 3)
    assert [(m["type"], m["seq"]) for m in got] == [("estimate", q) for q in range(3)]
    assert answers(other, 1, timeout=0.3) == []


def test_answers_follow_a_headset_that_reconnected(plain):
    """The sender's connection is gone: the in-flight answers go to the session's new one."""
    server, pipe, ctx = plain
    old = dealer(ctx, server.address)
    old.send(P.encode(P.hello("s", "h2o_hands", 30.0, 0.0)))
    assert answers(old, 1)[0]["type"] == "welcome"
    pipe.hold = True
    old.send(P.encode(P.frame("s", 0, 1.0, JOINTS)))
    end = time.monotonic() + 5.0
    while not server.sessions["s"].in_flight:
        assert time.monotonic() < end
        time.sleep(0.01)
    old.close()
    time.sleep(0.2)  # libzmq notices the closed connection
    new = dealer(ctx, server.address)
    new.send(P.encode(P.hello("s", "h2o_hands", 30.0, 0.0, resume=True)))
    assert answers(new, 1)[0]["resumed"]
    pipe.hold = False
    got = answers(new, 1)
    assert [(m["type"], m["seq"]) for m in got] == [("estimate", 0)]


def test_frames_refused_while_decoding_are_not_lost(plain):
    """seq 1 (a bad dtype) and seq 2 (inf joints) arrived and were refused: 0 lost."""
    server, _pipe, ctx = plain
    sock = dealer(ctx, server.address)
    sock.send(P.encode(P.hello("s", "h2o_hands", 30.0, 0.0)))
    answers(sock, 1)
    inf = JOINTS.copy()
    inf[0, 0] = np.inf
    frame = {"v": 1, "type": "frame", "session": "s"}
    for seq, joints in ((1, {"dtype": "<i4", "shape": list(SHAPE),
                             "data": np.zeros(SHAPE, "<i4").tobytes()}),
                        (2, {"dtype": "<f4", "shape": list(SHAPE), "data": inf.tobytes()})):
        sock.send(msgpack.packb({**frame, "seq": seq, "t": 1.0 + seq / 30, "joints": joints}))
    sock.send(P.encode(P.frame("s", 0, 1.0, JOINTS)))
    sock.send(P.encode(P.frame("s", 3, 1.1, JOINTS)))
    got = answers(sock, 4)
    kinds = sorted(m.get("reason", m["type"]) for m in got)
    assert kinds == ["bad_dtype", "estimate", "estimate", "non_finite"]
    sock.send(P.encode(P.stats("s")))
    counters = answers(sock, 1)[0]["counters"]
    assert counters["frames_lost"] == 0 and counters["frames_in"] == 2


def test_hellos_are_rate_limited_per_client(plain):
    server, _pipe, ctx = plain
    burst = int(server.config.hello_burst)
    churner, headset = dealer(ctx, server.address), dealer(ctx, server.address)
    for k in range(burst + 5):
        churner.send(P.encode(P.hello(f"c{k}", "h2o_hands", 30.0, 0.0)))
        churner.send(P.encode(P.bye(f"c{k}")))
    got = answers(churner, burst + 10)
    kinds = [m.get("reason", m["type"]) for m in got]
    assert kinds.count("welcome") <= burst + 1 and kinds.count("rate_limited") >= 4
    headset.send(P.encode(P.hello("h", "h2o_hands", 30.0, 0.0)))  # another client: its own
    assert answers(headset, 1)[0]["type"] == "welcome"
    assert server.stats()["counters"]["rejected.rate_limited"] >= 4


# ---------------------------------------------------------------------- --secure tenants


@pytest.fixture
def secure(tmp_path: Path):
    keydir = tmp_path / "keys"
    create_keypair(keydir, "server", server=True)
    for name in ("alice", "bob"):
        create_keypair(keydir, name)
    create_keypair(keydir, "ops", operator=True)
    server = Server(FakePipeline(), ServerConfig(bind="tcp://127.0.0.1:0",
                                                 pub_bind="tcp://127.0.0.1:0",
                                                 keydir=str(keydir)))
    server.start_in_thread()
    yield server, keydir
    server.stop()


def _sneaky_sub(ctx: zmq.Context, address: str, keys, topic: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey = keys.server_public, keys.public
    sock.curve_secretkey = keys.secret
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(address)
    return sock


def test_under_secure_a_key_reads_only_its_own_estimates(secure):
    server, keydir = secure
    alice, bob, ops = (load_client_keys(keydir, n) for n in ("alice", "bob", "ops"))
    ctx = zmq.Context()
    pub = server.pub_address
    try:
        with PoseOutlet(server.address, session="a1", curve=alice) as a_out, \
                PoseOutlet(server.address, session="b1", curve=bob) as b_out, \
                EstimateInlet(pub, curve=alice, context=ctx) as a_in, \
                EstimateInlet(pub, curve=bob, context=ctx) as b_in, \
                EstimateInlet(pub, curve=ops, operator=True, context=ctx) as ops_in:
            # bob, by hand: every session, and alice's prefix
            sneaky = [_sneaky_sub(ctx, pub, bob, b""),
                      _sneaky_sub(ctx, pub, bob, alice.public + b"/")]
            seen = {"alice": set(), "bob": set(), "ops": set()}
            end = local_clock() + 10.0
            while not (seen["alice"] and seen["bob"] and seen["ops"] >= {"a1", "b1"}):
                assert local_clock() < end, f"estimates did not flow: {seen}"
                a_out.push(JOINTS)
                b_out.push(JOINTS)
                a_out.pull(0.0)
                b_out.pull(0.0)
                for name, inlet in (("alice", a_in), ("bob", b_in), ("ops", ops_in)):
                    seen[name] |= {e.session for e in [inlet.pull(0.02)] if e is not None}
            assert seen["alice"] == {"a1"} and seen["bob"] == {"b1"}
            assert not any(s.poll(200) for s in sneaky)  # nothing of alice's reached bob
            counters = server.stats()["counters"]
            assert counters["auth.subscriptions_denied"] == 2
            assert counters["auth.subscriptions_allowed"] == 3
            assert counters["auth.allowed"] >= 5 and counters["auth.denied"] == 0
            for s in sneaky:
                s.close()
    finally:
        ctx.destroy(linger=0)


def test_watch_connects_to_a_secure_server_with_its_key(secure, capsys):
    from masa_rt.cli import main

    server, keydir = secure
    assert main(["watch", "--address", server.pub_address, "--duration", "1", "--secure",
                 str(keydir), "--key", "ops", "--operator"]) == 0
    assert main(["watch", "--address", server.pub_address, "--duration", "0.3", "--secure",
                 str(keydir), "--key", "nobody"]) == 2
    assert "nobody.key_secret not found" in capsys.readouterr().err
    counters = server.stats()["counters"]
    assert counters["auth.subscriptions_allowed"] >= 1

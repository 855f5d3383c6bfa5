"""Client library against a fake server on loopback: real sockets, deadlines, no sleeps."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
from fake_server import FakeServer

from clients import (
    ConnectionLost,
    EstimateInlet,
    MasaClientError,
    PoseOutlet,
    ServerError,
    local_clock,
)
from clients.clock import ClockOffset
from clients.export_raw import read_raw
from clients.replay import replay
from masa_rt import protocol as P
from masa_rt.cli import main

SHAPE = (42, 3)


def _pose(value: float) -> np.ndarray:
    joints = np.full(SHAPE, value, dtype=np.float32)
    joints[5] = np.nan  # a lost joint travels as NaN
    return joints


def _pull_until(outlet_or_inlet, deadline_s: float = 5.0):
    """Pull until something arrives or the deadline passes (then fail)."""
    end = local_clock() + deadline_s
    while local_clock() < end:
        est = outlet_or_inlet.pull(timeout=0.05)
        if est is not None:
            return est
    pytest.fail("nothing arrived before the deadline")


def _wait(cond, deadline_s: float = 5.0, outlet: PoseOutlet | None = None) -> None:
    end = local_clock() + deadline_s
    while not cond():
        assert local_clock() < end, "condition not met before the deadline"
        if outlet is not None:
            outlet.pull(timeout=0.02)


def test_open_push_pull_round_trip():
    with FakeServer() as server:
        with PoseOutlet(server.address, fps=60.0) as outlet:
            assert outlet.welcome["shape"] == list(SHAPE)
            assert [h["resume"] for h in server.hellos] == [False]
            stamp = local_clock()
            assert outlet.push(_pose(0.25), stamp=stamp) == 0
            est = _pull_until(outlet)
            assert (est.seq, est.session, est.t_capture) == (0, outlet.session, stamp)
            assert est.progress == pytest.approx(0.25)
            assert 0.0 <= est.latency < 5.0
            frame = server.frames[0]
            assert frame["joints"].shape == SHAPE and frame["joints"].dtype == np.float32
            np.testing.assert_array_equal(frame["joints"], _pose(0.25))
        _wait(lambda: server.byes == [outlet.session])  # the bye is on its way: wait for it


def test_pull_timeout_returns_none_and_seq_increments():
    with FakeServer(answer_frames=False) as server, PoseOutlet(server.address) as outlet:
        assert outlet.pull(timeout=0.05) is None
        seqs = [outlet.push(_pose(i)) for i in range(5)]
        assert seqs == list(range(5))
        _wait(lambda: len(server.frames) == 5)
        assert [f["seq"] for f in server.frames] == seqs


def test_wrong_shape_is_a_local_error():
    with FakeServer() as server, PoseOutlet(server.address) as outlet:
        with pytest.raises(ValueError, match="shape"):
            outlet.push(np.zeros((21, 3), np.float32))


def test_bad_stamps_and_inf_are_local_errors_that_use_no_seq():
    """The server refuses a capture time that does not increase, and then every frame
    stamped before it: the outlet refuses it first, and a refused frame takes no seq."""
    with FakeServer(answer_frames=False) as server, PoseOutlet(server.address) as outlet:
        t = local_clock()
        assert outlet.push(_pose(0.0), stamp=t) == 0
        for bad in (t, t - 1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="not finite or not after"):
                outlet.push(_pose(0.0), stamp=bad)
        pose = _pose(0.0)
        pose[0, 0] = np.inf
        with pytest.raises(P.ProtocolError, match="inf"):
            outlet.push(pose)
        assert outlet.push(_pose(0.0)) == 1  # default stamp: now, after t
        _wait(lambda: len(server.frames) == 2)
        assert [f["seq"] for f in server.frames] == [0, 1]


def test_a_failed_open_leaves_no_socket():
    outlet = PoseOutlet("nonsense")
    with pytest.raises(ValueError, match="cannot connect"):
        outlet.open(timeout=0.1)
    assert outlet._sock is None and outlet._monitor is None


def test_push_before_open_raises():
    with pytest.raises(MasaClientError, match="not open"):
        PoseOutlet("tcp://127.0.0.1:1").push(_pose(0.0))


def test_refused_session_raises_server_error():
    with FakeServer(refuse="unknown_reference") as server:
        outlet = PoseOutlet(server.address, reference="no_such_activity")
        with pytest.raises(ServerError) as info:
            outlet.open(timeout=5.0)
        assert info.value.reason == "unknown_reference"


def test_no_server_raises_connection_lost():
    server = FakeServer()
    address = server.address
    server.stop()  # the port is free again: nobody listens there
    with pytest.raises(ConnectionLost):
        PoseOutlet(address).open(timeout=0.3)


def test_server_gone_raises_connection_lost_and_drops_locally():
    server = FakeServer().__enter__()
    outlet = PoseOutlet(server.address, lost_after=0.3).__enter__()
    server.stop()
    with pytest.raises(ConnectionLost):
        outlet.pull(timeout=5.0)
    _wait(lambda: not outlet.connected)
    assert outlet.push(_pose(0.0)) is None
    assert outlet.dropped["disconnected"] == 1
    outlet.close()


def test_reconnect_resumes_session_after_server_restart():
    first = FakeServer().__enter__()
    outlet = PoseOutlet(first.address, lost_after=10.0).__enter__()
    outlet.push(_pose(0.1))
    _pull_until(outlet)
    first.stop()
    _wait(lambda: not outlet.connected)
    with FakeServer(port=first.port) as second:
        # ZeroMQ reconnects by itself; the outlet then says hello again with resume=True.
        _wait(lambda: len(second.hellos) == 1, outlet=outlet)
        assert second.hellos[0]["resume"] and second.hellos[0]["session"] == outlet.session
        _wait(lambda: outlet.welcome["server_time"] > 0 and outlet.connected, outlet=outlet)
        seq = outlet.push(_pose(0.2))
        est = _pull_until(outlet)
        assert est.seq == seq == 1  # the sequence continues across the restart
    outlet.close()


def test_resume_hello_that_cannot_be_queued_is_sent_again():
    first = FakeServer().__enter__()
    outlet = PoseOutlet(first.address, lost_after=10.0).__enter__()
    first.stop()
    _wait(lambda: not outlet.connected)
    real_send, refused = outlet._try_send, []

    def send_refusing_first_hello(msg):  # as when the link is not writable yet
        if not refused and isinstance(msg, dict) and msg["type"] == "hello":
            refused.append(msg)
            return False
        return real_send(msg)

    outlet._try_send = send_refusing_first_hello
    with FakeServer(port=first.port) as second:
        _wait(lambda: len(second.hellos) == 1, outlet=outlet)
        assert len(refused) == 1 and second.hellos[0]["resume"]
        seq = outlet.push(_pose(0.2))
        assert _pull_until(outlet).seq == seq
    outlet.close()


def test_restarted_headset_resumes_after_servers_last_seq():
    with FakeServer() as server:
        first = PoseOutlet(server.address, session="headset-1").__enter__()
        for i in range(3):
            first.push(_pose(i))
        _wait(lambda: len(server.frames) == 3)
        first._sock.close(linger=0)  # killed mid-stream: no bye
        again = PoseOutlet(server.address, session="headset-1")
        welcome = again.open(resume=True)
        assert (welcome["resumed"], welcome["last_seq"]) == (True, 2)
        assert again.push(_pose(3)) == 3  # continues after the last accepted frame
        assert _pull_until(again).seq == 3
        again.close()


def test_duplicate_and_out_of_order_are_counted_not_raised():
    with FakeServer() as server, PoseOutlet(server.address) as outlet:
        outlet.push(_pose(0.0))
        outlet.push(_pose(0.0))
        outlet._next_seq = 1  # replay seq 1 (duplicate) then seq 0 (out of order)
        outlet.push(_pose(0.0))
        outlet._next_seq = 0
        outlet.push(_pose(0.0))
        _wait(lambda: sum(outlet.rejected.values()) == 2, outlet=outlet)
        assert outlet.rejected == {"duplicate": 1, "out_of_order": 1}


def test_estimates_beyond_the_unread_queue_are_counted():
    """Estimates queued while the caller waits for something else (here: stats) are kept
    up to the queue's bound; what falls off is counted, not lost silently."""
    with FakeServer() as server, PoseOutlet(server.address) as outlet:
        outlet._pending = deque(maxlen=2)
        for _ in range(5):
            outlet.push(_pose(0.5))
        _wait(lambda: len(server.frames) == 5)
        outlet.stats(timeout=5.0)  # its reply comes after the five answers (one pipe, FIFO)
        assert outlet.estimates_discarded == 3 and len(outlet._pending) == 2


def test_time_correction_recovers_server_offset():
    with FakeServer(clock_offset=123.5) as server, PoseOutlet(server.address) as outlet:
        offset = outlet.time_correction(timeout=5.0, probes=8)
        assert abs(offset - 123.5) <= outlet.clock.uncertainty + 1e-6
        assert len(outlet.clock) >= 1


def test_clock_offset_prefers_smallest_round_trip():
    clock = ClockOffset(window=4)
    clock.add(0.0, 10.5, 1.0)  # rtt 1.0 -> offset 10.0
    clock.add(2.0, 12.1, 2.2)  # rtt 0.2 -> offset 10.0
    clock.add(3.0, 13.9, 3.1)  # rtt 0.1 -> offset 10.85: the best probe wins
    assert clock.offset == pytest.approx(10.85)
    assert clock.uncertainty == pytest.approx(0.05)
    clock.add(5.0, 0.0, 4.0)  # negative rtt: ignored
    assert len(clock) == 3


def test_stats_request():
    with FakeServer() as server, PoseOutlet(server.address) as outlet:
        outlet.push(_pose(0.0))
        reply = outlet.stats(timeout=5.0)
        assert reply["counters"]["frames_in"] >= 0 and reply["session"] == outlet.session


def test_inlet_filters_by_exact_session():
    with FakeServer() as server:
        a, ab = PoseOutlet(server.address, session="a"), PoseOutlet(server.address, session="ab")
        with a, ab, EstimateInlet(server.pub_address, session="a") as inlet, \
                EstimateInlet(server.pub_address) as everything:
            # PUB/SUB joins late: push until both subscriptions are live.
            end = local_clock() + 5.0
            while inlet.pull(timeout=0.02) is None or everything.pull(timeout=0.02) is None:
                assert local_clock() < end, "subscription never became live"
                a.push(_pose(0.5))
            ab_seqs = [ab.push(_pose(0.7)) for _ in range(3)]
            last_a = a.push(_pose(0.5))
            seen, end = [], local_clock() + 5.0
            while not seen or (seen[-1].session, seen[-1].seq) != ("a", last_a):
                assert local_clock() < end, "last estimate never arrived"
                seen += [e for e in [inlet.pull(timeout=0.05)] if e is not None]
            assert {e.session for e in seen} == {"a"}  # no "ab" through prefix matching
            got_ab, end = set(), local_clock() + 5.0
            while got_ab != set(ab_seqs):
                assert local_clock() < end, "unfiltered inlet missed estimates"
                got_ab |= {e.seq for e in everything.pull_chunk(100) if e.session == "ab"}


def _write_npz(path, frames: int = 20, fps: float = 200.0):
    joints = np.stack([_pose(i / frames) for i in range(frames)])
    np.savez(path, format_version=1, joints=joints, layout=np.str_("h2o_hands"),
             fps=np.float64(fps), activity=np.str_("pour_milk"))
    return joints


def test_replay_several_clients_accounts_for_every_frame(tmp_path):
    joints = _write_npz(tmp_path / "seq.npz")
    seen: list[tuple[int, int]] = []
    with FakeServer() as server:
        report = replay(tmp_path / "seq.npz", server.address, clients=3,
                        on_estimate=lambda i, est: seen.append((i, est.seq)))
        by_session = {f"replay-{i}": [f for f in server.frames if f["session"] == f"replay-{i}"]
                      for i in range(3)}
    assert (report.sent, report.answered, report.unanswered) == (60, 60, 0)
    assert len(report.latencies_s) == 60 and report.latency_ms(99) >= report.latency_ms(50) > 0
    assert sorted(seen) == [(i, k) for i in range(3) for k in range(20)]
    for frames in by_session.values():  # each headset sent the recording, in order, intact
        assert [f["seq"] for f in frames] == list(range(20))
        np.testing.assert_array_equal(np.stack([f["joints"] for f in frames]), joints)
    assert "answered 60" in report.summary()


def test_replay_of_a_labelled_file_reports_phase_accuracy(tmp_path, capsys):
    """The fake server names phase seq % 4; labels that disagree on 5 frames: 15/20 right."""
    joints = _write_npz(tmp_path / "plain.npz")
    phases = np.arange(20) % 4
    phases[:5] = (phases[:5] + 1) % 4
    np.savez(tmp_path / "labelled.npz", format_version=1, joints=joints,
             layout=np.str_("h2o_hands"), fps=np.float64(200.0), phases=phases,
             phase_names=np.array([f"phase{k}" for k in range(4)]))
    with FakeServer() as server:
        plain = replay(tmp_path / "plain.npz", server.address)
        assert main(["replay", str(tmp_path / "labelled.npz"), "--address", server.address,
                     "--json", str(tmp_path / "r.json")]) == 0
    assert plain.phase_accuracy is None and "phase accuracy" not in plain.summary()
    assert "phase accuracy 75.0 % of 20 answers" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["phase_accuracy"] == 0.75


def test_replay_loop_with_duration_and_rate(tmp_path):
    _write_npz(tmp_path / "seq.npz", frames=4)
    with FakeServer() as server:
        report = replay(tmp_path / "seq.npz", server.address, rate_hz=100.0, loop=True,
                        duration=0.095)
    assert report.sent == 10  # frames due at 0, 10, ..., 90 ms: looped past the 4 recorded
    assert report.answered == 10 and report.to_dict()["unanswered"] == 0


def test_replay_cli_and_raw_export(tmp_path, capsys):
    joints = _write_npz(tmp_path / "seq.npz", frames=5)
    with FakeServer() as server:
        rc = main(["replay", str(tmp_path / "seq.npz"), "--address", server.address,
                   "--clients", "2", "--json", str(tmp_path / "r.json")])
    assert rc == 0 and "answered 10" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["sent"] == 10
    assert main(["export-raw", str(tmp_path / "seq.npz"), str(tmp_path / "seq.masaraw")]) == 0
    back = read_raw(tmp_path / "seq.masaraw")
    assert (back.layout, back.fps) == ("h2o_hands", 200.0)
    assert back.joints.tobytes() == joints.tobytes()

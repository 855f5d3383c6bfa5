"""engine.recorder: the frames a server accepts become sequence files, bounded, per tenant.

The recorder alone, then behind a real server (fake pipeline, real sockets on loopback):
bye, expiry and shutdown each write the session's file; --secure keeps each client key's
recordings in its own folder.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from fake_pipeline import SHAPE, FakePipeline

from clients import PoseOutlet
from engine.recorder import FrameBuffer, SessionRecorder, key_id
from engine.security import create_keypair, load_client_keys
from engine.server import Server, ServerConfig
from masa_rt.sequence import load_sequence

DEADLINE = 5.0


def _wait_for(predicate, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def _poses(n: int) -> np.ndarray:
    return np.arange(n * SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(n, *SHAPE)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npz"))


def test_frame_buffer_keeps_frames_in_order_up_to_its_cap():
    buf = FrameBuffer((2, 3), max_frames=2_500)
    frames = np.random.default_rng(0).normal(size=(3_000, 2, 3)).astype(np.float32)
    kept = [buf.append(float(i), f) for i, f in enumerate(frames)]
    assert kept == [True] * 2_500 + [False] * 500
    times, joints = buf.arrays()
    assert np.array_equal(times, np.arange(2_500)) and np.array_equal(joints, frames[:2_500])
    assert sum(j.nbytes for j in buf._joints) == 2_500 * 2 * 3 * 4  # memory stops at the cap


def test_recorder_writes_a_closed_session_and_counts_what_passed_the_cap(tmp_path, caplog):
    rec = SessionRecorder(tmp_path, max_frames=5)
    rec.opened("s1", "h2o_hands", 30.0, SHAPE, activity="pour_milk")
    poses = _poses(8)
    for i, p in enumerate(poses):
        rec.frame("s1", 10.0 + i / 30, p)
    rec.frame("nobody", 1.0, poses[0])  # an unknown session is ignored, not raised
    rec.opened("empty", "h2o_hands", 30.0, SHAPE)
    rec.closed("empty", "bye")
    rec.closed("s1", "bye")
    rec.stop()
    (path,) = _files(tmp_path)
    assert path.name.endswith("_s1.npz")
    seq = load_sequence(path)
    assert seq.layout == "h2o_hands" and seq.fps == 30.0 and seq.activity == "pour_milk"
    assert np.array_equal(seq.joints, poses[:5])
    assert np.allclose(seq.timestamps, 10.0 + np.arange(5) / 30)
    assert "session=s1" in seq.source and "closed=bye" in seq.source
    assert "frames_over_cap=3" in seq.source
    counts = rec.counters()
    assert counts["record.frames"] == 5 and counts["record.frames_over_cap"] == 3
    assert counts["record.files_written"] == 1 and counts["record.empty_sessions"] == 1
    assert sum("event=record_cap" in r.message for r in caplog.records) == 1


def test_a_recording_that_cannot_be_written_is_counted_not_raised(tmp_path):
    rec = SessionRecorder(tmp_path)
    rec.opened("lost", "h2o_hands", 30.0, SHAPE)
    rec.frame("lost", 1.0, np.full(SHAPE, np.nan, np.float32))  # tracking lost throughout
    rec.closed("lost", "expired")
    rec.stop()
    assert _files(tmp_path) == [] and rec.counters()["record.write_failed"] == 1


def test_a_restarted_session_id_never_replaces_its_earlier_take(tmp_path):
    rec = SessionRecorder(tmp_path)
    for take in range(3):
        rec.opened("same", "h2o_hands", 30.0, SHAPE)
        rec.frame("same", 1.0, _poses(1)[0] + take)
        rec.closed("same", "restarted")
    rec.stop()
    assert len(_files(tmp_path)) == 3


def test_a_full_writer_queue_drops_and_counts_but_shutdown_waits(tmp_path, monkeypatch):
    import engine.recorder as recorder_module

    release, busy = threading.Event(), threading.Event()
    real_save = recorder_module.save_sequence

    def slow_save(path, seq):  # a disk that hangs until released
        busy.set()
        release.wait(DEADLINE)
        real_save(path, seq)

    monkeypatch.setattr(recorder_module, "save_sequence", slow_save)
    rec = SessionRecorder(tmp_path, queue_size=1)
    for sid in ("a", "b", "c", "d", "e"):
        rec.opened(sid, "h2o_hands", 30.0, SHAPE)
        rec.frame(sid, 1.0, _poses(1)[0])
    rec.closed("a", "bye")
    assert busy.wait(DEADLINE)  # the writer holds "a"
    rec.closed("b", "bye")  # queued
    rec.closed("c", "bye")  # no room while serving: dropped, counted, logged
    assert rec.counters()["record.dropped_queue_full"] == 1
    threading.Timer(0.2, release.set).start()
    rec.stop()  # "d" and "e" are still open: stopping waits for room instead of dropping
    names = sorted(p.name.split("_", 1)[1] for p in _files(tmp_path))
    assert names == ["a.npz", "b.npz", "d.npz", "e.npz"]
    assert rec.counters()["record.files_written"] == 4


@pytest.fixture
def recording_server(tmp_path):
    def start(**cfg) -> tuple[Server, SessionRecorder]:
        rec = SessionRecorder(tmp_path / "rec", max_frames=1_000)
        (tmp_path / "rec").mkdir()
        config = ServerConfig(bind="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0", **cfg)
        return Server(FakePipeline(), config, recorder=rec).start_in_thread(), rec

    return start


def _stream(outlet: PoseOutlet, poses: np.ndarray) -> list[float]:
    stamps = []
    for p in poses:
        outlet.push(p)
        stamps.append(outlet._last_stamp)
        assert outlet.pull(timeout=DEADLINE) is not None
    return stamps


def test_server_records_a_session_on_bye(recording_server, tmp_path):
    srv, rec = recording_server()
    try:
        poses = _poses(20)
        with PoseOutlet(srv.address, session="take-1", fps=30.0, reference="pour_milk") as out:
            stamps = _stream(out, poses)
        _wait_for(lambda: srv.stats()["counters"].get("record.files_written") == 1)
    finally:
        srv.stop()
    (path,) = _files(tmp_path / "rec")
    seq = load_sequence(path)
    assert np.array_equal(seq.joints, poses) and np.allclose(seq.timestamps, stamps)
    assert seq.activity == "pour_milk" and "closed=bye" in seq.source and "key=-" in seq.source


def test_server_records_expired_and_open_sessions(recording_server, tmp_path):
    srv, rec = recording_server(idle_timeout_s=0.3)
    try:
        out = PoseOutlet(srv.address, session="quiet", fps=30.0, heartbeat=60.0)
        out.open()
        _stream(out, _poses(3))
        _wait_for(lambda: srv.stats()["counters"]["sessions_expired"] == 1)
        out.close()
        with PoseOutlet(srv.address, session="open-at-stop", fps=30.0) as live:
            _stream(live, _poses(4))
            final = srv.stop()  # the server stops while this session is still open
    finally:
        srv.stop()
    sources = sorted(load_sequence(p).source for p in _files(tmp_path / "rec"))
    assert len(sources) == 2 and final["counters"]["record.files_written"] == 2
    assert "closed=shutdown" in sources[0] and "session=open-at-stop" in sources[0]
    assert "closed=expired" in sources[1] and "session=quiet" in sources[1]


def test_secure_server_records_each_client_key_into_its_own_folder(recording_server, tmp_path):
    keydir = tmp_path / "keys"
    create_keypair(keydir, "server", server=True)
    for name in ("alice", "bob"):
        create_keypair(keydir, name)
    srv, rec = recording_server(keydir=str(keydir))
    ctx = zmq.Context()
    try:
        for name in ("alice", "bob"):
            keys = load_client_keys(keydir, name)
            # Both use the same session id: the files must still never mix.
            with PoseOutlet(srv.address, session="shared-id", fps=30.0, curve=keys,
                            context=ctx) as out:
                _stream(out, _poses(2))
        _wait_for(lambda: srv.stats()["counters"].get("record.files_written") == 2)
    finally:
        srv.stop()
        ctx.term()
    for name in ("alice", "bob"):
        folder = tmp_path / "rec" / key_id(load_client_keys(keydir, name).public)
        (path,) = _files(folder)
        assert f"key={folder.name}" in load_sequence(path).source
        assert folder.stat().st_mode & 0o077 == 0  # a tenant's recordings are not world-readable


def test_serve_refuses_a_record_folder_that_does_not_exist(tmp_path, capsys):
    from masa_rt.cli import main

    reference = Path(__file__).resolve().parents[1] / "examples" / "pour_milk.npz"
    missing = tmp_path / "nope"
    assert main(["serve", "--reference", str(reference), "--record", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"masa-rt serve: error: --record {missing}: not a writable folder "
                   "(create it first)")
    assert not missing.exists()

"""serve --workers: the WorkerPool's own rules (placement, lost workers, refusals) and the
engine in worker processes killed mid-stream or on another "host" (loopback TCP).

The end-to-end, hostile-input and resume tests run against a pool too (test_e2e,
test_hostile, test_faults); this file covers what only a pool can get wrong.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fake_pipeline import SHAPE, FakePipeline
from serve_process import ENV
from worker_pool import process_workers, thread_workers, worker_cmd

from clients import PoseOutlet
from clients.replay import replay
from engine.server import Server, ServerConfig
from engine.worker import Worker, WorkerConfig

DEADLINE = 5.0
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demos" / "pour_milk.npz"
FAST = {"heartbeat_s": 0.1, "lost_after_s": 0.6}  # a silent worker is lost within a second


def make_server(pipeline, **cfg) -> Server:
    config = ServerConfig(bind="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0", **cfg)
    return Server(pipeline, config).start_in_thread()


def pose() -> np.ndarray:
    return np.zeros(SHAPE, np.float32)


def wait_for(predicate, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


def counters(srv: Server) -> dict:
    return srv.stats()["counters"]


def accounted(srv: Server) -> dict:
    """Every accepted frame ended as an estimate or a counted drop; the final counters."""
    def balanced() -> bool:
        c = counters(srv)
        return srv._in_flight == 0 and c["frames_in"] == c["estimates_out"] + c["dropped"]

    wait_for(balanced)
    return counters(srv)


def hosting(pool, sid: str) -> Worker:
    """The thread worker that holds session ``sid`` (once its "open" has arrived there)."""
    found: list[Worker] = []

    def opened() -> bool:
        handle = pool._routes[sid].handle
        found[:] = [w for w in pool.threads if handle in w.handles]
        return bool(found)

    wait_for(opened)
    return found[0]


def loads(pool) -> list[int]:
    return sorted(len(w.handles) for w in pool.threads)


def test_sessions_go_to_the_least_loaded_worker_and_stay_there():
    with thread_workers(FakePipeline, n=2) as pool:
        srv = make_server(pool)
        outlets = [PoseOutlet(srv.address, session=f"s{k}", fps=90.0) for k in range(4)]
        try:
            for out in outlets:
                out.open()
            wait_for(lambda: loads(pool) == [2, 2])
            homes = {out.session: hosting(pool, out.session) for out in outlets}
            for _ in range(5):
                for out in outlets:
                    out.push(pose())
                for out in outlets:
                    assert out.pull(timeout=DEADLINE) is not None
            assert {out.session: hosting(pool, out.session) for out in outlets} == homes
            outlets[0].close()  # bye: its worker forgets it, the next hello goes there
            wait_for(lambda: loads(pool) == [1, 2])
            assert accounted(srv)["workers.connected"] == 2
        finally:
            for out in outlets[1:]:
                out.close()
            srv.stop()


def test_a_lost_worker_drops_its_frames_and_its_sessions_move():
    with thread_workers(FakePipeline, n=2, **FAST) as pool:
        srv = make_server(pool)
        a, b = (PoseOutlet(srv.address, session=s, fps=90.0) for s in ("a", "b"))
        try:
            a.open(), b.open()
            dying, other = hosting(pool, "a"), hosting(pool, "b")
            assert dying is not other
            dying.pipeline.hold = other.pipeline.hold = True
            for _ in range(3):
                a.push(pose()), b.push(pose())
            wait_for(lambda: srv.counters.frames_in == 6)
            wait_for(lambda: sum(dying.handles.values()) == 3)  # in the dying engine
            dying.request_stop()  # gone without a word: lost when the pool next hears
            wait_for(lambda: counters(srv).get("workers.lost") == 1)
            other.pipeline.hold = False
            assert {b.pull(timeout=DEADLINE).seq for _ in range(3)} == {0, 1, 2}
            a.push(pose())  # "a" starts over on the worker left (alignment state lost)
            assert a.pull(timeout=DEADLINE).seq == 3
            assert hosting(pool, "a") is other
            c = accounted(srv)
            assert c["dropped.worker_lost"] == 3 and c["dropped"] == 3
            assert c["workers.sessions_moved"] == 1 and c["workers.connected"] == 1
            assert srv.sessions["a"].counters.dropped["worker_lost"] == 3
        finally:
            a.close(), b.close()
            srv.stop()


def test_without_workers_frames_are_dropped_and_hellos_refused():
    with thread_workers(FakePipeline, n=1, **FAST) as pool:
        srv = make_server(pool)
        a = PoseOutlet(srv.address, session="a", fps=90.0)
        try:
            a.open()
            pool.threads[0].request_stop()
            wait_for(lambda: counters(srv)["workers.connected"] == 0)
            a.push(pose())
            wait_for(lambda: counters(srv).get("dropped.no_worker") == 1)
            late = PoseOutlet(srv.address, session="late", fps=90.0)
            with pytest.raises(Exception, match="overloaded"):
                late.open()
            late.close()
            c = accounted(srv)
            assert c["frames_in"] == 1 and c["rejected.overloaded"] == 1
        finally:
            a.close()
            srv.stop()


class FullFake(FakePipeline):
    """An engine with no room left: every open is refused (its backend's slots taken)."""

    opens = 0

    def open_session(self, *args, **kwargs) -> dict:
        self.opens += 1
        raise RuntimeError("no free slot")


def test_a_worker_refusing_a_session_is_not_given_more():
    with thread_workers(FakePipeline, n=1, **FAST) as pool:
        full = FullFake()
        w = Worker(full, WorkerConfig(pool.address, heartbeat_s=0.1))
        w.start_in_thread()
        srv = make_server(pool)
        try:
            wait_for(lambda: counters(srv)["workers.connected"] == 2)
            outlets = [PoseOutlet(srv.address, session=f"s{k}", fps=90.0) for k in range(5)]
            for out in outlets:  # one goes to the full worker, is refused there, moves
                out.open()
                out.push(pose())
                out.pull(timeout=0.5)  # seq 0, or None where it was dropped
            assert full.opens == 1  # refused once, then never chosen again
            accounted(srv)
            # The refused session's frame is dropped engine_error if it reached the full
            # worker before the refusal came back, else it went to the other worker.
            for out in outlets:
                out.push(pose())
                assert out.pull(timeout=DEADLINE).seq == 1  # every session is served now
            c = accounted(srv)
            assert c["estimates_out"] + c.get("dropped.engine_error", 0) == 10
            assert c["dropped"] == c.get("dropped.engine_error", 0) <= 1
            assert not w.handles and not full.queue  # it never took a session
        finally:
            w.request_stop()
            srv.stop()


class NamedFake(FakePipeline):
    model_name = "model-a"
    references = {"pour_milk": None}


def test_a_worker_running_another_model_is_refused():
    with thread_workers(NamedFake, n=1) as pool:
        stranger = NamedFake()
        stranger.model_name = "model-b"
        info = {"model": "model-b", "references": ["pour_milk"]}
        w = Worker(stranger, WorkerConfig(pool.address), info=info)
        w.start_in_thread()
        try:
            wait_for(lambda: (pool.step(), pool.counters().get("workers.refused"))[1] == 1)
            assert pool.counters()["workers.connected"] == 1
        finally:
            w.request_stop()


@pytest.mark.slow
def test_worker_process_killed_mid_stream(tiny_model):
    """Four headsets at 90 Hz for 2 s, two ``masa-rt worker`` processes; one is SIGKILLed
    0.8 s in. Its sessions go on on the other worker; every frame is answered or counted."""
    with process_workers(*tiny_model, n=2) as pool:
        srv = make_server(pool)
        answered_at: dict[int, list[float]] = {k: [] for k in range(4)}
        killed_at = []

        def kill_one() -> None:
            time.sleep(0.8)
            killed_at.append(time.monotonic())
            pool.procs[0].send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        try:
            report = replay(EXAMPLE, srv.address, rate_hz=90.0, clients=4, loop=True,
                            duration=2.0, reference="pour_milk", session_prefix="k",
                            on_estimate=lambda k, _e: answered_at[k].append(time.monotonic()))
            killer.join()
            c = accounted(srv)
        finally:
            srv.stop()
    assert c["workers.lost"] == 1 and c["workers.connected"] == 1
    assert c["workers.sessions_moved"] == 2  # two of the four sessions were on it
    assert c["frames_in"] == c["estimates_out"] + c["dropped"]
    drops = {k for k, v in c.items() if k.startswith("dropped.") and v}
    assert drops <= {"dropped.worker_lost"}  # nothing else went wrong
    # Every session was answered after the kill, the moved ones by the other worker.
    assert all(any(t > killed_at[0] + 0.1 for t in ts) for ts in answered_at.values())
    assert report.sent == report.answered + sum(report.rejected.values()) + c["dropped"]
    print(f"sent {report.sent}, answered {report.answered}, worker_lost "
          f"{c.get('dropped.worker_lost', 0)}")


# ------------------------------------------------------------------ the real command line


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"process exited: {proc.wait()}")
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}")


def _still_running(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(
                    errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stream(address: str, session: str, n: int) -> None:
    joints = np.load(EXAMPLE)["joints"]
    with PoseOutlet(address, session=session, fps=30.0) as out:
        for k in range(n):
            out.push(joints[k])
            assert out.pull(timeout=DEADLINE).seq == k


@pytest.mark.slow
def test_serve_workers_2_command_line(tiny_model):
    """`masa-rt serve --workers 2`: starts and registers its workers, serves, and on
    SIGTERM reports and leaves no worker behind."""
    onnx, ref = tiny_model
    cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--model", str(onnx), "--reference",
           str(ref), "--bind", "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        endpoint = _read_until(proc, r"event=workers local=2 endpoint=(\S+)").group(1)
        address = _read_until(proc, r"event=serving bind=(\S+)").group(1)
        assert len(_still_running(endpoint)) == 2
        _stream(address, "cli", 20)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert re.search(r"frames_in\s+20\b", stdout) and re.search(r"estimates_out\s+20\b", stdout)
    assert re.search(r"workers.connected\s+2\b", stdout)
    assert _still_running(endpoint) == []


@pytest.mark.slow
def test_workers_on_another_host_over_tcp_with_curve(tiny_model, tmp_path):
    """`serve --secure --workers 0 --worker-bind tcp://...` and `masa-rt worker --connect`
    processes started apart, as on other machines (loopback here): the worker link is
    CURVE, and only keys in KEYDIR/workers/ may be workers (a client's key, allowed to
    stream, is refused there: a worker sees every tenant's poses)."""
    from engine.security import create_keypair, load_client_keys

    onnx, ref = tiny_model
    keydir = tmp_path / "keys"
    create_keypair(keydir, "server", server=True)
    create_keypair(keydir, "alice")
    create_keypair(keydir, "w1")
    (keydir / "workers").mkdir()
    (keydir / "clients" / "w1.key").rename(keydir / "workers" / "w1.key")
    cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--model", str(onnx), "--reference",
           str(ref), "--bind", "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0",
           "--secure", str(keydir), "--workers", "0", "--worker-bind", "tcp://127.0.0.1:0"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    workers = []
    try:
        endpoint = _read_until(server, r"event=workers local=0 endpoint=(\S+)").group(1)
        address = _read_until(server, r"event=serving bind=(\S+)").group(1)
        workers = [subprocess.Popen(worker_cmd(endpoint, onnx, ref, "--secure", str(keydir),
                                               "--key", key), env=ENV)
                   for key in ("w1", "alice")]
        _read_until(server, r"event=worker_ready .* workers=1")
        joints = np.load(EXAMPLE)["joints"]
        with PoseOutlet(address, session="s", fps=30.0,
                        curve=load_client_keys(keydir, "alice")) as out:
            for k in range(10):
                out.push(joints[k])
                assert out.pull(timeout=DEADLINE).seq == k
            time.sleep(1.0)  # the intruder has had its handshakes refused by now
            c = out.stats(whole_server=True)["counters"]
        assert c["workers.connected"] == 1 and c["workers.registered"] == 1
        assert c["estimates_out"] == 10
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        assert server.returncode == 0
        time.sleep(0.5)  # a remote worker outlives the server: it waits for the next one
        assert workers[0].poll() is None
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [server, *workers]:
            try:
                p.communicate(timeout=10) if p is server else p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    assert workers[0].returncode == 0  # and stops cleanly on SIGTERM

"""serve --workers restarts its own worker processes (engine.workers: WorkerPool.supervise,
RestartPolicy): a killed or hung local worker comes back and its sessions are served
again, a worker failing at start-up is retried with back-off and then given up on, and
closing the pool (serve's SIGTERM) restarts nothing and leaves no worker behind.

Real ``masa-rt worker`` processes on the tiny model (local_pool, as serve starts them),
except the back-off schedule, which runs on a fake clock with stand-in processes.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fake_pipeline import FakePipeline
from serve_process import ENV

from clients import PoseOutlet
from engine.server import Server, ServerConfig
from engine.worker_commands import local_pool
from engine.workers import RestartPolicy, WorkerPool

DEADLINE = 20.0
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demos" / "pour_milk.npz"


def make_server(pipeline) -> Server:
    config = ServerConfig(bind="tcp://127.0.0.1:0", pub_bind="tcp://127.0.0.1:0")
    return Server(pipeline, config).start_in_thread()


def wait_for(predicate, timeout: float = DEADLINE, step=None) -> None:
    """Until ``predicate()``; ``step``: called in between (a pool no server drives)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        if step is not None:
            step()
        time.sleep(0.01)


def running_with(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit()
                    and text in (entry / "cmdline").read_bytes().decode(errors="replace")
                    and ") Z " not in (entry / "stat").read_text()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def joints() -> np.ndarray:
    return np.load(EXAMPLE)["joints"]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_session_served_again(tiny_model):
    """The one local worker is SIGKILLed with three frames in it: they count worker_lost;
    frames sent before its replacement is ready count no_worker (and a hello is refused
    overloaded); then the same session, sending frames only, is answered again by a new
    process; the stats reply counts the loss and the restart."""
    onnx, ref = tiny_model
    poses = joints()
    pool, close = local_pool(1, onnx, [ref], restart=RestartPolicy(first_delay_s=0.3))
    srv = make_server(pool)
    try:
        with PoseOutlet(srv.address, session="a", fps=30.0) as out:
            for k in range(5):
                out.push(poses[k])
                assert out.pull(timeout=5.0).seq == k
            [old] = pool.local_processes()
            old.send_signal(signal.SIGSTOP)  # frames reach it and stay there unanswered
            for k in range(5, 8):
                out.push(poses[k])
            wait_for(lambda: len(pool._routes["a"].in_engine) == 3)
            old.kill()
            wait_for(lambda: out.stats(whole_server=True)["counters"]["workers.lost"] == 1)
            out.push(poses[8])  # no worker now: dropped
            wait_for(lambda: out.stats(whole_server=True)["counters"].get(
                "dropped.no_worker") == 1)
            late = PoseOutlet(srv.address, session="late", fps=30.0)
            with pytest.raises(Exception, match="overloaded"):
                late.open()
            late.close()
            # The client only goes on sending: answered again once the new worker is ready.
            k, answer = 9, None
            deadline = time.monotonic() + DEADLINE
            while answer is None:
                assert time.monotonic() < deadline, "no answer after the restart"
                out.push(poses[k % len(poses)])
                answer, k = out.pull(timeout=0.1), k + 1
            assert answer.seq >= 9
            for _ in range(3):
                seq = out.push(poses[k % len(poses)])
                k += 1
                assert out.pull(timeout=5.0).seq == seq
            [new] = pool.local_processes()
            assert new.pid != old.pid and new.poll() is None
            assert old.returncode == -signal.SIGKILL
            wait_for(lambda: srv._in_flight == 0)
            c = out.stats(whole_server=True)["counters"]
    finally:
        srv.stop()
        close()
    assert c["workers.restarted"] == 1 and c["workers.lost"] == 1
    assert c["workers.registered"] == 2 and c["workers.connected"] == 1
    assert c["workers.given_up"] == 0
    assert c["dropped.worker_lost"] == 3  # the three in the killed worker
    assert c["dropped"] == c["dropped.worker_lost"] + c["dropped.no_worker"]
    assert c["frames_in"] == c["estimates_out"] + c["dropped"] == k
    assert c["rejected.overloaded"] == 1
    assert new.poll() is not None  # close() stopped it


class FakeProc:
    """A stand-in for subprocess.Popen: exits when the test says (``code``)."""

    pids = iter(range(10_000, 20_000))

    def __init__(self) -> None:
        self.pid, self.returncode = next(self.pids), None

    def poll(self):
        return self.returncode

    def exit(self, code: int = 1) -> None:
        self.returncode = code

    def terminate(self) -> None:
        self.returncode = self.returncode if self.returncode is not None else -15

    kill = terminate

    def wait(self, timeout=None) -> int:
        return self.returncode


def test_back_off_doubles_starts_over_after_a_stable_run_and_gives_up(caplog):
    """On a fake clock: restarts 0.5 s, 1, 2, ... capped at 30 s after the exit; a process
    that ran a minute starts the count over; after 10 restarts in a row that did not last
    the worker is given up on, logged and counted, and never started again."""
    now = [100.0]
    pool = WorkerPool(FakePipeline(), "tcp://127.0.0.1:0", clock=lambda: now[0])
    started: list[FakeProc] = []

    def spawn() -> FakeProc:
        started.append(FakeProc())
        return started[-1]

    def exits(proc: FakeProc, code: int = 1) -> float | None:
        """``proc`` exits; the wait before the pool starts the next one (None: never)."""
        proc.exit(code)
        now[0] += 0.1  # past the pool's 50 ms between process checks
        pool.step()
        n, t0, slot = len(started), now[0], pool._slots[0]
        if slot.given_up:
            return None
        delay = slot.restart_at - t0
        now[0] = t0 + delay - 0.06
        pool.step()
        assert len(started) == n, "restarted early"
        now[0] = t0 + delay + 0.01
        pool.step()
        assert len(started) == n + 1, "not restarted"
        return round(delay, 3)

    pool.supervise([FakeProc()], spawn)
    try:
        with caplog.at_level(logging.WARNING, logger="masa_rt.workers"):
            waits = [exits(pool.local_processes()[0], -9)]
            waits += [exits(started[-1]) for _ in range(3)]
            assert waits == [0.5, 1.0, 2.0, 4.0]
            now[0] += 61.0  # the fourth restart ran a minute: the count starts over
            waits = [exits(started[-1]) for _ in range(11)]
        assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, None]
        n = len(started)
        for _ in range(100):  # given up: never started again
            now[0] += 1.0
            pool.step()
        assert len(started) == n == 14
        c = pool.counters()
        assert c["workers.restarted"] == 14 and c["workers.given_up"] == 1
        assert pool.local_processes() == []
        text = caplog.text
        assert re.search(r"event=worker_restarted local=0 pid=\d+ why=exited code=-9 try=1 ",
                         text)
        assert re.search(r"event=worker_exited local=0 pid=\d+ why=exited code=1 "
                         r"ran_s=0\.\d restart_in_s=30\.00 try=10", text)
        assert re.search(r"event=worker_given_up local=0 pid=\d+ why=exited code=1 tries=10",
                         text)
    finally:
        pool.close()


@pytest.mark.slow
def test_a_worker_failing_at_start_is_retried_then_given_up(tiny_model, tmp_path, caplog):
    """Its model file gone after start-up, a killed worker's replacements exit at once:
    retried after 0.05, 0.1, 0.2 s, then given up on; the pool runs without it (frames
    no_worker), and no process is left."""
    onnx, ref = tiny_model
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx.read_bytes())
    policy = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, max_tries=3)
    pool, close = local_pool(1, model, [ref], restart=policy)
    try:
        [old] = pool.local_processes()
        model.unlink()
        with caplog.at_level(logging.WARNING, logger="masa_rt.workers"):
            old.kill()
            wait_for(lambda: pool.events["given_up"] == 1, step=pool.step)
        assert pool.events["restarted"] == 3 and pool.events["lost"] == 1
        assert pool.local_processes() == [] and pool.counters()["workers.connected"] == 0
        tries = re.findall(r"event=worker_exited .*why=(\S+ code=\S+) .*restart_in_s=(\S+) "
                           r"try=(\d)", caplog.text)
        assert [(d, t) for _, d, t in tries] == [("0.05", "1"), ("0.10", "2"), ("0.20", "3")]
        assert tries[0][0] == "exited code=-9"
        assert all(why != "exited code=-9" for why, _, _ in tries[1:])  # they failed
        assert "event=worker_given_up" in caplog.text
        time.sleep(0.3)
        pool.step()
        assert pool.events["restarted"] == 3  # never again
    finally:
        close()
    assert running_with(pool.address) == []


@pytest.mark.slow
def test_a_hung_worker_is_killed_and_restarted(tiny_model):
    """A local worker that stops answering (SIGSTOP here) is lost as silent, killed (it
    would never come back by itself) and restarted."""
    onnx, ref = tiny_model
    pool, close = local_pool(1, onnx, [ref], lost_after_s=1.5,
                             restart=RestartPolicy(first_delay_s=0.05))
    try:
        [old] = pool.local_processes()
        old.send_signal(signal.SIGSTOP)
        wait_for(lambda: pool.events["restarted"] == 1, step=pool.step)
        assert old.poll() == -signal.SIGKILL
        wait_for(lambda: len(pool.workers) == 1, step=pool.step)
        [new] = pool.local_processes()
        assert new.pid != old.pid and pool.events["lost"] == 1
        assert [w.pid for w in pool.workers.values()] == [new.pid]
    finally:
        close()
    assert running_with(pool.address) == []


@pytest.mark.slow
def test_closing_the_pool_restarts_nothing_and_leaves_no_worker(tiny_model):
    """Closing stops the workers running now, a restarted one too, and restarts nothing
    from then on, even a worker whose restart is due at once and a pool checked again (as
    serve's loop would, were it still running in another thread)."""
    onnx, ref = tiny_model
    pool, close = local_pool(2, onnx, [ref], restart=RestartPolicy(first_delay_s=0.0))
    first = pool.local_processes()
    current = []
    try:
        first[0].kill()
        wait_for(lambda: pool.events["restarted"] == 1, step=pool.step)
        current = pool.local_processes()
        assert len(current) == 2 and first[0] not in current
    finally:
        close()
    assert all(p.poll() is not None for p in first + current)
    assert running_with(pool.address) == []
    pool._keep_local(pool.clock() + 1.0)  # its check for exited workers, after the close
    assert pool.events["restarted"] == 1 and running_with(pool.address) == []


class Lines:
    """A process's stderr lines, read in a thread (a readline never blocks a test)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stderr,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put("")

    def until(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s") from None
            if not line:
                raise AssertionError(f"process exited before a line matching {pattern!r}")
            m = re.search(pattern, line)
            if m:
                return m


@pytest.mark.slow
def test_serve_restarts_its_one_local_worker(tiny_model):
    """`masa-rt serve --workers 1 --worker-bind tcp://...` (one local worker process): its
    worker SIGKILLed, serve restarts it and serves again; SIGTERM leaves no worker."""
    onnx, ref = tiny_model
    cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--model", str(onnx), "--reference",
           str(ref), "--bind", "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0",
           "--workers", "1", "--worker-bind", "tcp://127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    poses, lines = joints(), Lines(proc)
    try:
        endpoint = lines.until(r"event=workers local=1 endpoint=(\S+)").group(1)
        address = lines.until(r"event=serving bind=(\S+)").group(1)
        [old] = running_with(endpoint)
        with PoseOutlet(address, session="s", fps=30.0) as out:
            out.push(poses[0])
            assert out.pull(timeout=5.0).seq == 0
            subprocess.run(["kill", "-KILL", str(old)], check=True)
            m = lines.until(r"event=worker_restarted local=0 pid=(\d+) why=exited code=-9 "
                            r"try=1", timeout=DEADLINE)
            lines.until(r"event=worker_ready .* workers=1", timeout=DEADLINE)
            [new] = running_with(endpoint)
            assert new == int(m.group(1)) != old
            for k in range(1, 4):
                seq = out.push(poses[k])
                assert out.pull(timeout=5.0).seq == seq
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # its report (stdout) is a few lines: the pipe holds it
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert re.search(r"workers.restarted\s+1\b", stdout)
    assert re.search(r"estimates_out\s+4\b", stdout)
    assert running_with(endpoint) == []

"""The engine in N worker processes behind one server: :class:`WorkerPool`.

``masa-rt serve --workers N`` keeps its sockets, validation, sessions and counters in the
server process (engine.server) and hands the engine work to a ``WorkerPool`` instead of
an in-process :class:`engine.pipeline.Pipeline`. The pool is a pipeline to the server
(the same ``open_session`` / ``close_session`` / ``submit`` / ``step`` calls) and a
ZeroMQ ROUTER to its workers (:mod:`engine.worker`, ``masa-rt worker``), which connect
DEALERs to it: over a private ``ipc://`` path for the workers serve starts itself, over
``tcp://`` (CURVE with --secure) for workers on other hosts. Wire: engine.worker_wire.

* ``open_session`` is checked by a *gate*: a pipeline of the same model and references in
  the server process that opens and at once closes the session, so a refusal (layout,
  reference) and the welcome's fields are exactly the in-process ones. The session then
  goes to the live worker with the fewest sessions and stays there until it closes.
* ``submit`` queues the frame for its worker; ``step`` sends each worker its frames in one
  message, reads whatever answers have come back, and returns them without waiting. The
  server polls :attr:`answers_socket` beside its ROUTER, so an answer wakes it at once.
* A worker that exits (a local one: its process is watched) or falls silent for
  ``lost_after_s`` is lost: the frames it held are reported by :meth:`lost_frames` (the
  server counts them ``dropped.worker_lost``), and its sessions move to other workers
  with their next frame. **Their alignment state is lost**: the new worker starts them
  from the beginning of the reference, as a restart would (logged ``event=worker_lost``).
  With no worker left a frame is dropped ``no_worker`` and a hello is refused
  ``overloaded``.
* The worker processes serve started itself (:meth:`WorkerPool.supervise`) are restarted
  when they exit, after a back-off (:class:`RestartPolicy`: 0.5 s doubling up to 30 s,
  the count starting over once one has run for a minute; given up after 10 tries in a row,
  logged ``event=worker_given_up``); one lost as silent while its process still runs (hung)
  is killed first. Its sessions move meanwhile as above, and go to the restarted worker
  with their next frame once it is ready (``event=worker_restarted``, ``workers.restarted``).
  Workers on other hosts are not ours to restart: they register again by themselves.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engine import worker_wire as W
from masa_rt.protocol import ProtocolError

__all__ = ["RestartPolicy", "WorkerPool", "engine_info", "stop_processes"]

log = logging.getLogger("masa_rt.workers")


def engine_info(pipeline: Any) -> dict:
    """What a worker tells the pool in ``ready`` (and what the pool expects of it): the
    model's fingerprint, the references' activities and the session capacity, where the
    pipeline has them (a test fake has none)."""
    info: dict[str, Any] = {}
    if hasattr(pipeline, "model_name"):
        info["model"] = str(pipeline.model_name)
    if isinstance(getattr(pipeline, "references", None), dict):
        info["references"] = sorted(pipeline.references)
    capacity = getattr(getattr(getattr(pipeline, "bank", None), "backend", None), "capacity",
                       None)
    if capacity is not None:
        info["capacity"] = int(capacity)
    return info


@dataclass(frozen=True)
class RestartPolicy:
    """When the pool restarts a local worker process that exited: ``first_delay_s`` after
    the exit, doubling with each exit in a row up to ``max_delay_s``; a process that ran
    ``stable_s`` starts the count over; after ``max_tries`` restarts in a row that did not
    last, the worker is given up on (the pool runs with one fewer, logged plainly)."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stable_s: float = 60.0
    max_tries: int = 10

    def delay(self, tries: int) -> float:
        """Seconds before restart number ``tries`` (1, 2, ...) of a run of failures."""
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** max(0, tries - 1))


@dataclass
class _Slot:
    """One local worker process the pool keeps running (:meth:`WorkerPool.supervise`)."""

    number: int  # for the logs: local worker 0, 1, ...
    proc: Any  # a subprocess.Popen, or None while a restart is due
    started: float
    tries: int = 0  # exits in a row of processes that did not run stable_s
    restart_at: float = 0.0
    reason: str = ""  # why the last one went, for event=worker_restarted
    killed: str = ""  # the pool killed it (hung), and why
    given_up: bool = False


@dataclass
class _Worker:
    ident: bytes  # its routing id on the pool's ROUTER
    name: str  # host:pid, for the logs
    capacity: int
    last_heard: float
    alive: Callable[[], bool] | None = None  # a local child's process check
    pid: int | None = None  # a local child's process id
    handles: set[int] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)  # its last stream counters


@dataclass
class _Route:
    """Where one server session's frames go."""

    sid: str
    handle: int  # the session's name on its worker; a new one after every move
    open_args: list  # [layout, fps, reference, declaration], to reopen it elsewhere
    worker: bytes | None = None  # None: not placed (its worker was lost, or none is up)
    in_engine: set[int] = field(default_factory=set)  # seqs sent to the worker, unanswered


class WorkerPool:
    """A pipeline for :class:`engine.server.Server` whose engine runs in worker processes
    (module docstring). ``gate``: an in-process pipeline of the same model and references,
    used only to check hellos. ``bind``: the endpoint workers connect to. ``keydir``
    (--secure): a ``tcp://`` endpoint is CURVE with the server's keypair and admits only
    the worker keys in ``KEYDIR/workers/``."""

    def __init__(self, gate: Any, bind: str, *, keydir: str | Path | None = None,
                 heartbeat_s: float = 0.5, lost_after_s: float = 3.0,
                 restart: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gate, self.heartbeat_s, self.lost_after_s = gate, heartbeat_s, lost_after_s
        self.restart = restart or RestartPolicy()
        self.clock = clock
        self.expected = engine_info(gate)
        self.workers: dict[bytes, _Worker] = {}
        self._routes: dict[str, _Route] = {}
        self._by_handle: dict[int, _Route] = {}
        self._next_handle = 0
        self._outbox: dict[bytes, list[list]] = {}
        self._lost: list[tuple[str, int, str]] = []
        self._local: dict[int, Callable[[], bool]] = {}  # pid -> is it running
        self._refused: set[bytes] = set()
        # Unknown connections told to register again, and when: one reset each (a second
        # one, crossing its "ready", would make it drop the sessions placed on it since).
        self._resets: dict[bytes, float] = {}
        self._retired: Counter[str] = Counter()  # stream counters of workers gone
        # workers.* counters in stats, every one there from the start
        self.events: Counter[str] = Counter(dict.fromkeys(
            ("registered", "lost", "sessions_moved", "refused", "bad_messages", "restarted",
             "given_up"), 0))
        # Local worker processes kept running (supervise); the lock keeps close() (another
        # thread) and a restart in step() apart: nothing starts once close has begun.
        self._slots: list[_Slot] = []
        self._spawn: Callable[[], Any] | None = None
        self._slots_lock = threading.Lock()
        self._closing = False
        self._next_ping = self._next_check = 0.0
        self.on_close: list[Callable[[], None]] = []  # e.g. stop the local workers (serve)
        self._ctx = zmq.Context()
        self._auth = None
        self.answers_socket = self._ctx.socket(zmq.ROUTER)
        self._setup(bind, keydir)

    # -- sockets --------------------------------------------------------------------------

    def _setup(self, bind: str, keydir: str | Path | None) -> None:
        sock = self.answers_socket
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises, never swallows
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        if keydir is not None and not bind.startswith(("ipc://", "inproc://")):
            self._auth = _worker_authenticator(self._ctx, Path(keydir).expanduser())
            from engine.security import apply_server_curve

            apply_server_curve(sock, keydir)
        elif keydir is None:
            from engine.security import plain_mode_warning

            plain_mode_warning(bind, log)
        from engine.server import _bind

        self.address = _bind(sock, bind)

    def close(self) -> None:
        """Stop the supervised local workers (none is restarted from now on), run the
        ``on_close`` hooks (serve's: stop what else it started), close the socket."""
        if self.answers_socket.closed:
            return
        self.stop_local()
        for hook in self.on_close:
            hook()
        self.on_close = []
        self.answers_socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def watch_process(self, pid: int, alive: Callable[[], bool]) -> None:
        """A local worker's process: when ``alive()`` turns False the worker is lost at
        once, not after ``lost_after_s`` of silence."""
        self._local[pid] = alive

    def supervise(self, procs: list, spawn: Callable[[], Any]) -> None:
        """Keep local worker processes running: each of ``procs`` (started, registered or
        not) that exits is replaced by ``spawn()`` (one more started the same way) after the
        pool's :class:`RestartPolicy` back-off, checked in :meth:`step`; until
        :meth:`close`. serve's own workers, never remote ones (they re-register)."""
        now = self.clock()
        self._spawn = spawn
        with self._slots_lock:
            for proc in procs:
                self.watch_process(proc.pid, lambda proc=proc: proc.poll() is None)
                self._slots.append(_Slot(len(self._slots), proc, now))

    def local_processes(self) -> list:
        """The supervised worker processes there are now (a restart due has none)."""
        with self._slots_lock:
            return [slot.proc for slot in self._slots if slot.proc is not None]

    def stop_local(self, timeout: float = 5.0) -> None:
        """Stop the supervised workers, restarting none from now on (:meth:`close`)."""
        with self._slots_lock:
            self._closing = True
            procs = [slot.proc for slot in self._slots if slot.proc is not None]
        stop_processes(procs, timeout)

    def wait_for_workers(self, n: int, timeout: float,
                         give_up: Callable[[], bool] = lambda: False) -> int:
        """Block until ``n`` workers have registered (start-up), at most ``timeout`` s or
        until ``give_up()`` (a local worker exited); return how many did."""
        deadline = self.clock() + timeout
        while len(self.workers) < n and self.clock() < deadline and not give_up():
            if self.answers_socket.poll(100):
                self._receive()
            self._check_liveness(self.clock())
        return len(self.workers)

    # -- the pipeline interface -----------------------------------------------------------

    def open_session(self, session_id: str, layout: str, fps: float,
                     reference: str | None = None, declaration: dict | None = None) -> dict:
        extra = {"declaration": declaration} if declaration is not None else {}
        info = self.gate.open_session(session_id, layout, fps, reference, **extra)
        self.gate.close_session(session_id)  # the gate only checks: it holds no session
        if not self._has_room():
            raise ProtocolError("overloaded", "no engine worker with room is connected")
        self.close_session(session_id)  # a hello for a live session restarts it
        route = _Route(session_id, self._new_handle(), [layout, fps, reference, declaration])
        self._routes[session_id] = route
        self._by_handle[route.handle] = route
        self._place(route)
        return info

    def close_session(self, session_id: str) -> None:
        route = self._routes.pop(session_id, None)
        if route is None:
            return
        self._by_handle.pop(route.handle, None)
        worker = self.workers.get(route.worker) if route.worker is not None else None
        if worker is not None:
            worker.handles.discard(route.handle)
            self._send(worker, "close", route.handle)

    def submit(self, session_id: str, seq: int, t: float, joints: np.ndarray) -> None:
        route = self._routes[session_id]
        if route.worker is None and not self._place(route):
            self._lost.append((session_id, seq, "no_worker"))
            return
        self._outbox.setdefault(route.worker, []).append(
            W.frame_row(route.handle, seq, t, joints))
        route.in_engine.add(seq)

    def step(self, max_rounds: int | None = None) -> list[tuple[str, int, float, Any]]:
        """Send the frames submitted since the last call, return the answers that have
        arrived (never waits). ``max_rounds`` is the workers' business (one per loop)."""
        now = self.clock()
        self._flush()
        results = self._receive()
        self._check_liveness(now)
        if now >= self._next_ping:
            for worker in list(self.workers.values()):
                self._send(worker, "ping")
            self._next_ping = now + self.heartbeat_s
        return results

    def lost_frames(self) -> list[tuple[str, int, str]]:
        """(session, seq, reason) of frames that will never be answered, since the last
        call: the server counts each one ``dropped.<reason>``."""
        lost, self._lost = self._lost, []
        return lost

    def counters(self) -> dict[str, int]:
        """For the server's stats: the workers' stream counters summed, and the pool's."""
        # list(): stats may be asked from another thread (tests) while a worker registers
        streams = Counter(self._retired)
        for worker in list(self.workers.values()):
            streams.update(worker.counters)
        return {**{f"streams.{k}": int(v) for k, v in sorted(streams.items())},
                "workers.connected": len(self.workers),
                **{f"workers.{k}": int(v) for k, v in sorted(self.events.items())}}

    # -- placing sessions -----------------------------------------------------------------

    def _new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _has_room(self) -> bool:
        return any(len(w.handles) < w.capacity for w in self.workers.values())

    def _place(self, route: _Route) -> bool:
        """Open ``route`` on the live worker with the fewest sessions; False if none has
        room (the session stays unplaced and its frames are dropped ``no_worker``)."""
        room = [w for w in self.workers.values() if len(w.handles) < w.capacity]
        if not room:
            return False
        worker = min(room, key=lambda w: len(w.handles))
        route.worker = worker.ident
        worker.handles.add(route.handle)
        self._send(worker, "open", route.handle, *route.open_args)
        return route.worker is not None  # the send may have found it gone

    def _unplace(self, route: _Route, reason: str) -> None:
        """Its frames in the engine are lost; a new handle, placed with its next frame."""
        self._lost.extend((route.sid, seq, reason) for seq in sorted(route.in_engine))
        route.in_engine.clear()
        self._by_handle.pop(route.handle, None)
        route.handle, route.worker = self._new_handle(), None
        self._by_handle[route.handle] = route

    # -- talking to workers ---------------------------------------------------------------

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for ident, rows in outbox.items():
            worker = self.workers.get(ident)
            if worker is not None:
                self._send(worker, "frames", rows)
            else:  # lost after the frames were queued: _lose reported them already
                continue

    def _send(self, worker: _Worker, *parts: Any) -> None:
        try:
            self.answers_socket.send_multipart([worker.ident, W.encode(*parts)], zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: it stopped reading
            self._lose(worker, "not_reading")
        except zmq.ZMQError as exc:  # gone (EHOSTUNREACH) or worse
            self._lose(worker, "unreachable" if exc.errno == zmq.EHOSTUNREACH else "send_failed")

    def _reset(self, ident: bytes) -> None:
        """Ask a connection that is no registered worker (lost earlier, or connected to a
        server before this one) to register again, once per ``lost_after_s``."""
        now = self.clock()
        if ident in self._refused or now - self._resets.get(ident, -1e9) < self.lost_after_s:
            return
        self._resets[ident] = now
        self._tell(ident, "reset")

    def _tell(self, ident: bytes, *parts: Any) -> None:
        """Best effort to a connection that is not a registered worker."""
        try:
            self.answers_socket.send_multipart([ident, W.encode(*parts)], zmq.NOBLOCK)
        except zmq.ZMQError:  # zmq.Again is one: it will ask again with its next message
            pass

    def _receive(self, limit: int = 1024) -> list[tuple[str, int, float, Any]]:
        results: list[tuple[str, int, float, Any]] = []
        for _ in range(limit):
            try:
                ident, data = self.answers_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not [ident, data]: not one of our workers
                self.events["bad_messages"] += 1
                continue
            try:
                self._dispatch(ident, W.decode(data), results)
            except (W.WireError, AttributeError, IndexError, KeyError, TypeError,
                    ValueError) as exc:
                self.events["bad_messages"] += 1
                log.warning("event=bad_worker_message error=%s", exc)
        return results

    def _dispatch(self, ident: bytes, msg: list, results: list) -> None:
        kind = msg[0]
        if kind == "ready":
            self._register(ident, msg[1])
            return
        worker = self.workers.get(ident)
        if worker is None:
            self._reset(ident)
            return
        worker.last_heard = self.clock()
        if kind == "answers":
            self._take_answers(worker, msg[1], results)
        elif kind == "ping":
            if isinstance(msg[1], dict):
                worker.counters = {str(k): int(v) for k, v in msg[1].items()}
        elif kind == "refused":
            self._refused_open(worker, int(msg[1]), str(msg[2]))
        else:
            raise W.WireError(f"unknown kind {kind!r}")

    def _take_answers(self, worker: _Worker, rows: list, results: list) -> None:
        for row in rows:
            route = self._by_handle.get(int(row[0]))
            seq = int(row[1])
            # A closed, restarted or moved session's late answer: already counted dropped.
            if route is None or route.worker != worker.ident or seq not in route.in_engine:
                continue
            route.in_engine.discard(seq)
            results.append((route.sid, seq, float(row[2]), W.remote_estimate(row)))

    def _register(self, ident: bytes, ready: dict) -> None:
        self._resets.pop(ident, None)
        if ident in self.workers:  # it restarted behind the same connection
            self._lose(self.workers[ident], "re-registered")
        name = f"{ready.get('host', '?')}:{ready.get('pid', '?')}"
        wrong = {k: (ready.get(k), v) for k, v in self.expected.items()
                 if k != "capacity" and ready.get(k) != v}
        if wrong:
            self._refused.add(ident)
            self.events["refused"] += 1
            log.error("event=worker_refused worker=%s differs=%s (it must run the server's "
                      "model and references)", name, wrong)
            return
        capacity = int(ready.get("capacity", self.expected.get("capacity", 256)))
        self._refused.discard(ident)
        # A local child's pid, from this host (a remote worker's pid may be anything).
        pid = ready.get("pid") if ready.get("host") == socket.gethostname() else None
        self.workers[ident] = _Worker(ident, name, capacity, self.clock(),
                                      alive=self._local.get(pid),
                                      pid=pid if pid in self._local else None)
        self.events["registered"] += 1
        log.info("event=worker_ready worker=%s capacity=%d workers=%d", name, capacity,
                 len(self.workers))

    def _refused_open(self, worker: _Worker, handle: int, detail: str) -> None:
        route = self._by_handle.get(handle)
        worker.handles.discard(handle)
        # Take it as full (e.g. its backend's slots): not chosen again until one closes,
        # so a refusing worker cannot take every new session's frames (and the log).
        worker.capacity = len(worker.handles)
        log.error("event=worker_refused_session worker=%s sessions=%d detail=%r", worker.name,
                  len(worker.handles), detail)
        if route is not None and route.worker == worker.ident:
            self._unplace(route, "engine_error")

    # -- losing workers -------------------------------------------------------------------

    def _check_liveness(self, now: float) -> None:
        if now < self._next_check:
            return
        self._next_check = now + 0.05  # a process check is a syscall: not every loop
        for worker in list(self.workers.values()):
            if worker.alive is not None and not worker.alive():
                self._lose(worker, "exited")
            elif now - worker.last_heard > self.lost_after_s:
                self._lose(worker, "silent")
        if self._slots:
            self._keep_local(now)

    def _keep_local(self, now: float) -> None:
        """Restart the supervised workers that exited, after their back-off."""
        with self._slots_lock:
            if self._closing:
                return
            for slot in self._slots:
                if slot.given_up:
                    continue
                if slot.proc is not None and slot.proc.poll() is not None:
                    self._exited(slot, now)
                if slot.proc is None and not slot.given_up and now >= slot.restart_at:
                    self._start(slot, now)

    def _exited(self, slot: _Slot, now: float) -> None:
        proc = slot.proc
        slot.proc = None
        # "why=exited code=-9" (killed from outside, e.g. the OOM killer), "why=silent
        # code=-9" (hung: killed by the pool), "why=exited code=1" (its error is above)
        slot.reason = f"{slot.killed or 'exited'} code={proc.returncode}"
        slot.killed = ""
        self._failed(slot, now, proc.pid)

    def _failed(self, slot: _Slot, now: float, pid: int | None) -> None:
        """A supervised process went (or did not start): back off, or give up on it."""
        policy = self.restart
        ran = now - slot.started
        if ran >= policy.stable_s:
            slot.tries = 0  # it ran long enough: this exit starts a new count
        slot.tries += 1
        if slot.tries > policy.max_tries:
            slot.given_up = True
            self.events["given_up"] += 1
            log.error("event=worker_given_up local=%d pid=%s why=%s tries=%d workers_left=%d "
                      "detail=\"it went %d times in a row within %.0f s of starting: serve "
                      "restarts it no more (fix the cause in its error above, then restart "
                      "serve)\"", slot.number, pid, slot.reason, policy.max_tries,
                      len(self.workers), slot.tries, policy.stable_s)
            return
        delay = policy.delay(slot.tries)
        slot.restart_at = now + delay
        log.warning("event=worker_exited local=%d pid=%s why=%s ran_s=%.1f restart_in_s=%.2f "
                    "try=%d", slot.number, pid, slot.reason, ran, delay, slot.tries)

    def _start(self, slot: _Slot, now: float) -> None:
        try:
            proc = self._spawn()
        except OSError as exc:  # e.g. out of memory or processes: a failed try, backed off
            slot.started, slot.reason = now, f"not_started error={str(exc)!r}"
            self._failed(slot, now, None)
            return
        slot.proc, slot.started = proc, now
        self.watch_process(proc.pid, lambda: proc.poll() is None)
        self.events["restarted"] += 1
        log.warning("event=worker_restarted local=%d pid=%d why=%s try=%d detail=\"its "
                    "sessions go to it with their next frame once it is ready\"", slot.number,
                    proc.pid, slot.reason, slot.tries)

    def _lose(self, worker: _Worker, why: str) -> None:
        """Forget ``worker``: its frames are lost, its sessions move with their next frame
        (their alignment state is gone: they start over on the new worker)."""
        if self.workers.pop(worker.ident, None) is None:
            return
        self._outbox.pop(worker.ident, None)  # queued frames are in route.in_engine too
        self._retired.update(worker.counters)
        routes = [self._by_handle[h] for h in worker.handles if h in self._by_handle]
        in_flight = sum(len(r.in_engine) for r in routes)
        for route in routes:
            self._unplace(route, "worker_lost")
        self.events["lost"] += 1
        self.events["sessions_moved"] += len(routes)
        log.warning("event=worker_lost worker=%s why=%s sessions=%d frames_lost=%d "
                    "workers_left=%d detail=\"its sessions go to other workers with their "
                    "next frame and start over there: their alignment state is lost\"",
                    worker.name, why, len(routes), in_flight, len(self.workers))
        if why == "silent" and worker.pid is not None:
            self._kill_hung(worker.pid)

    def _kill_hung(self, pid: int) -> None:
        """A supervised worker lost as silent while its process runs is hung (or stopped):
        kill it, so that it is restarted (a worker left alone would never come back)."""
        with self._slots_lock:
            if self._closing:
                return
            for slot in self._slots:
                if slot.proc is not None and slot.proc.pid == pid and slot.proc.poll() is None:
                    slot.killed = "silent"  # its reason once the kill is seen
                    slot.proc.kill()
                    log.warning("event=worker_killed local=%d pid=%d why=silent silent_s=%.1f",
                                slot.number, pid, self.lost_after_s)


def stop_processes(procs: list, timeout: float = 5.0) -> None:
    """SIGTERM each running process, wait up to ``timeout`` s, SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:  # it ignored SIGTERM
            proc.kill()
            proc.wait()


def _worker_authenticator(ctx: zmq.Context, keydir: Path) -> Any:
    """ZAP on the pool's context: only the public keys in ``KEYDIR/workers/`` may connect
    as workers (a client key must not: a worker receives every tenant's poses)."""
    from zmq.auth.thread import ThreadAuthenticator

    folder = keydir / "workers"
    if not folder.is_dir() or not any(folder.glob("*.key")):
        raise FileNotFoundError(f"--secure with workers on tcp: no worker keys in {folder} "
                                "(docs/serving.md, 'Workers on other hosts')")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("masa_rt.workers.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(folder))
    return auth

"""An engine worker: a :class:`engine.pipeline.Pipeline` in a process of its own, fed by
the server's :class:`engine.workers.WorkerPool` over one DEALER socket.

The loop: take every message the server sent (sessions opened and closed, frames), run
one batched ``pipeline.step`` round for the frames it has, send the answers back in one
message, repeat; when there is nothing to do, block on the socket until the server sends
something or a heartbeat is due. The worker never validates a client's input (the server
did) and never talks to a headset: it computes.

Heartbeats go both ways every ``heartbeat_s``. A server silent for ``server_lost_s`` (it
stopped, or restarted and forgot this worker) makes the worker drop its sessions and
register again (``ready``), so a worker on another host outlives server restarts; a local
worker started by ``masa-rt serve`` exits instead (``exit_with_server``), so none is left
behind. Wire format: :mod:`engine.worker_wire`.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from engine import worker_wire as W

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger("masa_rt.worker")


@dataclass(frozen=True)
class WorkerConfig:
    connect: str  # the server's worker endpoint (serve --worker-bind), e.g. tcp://host:5557
    heartbeat_s: float = 0.5
    server_lost_s: float = 3.0
    exit_with_server: bool = False  # local workers of `masa-rt serve`: go when it goes
    max_messages: int = 256  # drained per loop before the engine steps
    hwm: int = 10_000


class Worker:
    """Serve one pipeline to a WorkerPool until :meth:`request_stop` (or the server goes,
    with ``exit_with_server``). ``curve``: ``clients._sockets.CurveKeys`` for --secure."""

    def __init__(self, pipeline: Any, config: WorkerConfig, *, curve: Any = None,
                 info: dict | None = None) -> None:
        self.pipeline, self.config, self.curve = pipeline, config, curve
        self.info = info or {}  # model fingerprint, references, capacity: sent in "ready"
        # Sessions open here (pipeline ids are str(handle)) -> frames given to the pipeline
        # and not answered yet: while any are, the loop steps (an engine answers every frame).
        self.handles: dict[int, int] = {}
        self._stop = threading.Event()
        self._answered = False  # the last step answered something: step again at once
        self._heard = self._next_ping = 0.0
        self._sock: zmq.Socket | None = None
        # Pipelines that can stop after one round (engine.pipeline.Pipeline) are asked to, so
        # a session with a backlog never holds the answers of the others (as in the server).
        accepts = "max_rounds" in inspect.signature(pipeline.step).parameters
        self._step_kwargs = {"max_rounds": 1} if accepts else {}
        self._handlers = {"open": self._on_open, "close": self._on_close,
                          "frames": self._on_frames, "ping": self._on_ping,
                          "reset": self._on_reset}

    def request_stop(self) -> None:
        self._stop.set()

    def start_in_thread(self) -> threading.Thread:
        """Run in a daemon thread (tests); stop with :meth:`request_stop`."""
        thread = threading.Thread(target=self.run, name="masa-rt-worker", daemon=True)
        thread.start()
        return thread

    def run(self) -> int:
        """Serve until stopped; 0, or 3 when the server went away (``exit_with_server``)."""
        ctx = zmq.Context()
        self._sock = self._connect(ctx)
        log.info("event=worker_started connect=%s pid=%d sessions_max=%s", self.config.connect,
                 os.getpid(), self.info.get("capacity", "?"))
        try:
            self._sock.poll(1000, zmq.POLLOUT)  # connected (IMMEDIATE), so "ready" goes out
            self._register()
            while not self._stop.is_set():
                if self._server_gone():
                    return 3
                self._loop_once()
            return 0
        finally:
            self._close_all()
            self._sock.close(linger=0)
            ctx.term()

    def _connect(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        # Nothing queued while the server is away: a "ready" or pings kept for minutes
        # would reach the next server all at once, as registrations crossing each other.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.public
            sock.curve_secretkey = self.curve.secret
        sock.connect(self.config.connect)
        return sock

    def _register(self) -> None:
        """Tell the server what this worker runs; if it is not connected yet, the server
        asks again (``reset``) when the first ping reaches it."""
        ready = {"pid": os.getpid(), "host": socket.gethostname(), **self.info}
        self._send("ready", ready)
        self._heard = time.monotonic()
        log.debug("event=register connect=%s", self.config.connect)

    def _server_gone(self) -> bool:
        """Whether to stop: the server is silent too long and this worker goes with it.
        Otherwise a silent server costs this worker its sessions and a new ``ready``."""
        if time.monotonic() - self._heard <= self.config.server_lost_s:
            return False
        if self.handles or self.config.exit_with_server:  # else it is still waiting: quiet
            log.warning("event=server_lost silent_s=%.1f sessions=%d",
                        self.config.server_lost_s, len(self.handles))
        if self.config.exit_with_server:
            return True
        self._close_all()
        self._register()
        return False

    def _loop_once(self) -> None:
        busy = any(self.handles.values())
        # 1 ms, not 0, while an engine holds frames without answering: no busy spin.
        timeout = 0 if self._answered else 1 if busy else int(self.config.heartbeat_s * 1000)
        if self._sock.poll(timeout):
            self._drain()
        if self._answered or any(self.handles.values()):
            try:
                self._step()
            except Exception:  # noqa: BLE001 - an engine bug costs its sessions, not the worker
                log.exception("event=engine_error sessions=%d (registering again: the "
                              "server counts their frames worker_lost)", len(self.handles))
                self._close_all()
                self._register()
        now = time.monotonic()
        if now >= self._next_ping:
            self._send("ping", self._counters())
            self._next_ping = now + self.config.heartbeat_s

    def _drain(self) -> None:
        for _ in range(self.config.max_messages):
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard = time.monotonic()
            try:
                msg = W.decode(data)
                self._handlers[msg[0]](msg)
            except (W.WireError, KeyError, IndexError, TypeError, ValueError) as exc:
                log.warning("event=bad_server_message error=%s", exc)

    def _step(self) -> None:
        results = self.pipeline.step(**self._step_kwargs)
        self._answered = bool(results)
        rows = []
        for sid, seq, t, est in results:
            handle = int(sid)
            if handle in self.handles:
                self.handles[handle] = max(0, self.handles[handle] - 1)
            rows.append(W.estimate_row(handle, seq, t, est))
        if rows:
            self._send("answers", rows, None)

    def _send(self, *parts: Any) -> None:
        try:
            self._sock.send(W.encode(*parts), zmq.NOBLOCK)
        except zmq.Again:  # no server connected, or it stopped reading: it will ask again
            log.debug("event=not_sent kind=%s (no server reading)", parts[0])

    def _counters(self) -> dict | None:
        counters = getattr(getattr(self.pipeline, "bank", None), "counters", None)
        return {k: int(v) for k, v in counters.items()} if isinstance(counters, dict) else None

    # -- messages from the server ---------------------------------------------------------

    def _on_open(self, msg: list) -> None:
        _, handle, layout, fps, reference, declaration = msg
        extra = {"declaration": declaration} if declaration is not None else {}
        try:
            self.pipeline.open_session(str(handle), layout, fps, reference, **extra)
        except Exception as exc:  # noqa: BLE001 - any refusal goes back to the server
            log.warning("event=open_refused handle=%s error=%r", handle, str(exc))
            self._send("refused", handle, f"{type(exc).__name__}: {exc}")
            return
        self.handles[int(handle)] = 0

    def _on_close(self, msg: list) -> None:
        handle = int(msg[1])
        if self.handles.pop(handle, None) is not None:
            self.pipeline.close_session(str(handle))

    def _on_frames(self, msg: list) -> None:
        for row in msg[1]:
            handle = int(row[0])
            if handle in self.handles:  # else closed meanwhile: the server counted it
                self.pipeline.submit(str(handle), row[1], row[2], W.joints_of(row))
                self.handles[handle] += 1

    def _on_ping(self, msg: list) -> None:
        pass  # _drain noted the time

    def _on_reset(self, msg: list) -> None:
        # A new server (or one that took this worker for lost): a warning only if that
        # costs sessions; at start-up it is routine.
        log.log(logging.WARNING if self.handles else logging.INFO,
                "event=worker_reset sessions=%d (the server does not know this worker)",
                len(self.handles))
        self._close_all()
        self._register()

    def _close_all(self) -> None:
        for handle in list(self.handles):
            self.pipeline.close_session(str(handle))
        self.handles.clear()

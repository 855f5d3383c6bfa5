"""The masa-rt server: headsets stream poses in over ZeroMQ, estimates come back in real time.

One thread, one loop, no locks: poll the ROUTER with a short timeout, drain every queued
message (bounded per loop so a flood cannot starve the engine), validate each one with
:mod:`masa_rt.protocol`, hand accepted frames to the pipeline, then run ONE batched
``pipeline.step()`` for all sessions with a new frame and send each estimate back to its
headset's DEALER and out on the PUB socket (topic = session id) for dashboards.

Hostile input never crashes the loop: everything a peer can get wrong becomes an ``error``
reply with a :data:`masa_rt.protocol.REASONS` reason and a ``rejected[reason]`` count; an
accepted frame ends as an estimate or a ``dropped[reason]`` count, so every frame is
accounted for (see :mod:`engine.counters`). Session rules (hello/resume, sequence numbers,
expiry) follow ``docs/protocol.md``. This module never imports torch.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import zmq

from engine.counters import Counters, LatencyHistogram, LogLimiter, RejectionSummary, format_table
from engine.estimate_feed import EstimateFeed
from engine.security import apply_server_curve, plain_mode_warning, start_authenticator
from masa_rt import protocol as P

if TYPE_CHECKING:
    from engine.metrics import MetricsEndpoint
    from engine.recorder import SessionRecorder

__all__ = ["PipelineLike", "Server", "ServerConfig", "install_signal_handlers"]

log = logging.getLogger("masa_rt.server")



@dataclass(frozen=True)
class ServerConfig:
    """Where to listen and how much any one peer may cost the server."""

    bind: str = "tcp://127.0.0.1:5555"  # ROUTER: hello/frame/bye/ping/stats in, replies out
    pub_bind: str = "tcp://127.0.0.1:5556"  # PUB: every estimate, topic = session id
    max_sessions: int = 256
    # Sessions one client may hold at once ('too_many_sessions' beyond): with --secure the
    # client is its CURVE key, in plain mode its connection (routing id). ``max_sessions``
    # bounds the server; this keeps one client from taking every slot.
    max_sessions_per_client: int = 16
    # Protocol cap. libzmq's ZMQ_MAXMSGSIZE is set to ``zmq_size_factor`` times this, so a
    # moderately oversized message still arrives and gets a counted 'too_large' answer;
    # anything beyond that is cut by libzmq (the peer is disconnected) before buffering.
    max_message_bytes: int = P.MAX_MESSAGE_BYTES
    zmq_size_factor: int = 2
    rate_factor: float = 2.0  # frames/s a session may sustain, times its declared fps
    rate_burst_s: float = 1.0  # ... with bursts of this many seconds' worth of frames
    # Hellos one client (key with --secure, else connection) may send per second, with
    # bursts of ``hello_burst``; more are refused 'rate_limited'. A headset opens a session
    # or two and resumes after a reconnect; a client opening and closing sessions back to
    # back (11 k pairs/s) held another headset's answers at p99 23.5 ms against 3.6 ms quiet
    # (benchmarks/hello_churn.py).
    hello_rate: float = 10.0
    hello_burst: float = 20.0
    idle_timeout_s: float = 10.0  # a session silent this long (no frame/ping) expires
    # An accepted frame unanswered this long is dropped: 'engine_timeout' once in the
    # engine, 'stale' if it is still waiting for it (then it is never computed at all).
    in_flight_timeout_s: float = 2.0
    # A frame that reaches the server more than this much later than its session's usual
    # transit delay (capture -> receipt, a windowed minimum, so client clock offsets cancel)
    # waited in a queue on the way (libzmq's, the OS's): dropped as 'stale' on arrival,
    # never computed. Keeps an overloaded server from working off minutes-old frames.
    max_queue_delay_s: float = 2.0
    lag_window_s: float = 30.0  # the minimum transit delay is taken over 1-2 such windows
    # Frames one session may have in the engine at once; more are shed ('overloaded', with
    # seq). Bounds the engine backlog a burst or a flood within the rate limit can build
    # (each capture frame can make several model frames), so it cannot grow without end.
    max_in_flight: int = 32
    # Frames of one session handed to the engine ahead of their answers; the others wait
    # in the server, where a stale one can still be dropped before the engine spends work
    # on an answer that would come too late. 4: a 120 Hz headset on a 30 Hz model still
    # completes one model frame per loop.
    engine_depth: int = 4
    poll_ms: int = 5  # idle poll timeout; also bounds shutdown and expiry latency
    max_batch: int = 4096  # messages drained per loop before the engine steps
    # ... and at most this long: under overload a drain of ``max_batch`` messages would
    # hold every answer for 100+ ms; stepping between bounded drains keeps answers flowing.
    drain_budget_s: float = 0.02
    # Queued messages per peer, both directions. Small on purpose: a frame queued inside
    # libzmq is invisible to the staleness checks, and 64 peers x 10,000 frames was 3 GiB
    # of RSS in the 64 x 90 Hz load run. Beyond it libzmq pushes back over TCP and the
    # client's own send queue fills, where the client counts what it could not send.
    router_hwm: int = 256
    # Kernel socket buffers of the ROUTER's connections (SO_RCVBUF/SO_SNDBUF). Loopback TCP
    # autotunes to megabytes, thousands of frames queued where nothing can see or count
    # them; 64 KiB is ~1 s of a 90 Hz hand stream, so backpressure reaches the client fast.
    tcp_buffer_bytes: int = 65_536
    pub_hwm: int = 1_000  # per subscriber: a slow dashboard loses estimates, never blocks us
    sweep_s: float = 0.25  # how often idle sessions and stale frames are swept
    # Rejections are logged at DEBUG one by one and at INFO as one summary line per this
    # many seconds (by reason), so they show at the default level without flooding it.
    log_summary_s: float = 10.0
    # A seq gap wider than this (about 3 h at 90 Hz) is a client that renumbered, not
    # frames lost on the way: counted once as 'seq_jumps'. Summing such gaps as lost
    # frames overflowed the 64-bit counters and broke every later 'stats' reply.
    max_seq_gap: int = 1_000_000
    # Encoder rounds per loop, for pipelines whose step() takes ``max_rounds``: one round
    # answers every session's oldest frame; a backlogged session gets its next frame in the
    # next loop, so its backlog never holds the other sessions' answers. None: all rounds.
    step_rounds: int | None = 1
    keydir: str | None = None  # --secure KEYDIR: CURVE + ZAP allow-list; None = plain


class PipelineLike(Protocol):
    """What the server needs from the engine (``engine.pipeline.Pipeline`` or a test fake)."""

    def open_session(self, session_id: str, layout: str, fps: float,
                     reference: str | None = None, declaration: dict | None = None
                     ) -> dict: ...

    def close_session(self, session_id: str) -> None: ...

    def submit(self, session_id: str, seq: int, t: float, joints: np.ndarray) -> None: ...

    def step(self) -> list[tuple[str, int, float, Any]]: ...

    # Optional, for an engine in other processes (engine.workers.WorkerPool):
    # ``answers_socket``, a zmq socket polled beside the ROUTER (an answer wakes the loop);
    # ``lost_frames() -> [(session, seq, reason)]``, frames it will never answer (counted
    # ``dropped.<reason>``); ``counters() -> dict``, merged into ``stats``.


class TokenBucket:
    """Per-session rate limit: ``rate`` frames/s on average, ``burst`` frames at once.

    A token bucket (not a fixed window) so a headset that catches up after a Wi-Fi stall
    is not punished, while a flooding one is held to ``rate`` without costing the others.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TransitDelay:
    """Windowed minimum of ``t_recv - t_capture`` of one session's frames.

    The minimum is the client's clock offset plus the fastest transit; how far a frame lies
    above it is how long it sat in a queue on the way. The minimum is taken over the current
    and the previous window, so a clock that drifts or jumps costs at most two windows of
    'stale' refusals instead of every later frame. The window does not move while the server
    has a backlog (``rotate=False``): a standing queue must not become the new baseline (the
    64 x 90 Hz load run crept from 2 to 9 s capture -> answer latency that way)."""

    def __init__(self, window_s: float, now: float) -> None:
        self.window_s = window_s
        self.rotate_at = now + window_s
        self.previous = self.current = math.inf

    def queued_for(self, lag: float, now: float, rotate: bool = True) -> float:
        """Record one frame's lag; return its queueing delay (>= 0)."""
        if rotate and now >= self.rotate_at:
            self.previous, self.current = self.current, math.inf
            self.rotate_at = now + self.window_s
        self.current = min(self.current, lag)
        return lag - min(self.current, self.previous)


@dataclass(frozen=True)
class Peer:
    """Who sent a message: where to answer (``ident``) and who it is (``key``)."""

    ident: bytes  # routing id of the connection
    # The client a session belongs to: its CURVE public key (ZAP User-Id) with --secure,
    # else the connection's routing id (plain mode authenticates nobody).
    key: bytes


@dataclass
class Session:
    """One headset stream: where to answer it, what it promised, what it is owed."""

    id: str
    # Routing id of the connection that last opened, resumed or fed it: where answers go
    # when the connection that sent their frame is gone (see _emit).
    identity: bytes
    owner: bytes  # Peer.key of the client that opened (or, in plain mode, resumed) it
    layout: str
    fps: float
    shape: tuple[int, int]
    bucket: TokenBucket
    last_seen: float
    info: dict = field(default_factory=dict)  # what open_session said (model, window, ...)
    last_seq: int = -1
    # Capture time of the last accepted frame: a frame's ``t`` must exceed it, or the
    # resampler would drop the frame without an answer ('out_of_order' instead).
    last_t: float = -math.inf
    counters: Counters = field(default_factory=Counters)
    # seq -> (t_server_recv, routing id of the connection that sent it: the answer's way)
    in_flight: dict[int, tuple[float, bytes]] = field(default_factory=dict)
    # Accepted frames not yet handed to the engine (a subset of in_flight), oldest first.
    pending: deque[tuple[int, float, np.ndarray]] = field(default_factory=deque)
    lag: TransitDelay | None = None  # capture -> receipt delay, to spot queued frames
    # Highest seq above last_seq that was refused (shed, bad shape, rate limited, ...):
    # those frames arrived, so the next accepted one does not count them as lost.
    refused_seq: int = -1

    @property
    def in_engine(self) -> int:
        return len(self.in_flight) - len(self.pending)


class Server:
    """ROUTER + PUB front end of a pipeline. Use :meth:`run` (blocking) or
    :meth:`start_in_thread` / :meth:`stop` (tests, demo, bench)."""

    def __init__(self, pipeline: PipelineLike, config: ServerConfig | None = None, *,
                 clock: Callable[[], float] = time.perf_counter,
                 recorder: SessionRecorder | None = None,
                 metrics: MetricsEndpoint | None = None) -> None:
        self.pipeline = pipeline
        self.recorder = recorder  # --record DIR: accepted frames to files (engine.recorder)
        self.metrics = metrics  # --metrics HOST:PORT: stats for Prometheus (engine.metrics)
        self.config = config or ServerConfig()
        self.clock = clock  # perf_counter: the clients' local_clock, so loopback needs no offset
        self.counters = Counters()
        self.latency = LatencyHistogram()
        self.sessions: dict[str, Session] = {}
        self._owned: Counter[bytes] = Counter()  # Peer.key -> sessions it holds
        self._hellos: dict[bytes, TokenBucket] = {}  # Peer.key -> its hello allowance
        self._bound = self.config.keydir is not None  # sessions bound to their CURVE key
        self.address: str | None = None  # actual endpoints once bound (port 0 / '*' resolved)
        self.pub_address: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._final: dict | None = None
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._auth = None  # ZAP authenticator thread in --secure mode
        self._pub: zmq.Socket | None = None
        self._estimates: EstimateFeed | None = None
        self._in_flight = 0
        self._engine_busy = True
        self._backlogged = False  # True while the last drain stopped with messages still queued
        self._logs = LogLimiter(log)  # session events and refusals a peer can repeat at will
        self._summary = RejectionSummary(log, self.config.log_summary_s, self.clock())
        self._next_sweep = 0.0
        # Pipelines that can stop after a few rounds (engine.pipeline.Pipeline) are asked
        # to; a pipeline whose step() takes no argument (a test fake) is called as is.
        accepts = "max_rounds" in inspect.signature(pipeline.step).parameters
        self._step_kwargs = {"max_rounds": self.config.step_rounds} if accepts else {}
        self._poller: zmq.Poller | None = None  # ROUTER + the engine's answers_socket, if any
        self._handlers = {"hello": self._on_hello, "frame": self._on_frame, "bye": self._on_bye,
                          "ping": self._on_ping, "stats": self._on_stats}

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> dict:
        """Serve until :meth:`request_stop`; return the final ``stats`` (counters, latency)."""
        try:
            self._open_sockets()
        except BaseException as exc:
            self._error = exc
            self._close_sockets()  # a failed bind must not leave libzmq's threads running
            self._ready.set()
            raise
        self._ready.set()
        log.info("event=serving bind=%s pub=%s max_sessions=%d", self.address,
                 self.pub_address, self.config.max_sessions)
        try:
            while not self._stop.is_set():
                try:
                    self._loop_once()
                except Exception:  # noqa: BLE001 - last line of defence: log, keep serving
                    log.exception("event=loop_error")
                    self.counters.loop_errors += 1
        finally:
            self._account_at_stop()
            if self.recorder is not None:  # write the sessions still open
                self.recorder.stop()
            self._final = self.stats()
            if self.metrics is not None:
                self.metrics.publish(self._final)
            self._close_sockets()
            log.info("event=stopped frames_in=%d estimates_out=%d rejected=%d dropped=%d",
                     self.counters.frames_in, self.counters.estimates_out,
                     sum(self.counters.rejected.values()), sum(self.counters.dropped.values()))
        return self._final

    def request_stop(self) -> None:
        """Ask the loop to exit (signal-handler safe: it only sets a flag)."""
        self._stop.set()

    def start_in_thread(self, timeout: float = 10.0) -> Server:
        """Run in a daemon thread; return once bound (raise what binding raised)."""
        self._thread = threading.Thread(target=self._run_quietly, name="masa-rt-server",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> dict:
        """Stop the thread started by :meth:`start_in_thread`; return the final stats."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"server thread did not stop within {timeout} s")
        return self._final if self._final is not None else self.stats()

    def __enter__(self) -> Server:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:  # noqa: BLE001 - reported through start_in_thread / logs
            if self._ready.is_set() and self._error is None:
                log.exception("event=server_crashed")

    def _open_sockets(self) -> None:
        cfg = self.config
        self._ctx = zmq.Context()
        self._router = self._socket(zmq.ROUTER, cfg.router_hwm)
        self._router.setsockopt(zmq.RCVBUF, cfg.tcp_buffer_bytes)
        self._router.setsockopt(zmq.SNDBUF, cfg.tcp_buffer_bytes)
        # Mandatory routing: a send to a vanished peer or a full pipe raises instead of
        # vanishing silently, so every undelivered estimate is counted in dropped[reason].
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes * cfg.zmq_size_factor)
        # Under --secure each key reads only its own sessions' estimates, operators all.
        self._estimates = EstimateFeed(self._ctx, cfg.pub_hwm, is_operator=(
            (lambda key: self._auth is not None and self._auth.is_operator(key))
            if cfg.keydir is not None else None))
        self._pub = self._estimates.socket
        if cfg.keydir is not None:
            # The authenticator must run before bind, or libzmq admits any CURVE client.
            for sock in (self._router, self._pub):
                apply_server_curve(sock, cfg.keydir)
            self._auth = start_authenticator(self._ctx, cfg.keydir)
        else:
            for endpoint in (cfg.bind, cfg.pub_bind):
                plain_mode_warning(endpoint, log)
        self.address = _bind(self._router, cfg.bind)
        self.pub_address = _bind(self._pub, cfg.pub_bind)

    def _socket(self, kind: int, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)  # never hang shutdown on a peer that stopped reading
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        return sock

    def _close_sockets(self) -> None:
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:  # before term(), or term() hangs on the ZAP socket
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
        self._router = self._pub = self._ctx = None

    # ------------------------------------------------------------------ the loop

    def _loop_once(self) -> None:
        """Poll, drain, step once, sweep. A short poll bounds shutdown and sweep delay."""
        timeout = 0 if self._in_flight and self._engine_busy else self.config.poll_ms
        requests, answers = self._wait(timeout)
        if requests:
            self._drain()
        self._estimates.drain_subscriptions()  # --secure: who may read which estimates
        if self._in_flight or answers:
            self._feed(self.clock())
            self._step()
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
            self._summary.maybe_log(self.counters.rejected, now)
            if self.metrics is not None:  # a scrape reads this snapshot, never the loop
                self.metrics.publish(self.stats())
            self._next_sweep = now + self.config.sweep_s

    def _wait(self, timeout: int) -> tuple[bool, bool]:
        """Wait up to ``timeout`` ms for client messages or, with an engine in other
        processes, its answers (either wakes the loop: no answer waits out a poll)."""
        answers = getattr(self.pipeline, "answers_socket", None)
        if answers is None:
            return bool(self._router.poll(timeout)), False
        if self._poller is None:
            self._poller = zmq.Poller()
            self._poller.register(self._router, zmq.POLLIN)
            self._poller.register(answers, zmq.POLLIN)
        ready = dict(self._poller.poll(timeout))
        return self._router in ready, answers in ready

    def _drain(self) -> None:
        """Handle queued messages without blocking, up to ``max_batch`` or ``drain_budget_s``.

        ``_backlogged`` is set at the end, from this drain: it says whether the *previous*
        drain stopped with messages still queued, and only then are frames shed on arrival
        and the transit-delay window held (set before the loop, it was True for every
        message, and one clock step of a client made its frames 'stale' for good)."""
        end = self.clock() + self.config.drain_budget_s
        ran_dry = False
        try:
            for i in range(self.config.max_batch):
                if i % 16 == 15 and self.clock() > end:
                    return
                try:
                    # --secure needs the frames (not bytes) for their ZAP User-Id property.
                    parts = self._router.recv_multipart(zmq.NOBLOCK, copy=not self._bound)
                except zmq.Again:
                    ran_dry = True
                    return
                user = None
                if self._bound:
                    user = parts[-1].get("User-Id")
                    parts = [p.bytes for p in parts]
                self._handle(parts, self.clock(), user)
        finally:
            self._backlogged = not ran_dry

    def _handle(self, parts: list[bytes], t_recv: float, user: str | None = None) -> None:
        """Validate and dispatch one message; nothing raised here escapes the loop.

        ``user``: the ZAP User-Id of the connection (the client's Z85 public key) with
        --secure; sessions are then bound to it, else to the connection's routing id."""
        self.counters.messages_in += 1
        ident = parts[0]
        peer = Peer(ident, user.encode() if user else ident)
        try:
            if len(parts) != 2:
                raise P.ProtocolError("malformed", f"expected 1 frame, got {len(parts) - 1}")
            if len(parts[1]) > self.config.max_message_bytes:
                raise P.ProtocolError("too_large", f"{len(parts[1])} bytes")
            raw = P.unpack(parts[1])
            if self._backlogged and self._shed_on_arrival(peer, raw, t_recv):
                return
            msg = P.validate(raw)
            handler = self._handlers.get(msg["type"])
            if handler is None:
                raise P.ProtocolError("unknown_type", f"{msg['type']!r} is a server message")
            handler(peer, msg, t_recv)
        except P.ProtocolError as exc:
            # A frame refused while decoding (inf joints, a NaN stamp, a bad dtype, ...) still
            # names its seq and session when those fields are valid (``decode`` fills them):
            # the reply must carry them, or the client takes an error without seq for the end
            # of its session (docs/protocol.md, "Error reasons") instead of one bad frame.
            session = self.sessions.get(exc.session) if exc.session is not None else None
            if session is not None and exc.seq is not None and exc.seq > session.last_seq and (
                    not self._bound or peer.key == session.owner):
                # Refused while decoding (bad dtype, non-finite joints): it arrived, so the
                # next accepted frame must not count it as lost (issue 31: 7 lost, not 5).
                session.refused_seq = max(session.refused_seq, exc.seq)
            self._reject(ident, exc.reason, exc.detail, seq=exc.seq, session=session,
                         session_id=exc.session)
        except Exception as exc:  # noqa: BLE001 - a server bug must not take everyone down
            log.exception("event=internal_error")
            self._reject(ident, "internal", type(exc).__name__)

    def _reject(self, ident: bytes, reason: str, detail: str = "", *, seq: int | None = None,
                session: Session | None = None, session_id: str | None = None) -> None:
        """Count a rejection and tell the peer why (best effort: it may be gone).

        ``session_id`` names a session the server may not hold (a frame refused while
        decoding); ``session``, when held, also counts the rejection against it."""
        self.counters.rejected[reason] += 1
        if session is not None:
            session.counters.rejected[reason] += 1
            session_id = session.id
        log.debug("event=rejected reason=%s detail=%r seq=%s", reason, detail, seq)
        reply = P.error(reason, detail, seq=seq, session=session_id)
        if self._send(ident, P.encode(reply)) is not None:
            self.counters.replies_unsent += 1
            if session is not None:
                session.counters.replies_unsent += 1

    def _send(self, ident: bytes, data: bytes) -> str | None:
        """Send to one peer without blocking; return a drop reason or None if sent."""
        try:
            self._router.send_multipart([ident, data], zmq.NOBLOCK)
            return None
        except zmq.Again:
            return "send_hwm"  # the peer is not reading: its pipe is full
        except zmq.ZMQError as exc:
            return "unroutable" if exc.errno == zmq.EHOSTUNREACH else "send_failed"

    # ------------------------------------------------------------------ messages

    def _on_hello(self, peer: Peer, msg: dict, t_recv: float) -> None:
        """Open, resume or restart a session (rules: docs/protocol.md, "Sessions")."""
        self._check_hello_rate(peer.key, t_recv)
        sid = msg["session"]
        old = self.sessions.get(sid)
        if old is not None:
            self._check_owner(old, peer, "hello")  # resume and restart alike
        resumed = old is not None and msg["resume"]
        if resumed:
            if old.layout != msg["layout"]:
                raise P.ProtocolError("wrong_layout", f"session {sid} has layout {old.layout}")
            self._resume(old, peer, msg["fps"], t_recv)
            session = old
        else:
            if old is None or old.owner != peer.key:  # restarting one's own takes no new slot
                self._check_quota(peer.key)
            if old is not None:
                self._close(old, "restarted")
            elif len(self.sessions) >= self.config.max_sessions:
                raise P.ProtocolError("overloaded", f"max_sessions={self.config.max_sessions}")
            session = self._open(peer, msg, t_recv)
        self._logs.log(logging.INFO, "session_open",
                       "event=session_%s session=%s layout=%s fps=%g last_seq=%d",
                       "resume" if resumed else "open", sid, session.layout, session.fps,
                       session.last_seq)
        self._send(peer.ident, P.encode(self._welcome(session, resumed)))

    def _check_hello_rate(self, key: bytes, now: float) -> None:
        """At most ``hello_rate`` hellos/s per client ('rate_limited'), so opening and
        closing sessions back to back cannot take the loop from the streaming headsets."""
        bucket = self._hellos.get(key)
        if bucket is None:
            bucket = self._hellos[key] = TokenBucket(self.config.hello_rate,
                                                     self.config.hello_burst, now)
        if not bucket.take(now):
            raise P.ProtocolError("rate_limited", f"over {self.config.hello_rate:g} hellos/s "
                                                  "from this client")

    def _check_owner(self, s: Session, peer: Peer, what: str, seq: int | None = None) -> None:
        """With --secure, only the key that opened a session may use it ('session_owner').

        Plain mode authenticates nobody, so any connection may feed, resume or close any
        session (a headset that reconnected has a new routing id and must get it back)."""
        if not self._bound or peer.key == s.owner:
            return
        self._logs.log(logging.WARNING, "session_owner",
                       "event=session_owner session=%s message=%s client_key=%s", s.id, what,
                       peer.key.decode("ascii", "replace"))
        exc = P.ProtocolError("session_owner", f"session {s.id} belongs to another client")
        exc.seq, exc.session = seq, s.id  # a frame's refusal names its seq (client streams on)
        raise exc

    def _check_quota(self, key: bytes) -> None:
        """One client holds at most ``max_sessions_per_client`` sessions at once."""
        limit = self.config.max_sessions_per_client
        if self._owned[key] >= limit:
            self._logs.log(logging.WARNING, "too_many_sessions",
                           "event=too_many_sessions client=%s held=%d",
                           key.decode("ascii", "replace"), self._owned[key])
            raise P.ProtocolError("too_many_sessions", f"max_sessions_per_client={limit}")

    def _resume(self, s: Session, peer: Peer, fps: float, t_recv: float) -> None:
        """Keep the alignment state; take the (maybe new) connection and declared rate."""
        if peer.key != s.owner:  # plain mode: a reconnected headset takes its session along
            self._check_quota(peer.key)
            self._set_owner(s, peer.key)
        s.identity, s.last_seen = peer.ident, t_recv
        if fps != s.fps:
            s.fps = fps
            s.bucket = self._bucket(fps, t_recv)
        self.counters.sessions_resumed += 1

    def _set_owner(self, s: Session, key: bytes | None) -> None:
        """Move ``s`` to ``key``'s quota (None: the session is gone)."""
        self._owned[s.owner] -= 1
        if self._owned[s.owner] <= 0:
            del self._owned[s.owner]  # connections come and go: keep the map small
        if key is not None:
            s.owner = key
            self._owned[key] += 1

    def _bucket(self, fps: float, now: float) -> TokenBucket:
        rate = self.config.rate_factor * fps
        return TokenBucket(rate, max(8.0, rate * self.config.rate_burst_s), now)

    def _open(self, peer: Peer, msg: dict, t_recv: float) -> Session:
        try:
            # a declared layout (masa_rt.layout_file) is passed only where one came
            declared = ({"declaration": msg["layout_declaration"]}
                        if msg.get("layout_declaration") is not None else {})
            info = self.pipeline.open_session(msg["session"], msg["layout"], msg["fps"],
                                              msg["reference"], **declared)
        except P.ProtocolError:
            raise
        except (KeyError, ValueError) as exc:
            raise P.ProtocolError(_open_reason(exc), str(exc)) from None
        session = Session(
            id=msg["session"], identity=peer.ident, owner=peer.key, layout=msg["layout"],
            fps=msg["fps"], shape=tuple(info["shape"]), info=info, last_seen=t_recv,
            bucket=self._bucket(msg["fps"], t_recv))
        self.sessions[session.id] = session
        if self.recorder is not None:  # the tenant is the CURVE key; plain mode has none
            self.recorder.opened(session.id, session.layout, session.fps, session.shape,
                                 peer.key if self._bound else None, msg["reference"])
        self._owned[peer.key] += 1
        self.counters.sessions_opened += 1
        return session

    def _welcome(self, s: Session, resumed: bool) -> dict:
        info = s.info
        return P.welcome(s.id, self.clock(), model=str(info.get("model", "unknown")),
                         references=list(info.get("references", [])), fps=s.fps,
                         layout=s.layout, shape=s.shape, window=int(info.get("window", 0)),
                         last_seq=s.last_seq, resumed=resumed,
                         session_timeout=self.config.idle_timeout_s,
                         lookahead_s=float(info.get("lookahead_s", 0.0)),
                         model_layout=info.get("model_layout"))

    def _session_of(self, sid: str) -> Session:
        """The session ``sid``, else 'unknown_session' without seq: the client answers with
        a resume hello (docs/protocol.md, "Sessions")."""
        s = self.sessions.get(sid)
        if s is None:
            raise P.ProtocolError("unknown_session", f"{sid}: send hello first")
        return s

    def _on_frame(self, peer: Peer, msg: dict, t_recv: float) -> None:
        s = self._session_of(msg["session"])
        seq, joints = msg["seq"], msg["joints"]
        # Before anything else: another key's frame must neither keep the session alive
        # nor learn its last seq from a 'duplicate' / 'out_of_order' answer.
        self._check_owner(s, peer, "frame", seq)
        s.last_seen = t_recv
        reason = self._frame_problem(s, seq, msg["t"], joints, t_recv, self.config.max_in_flight)
        if reason is not None:
            if seq > s.last_seq:  # validated, in order: it arrived, so it is not lost
                s.refused_seq = max(s.refused_seq, seq)
            self._reject(peer.ident, reason[0], reason[1], seq=seq, session=s)
            return
        if self._shed_if_queued(peer, s, seq, msg["t"], t_recv):
            return  # not backlogged, so it was validated first: every other reason wins
        # Answers go to the connection the frame came from: after a TCP reconnect (new
        # routing id) the headset gets estimates again with its very next frame. Only an
        # *accepted* frame moves the return path: a refused one (a stale duplicate, or
        # another peer replaying the session's seq) must not divert the session's
        # estimates away from its headset (tests/test_hostile.py).
        s.identity = peer.ident
        self._count_gap(s, seq)
        s.last_seq, s.last_t = seq, msg["t"]
        self.counters.frames_in += 1
        s.counters.frames_in += 1
        # Queued here, not in the engine: _feed hands it over when the session's earlier
        # frames are answered, unless it has gone stale by then.
        s.pending.append((seq, msg["t"], joints))
        s.in_flight[seq] = (t_recv, peer.ident)
        self._in_flight += 1
        if self.recorder is not None:
            self.recorder.frame(s.id, msg["t"], joints)

    def _count_gap(self, s: Session, seq: int) -> None:
        """Frames the client numbered that never arrived (shed ones did arrive)."""
        seen = max(s.last_seq, s.refused_seq) if s.refused_seq < seq else s.last_seq
        gap = seq - seen - 1
        if seen < 0 or gap <= 0:
            return
        if gap > self.config.max_seq_gap:
            self.counters.seq_jumps += 1
            s.counters.seq_jumps += 1
            return
        self.counters.frames_lost += gap
        s.counters.frames_lost += gap

    @staticmethod
    def _frame_problem(s: Session, seq: int, t: float, joints: np.ndarray, now: float,
                       max_in_flight: int) -> tuple[str, str] | None:
        """Why this frame cannot be accepted, as (reason, detail), or None."""
        if seq == s.last_seq:
            return "duplicate", f"seq {seq} already accepted"
        if seq < s.last_seq:
            return "out_of_order", f"seq {seq} < last accepted {s.last_seq}"
        if not t > s.last_t:
            return "out_of_order", f"capture time {t!r} not after the last accepted {s.last_t!r}"
        if joints.shape != s.shape:
            return "bad_shape", f"joints {list(joints.shape)} != {list(s.shape)} for {s.layout}"
        if not s.bucket.take(now):
            return "rate_limited", f"over {s.bucket.rate:g} frames/s"
        if len(s.in_flight) >= max_in_flight:
            return "overloaded", f"{len(s.in_flight)} frames of this session in the engine"
        return None

    def _shed_on_arrival(self, peer: Peer, raw: Any, t_recv: float) -> bool:
        """Refuse, from its header alone, a frame that sat in a queue on the way longer than
        ``max_queue_delay_s``: 'overloaded' (shed under load, an existing reason) with its
        seq. Its answer would come too late, and an overloaded server must shed for much
        less than it costs to serve, or the queue never drains (64 x 90 Hz load run: with
        full validation first, every frame after the first seconds was stale). Used only
        while the server has a backlog; otherwise frames are validated first and the same
        check runs after every other frame rule, so a malformed or out-of-order frame gets
        its own reason. Anything not a well-formed, in-order frame of a session the sender
        owns takes the normal path."""
        if not isinstance(raw, dict) or raw.get("type") != "frame":
            return False
        s = self.sessions.get(raw.get("session")) if isinstance(raw.get("session"), str) else None
        seq, t = raw.get("seq"), raw.get("t")
        if (s is None or (self._bound and peer.key != s.owner) or type(seq) is not int
                or not s.last_seq < seq <= P.MAX_SEQ or type(t) is not float
                or not math.isfinite(t) or not t > s.last_t):
            return False
        s.last_seen = t_recv
        return self._shed_if_queued(peer, s, seq, t, t_recv)

    def _shed_if_queued(self, peer: Peer, s: Session, seq: int, t: float, t_recv: float) -> bool:
        """Refuse (``overloaded``, with seq) a frame that queued on the way too long."""
        if s.lag is None:
            s.lag = TransitDelay(self.config.lag_window_s, t_recv)
        queued = s.lag.queued_for(t_recv - t, t_recv, rotate=not self._backlogged)
        if queued <= self.config.max_queue_delay_s:
            return False
        # Not last_seq: the frame was never validated, and a hostile seq must not move the
        # session's ordering (fuzz: one shed frame with a huge seq made every later frame
        # 'out_of_order'). Only the loss count skips it: it arrived.
        s.refused_seq = max(s.refused_seq, seq)
        self.counters.queued_too_long += 1
        s.counters.queued_too_long += 1
        self._reject(peer.ident, "overloaded", f"stale: queued {queued:.2f} s on the way",
                     seq=seq, session=s)
        return True

    def _on_bye(self, peer: Peer, msg: dict, t_recv: float) -> None:
        s = self._session_of(msg["session"])
        self._check_owner(s, peer, "bye")
        self._close(s, "bye")

    def _on_ping(self, peer: Peer, msg: dict, t_recv: float) -> None:
        s = self.sessions.get(msg["session"]) if msg["session"] else None
        if s is not None and (not self._bound or peer.key == s.owner):
            s.last_seen = t_recv  # a heartbeat keeps a paused headset's session alive
        self._send(peer.ident, P.encode(P.pong(msg["client_time"], self.clock())))

    def _on_stats(self, peer: Peer, msg: dict, t_recv: float) -> None:
        if msg["session"] is None:
            reply = self.stats()
        else:
            s = self._session_of(msg["session"])
            self._check_owner(s, peer, "stats")
            reply = {"counters": {**s.counters.flat(), "last_seq": s.last_seq},
                     "latency": None}
        self._send(peer.ident, P.encode(P.stats_reply(self.clock(), reply["counters"],
                                                      reply["latency"], msg["session"])))

    def stats(self) -> dict:
        """Whole-server counters (flat) and latency histogram, as sent in ``stats_reply``."""
        counters = {**self.counters.flat(), "sessions_active": len(self.sessions)}
        # The resampler's discontinuities (engine.streams.StreamBank.counters), when the
        # pipeline has a stream bank (engine.pipeline.Pipeline does; test fakes do not).
        bank_counters = getattr(getattr(self.pipeline, "bank", None), "counters", None)
        if isinstance(bank_counters, dict):
            counters.update({f"streams.{k}": int(v) for k, v in sorted(bank_counters.items())})
        if self.recorder is not None:
            counters.update(self.recorder.counters())
        if self._auth is not None:  # --secure: handshakes allowed and denied (ZAP)
            counters.update(self._auth.counters())
        if self._estimates is not None:
            counters.update(self._estimates.counters())
        engine_counters = getattr(self.pipeline, "counters", None)
        if callable(engine_counters):  # engine.workers.WorkerPool: workers.*, streams.*
            counters.update(engine_counters())
        return {"counters": counters, "latency": self.latency.to_wire()}

    # ------------------------------------------------------------------ engine

    def _feed(self, now: float) -> None:
        """Hand each session's waiting frames to the engine, up to ``engine_depth`` at once.

        A frame that already waited ``in_flight_timeout_s`` is dropped ('stale') instead:
        its answer would come too late to use, and computing it would delay the fresh
        frames behind it further (a backlog would feed itself)."""
        depth, deadline = self.config.engine_depth, now - self.config.in_flight_timeout_s
        for s in self.sessions.values():
            self._drop_stale(s, deadline)
            while s.pending and s.in_engine < depth:
                seq, t, joints = s.pending.popleft()
                self.pipeline.submit(s.id, seq, t, joints)

    def _drop_stale(self, s: Session, deadline: float) -> None:
        """Drop waiting frames received before ``deadline`` (oldest first: stop at a fresh one)."""
        while s.pending and s.in_flight[s.pending[0][0]][0] < deadline:
            seq = s.pending.popleft()[0]
            del s.in_flight[seq]
            self._in_flight -= 1
            self._count_drop(s, "stale")

    def _step(self) -> None:
        """One batched engine step for every session with a new frame; send the answers."""
        try:
            results = self.pipeline.step(**self._step_kwargs)
        except Exception:  # noqa: BLE001 - the engine failing drops frames, not the server
            log.exception("event=engine_error in_flight=%d", self._in_flight)
            for s in self.sessions.values():
                self._drop_in_flight(s, "engine_error")
            return
        # Nothing back although frames are in flight: do not spin on poll(0); the sweep
        # drops frames the engine never answers (in_flight_timeout_s).
        self._engine_busy = bool(results)
        self._drop_lost()  # before the answers: a newer answer would call them superseded
        for sid, seq, t_capture, est in results:
            self._emit(sid, seq, t_capture, est)

    def _drop_lost(self) -> None:
        """Frames an engine in other processes will never answer (a worker died), each
        counted ``dropped.<reason>`` unless already dropped meanwhile."""
        lost_frames = getattr(self.pipeline, "lost_frames", None)
        for sid, seq, reason in lost_frames() if lost_frames is not None else ():
            s = self.sessions.get(sid)
            if s is not None and s.in_flight.pop(seq, None) is not None:
                self._in_flight -= 1
                self._count_drop(s, reason)

    def _emit(self, sid: str, seq: int, t_capture: float, est: Any) -> None:
        s = self.sessions.get(sid)
        sent = s.in_flight.pop(seq, None) if s is not None else None
        if sent is None:
            return  # the session closed or restarted meanwhile: already counted as dropped
        t_recv, sender = sent
        self._in_flight -= 1
        self._drop_older(s, seq)
        t_send = self.clock()
        try:
            data = P.encode(_estimate_msg(s.id, seq, t_capture, est, t_recv, t_send))
        except P.ProtocolError as exc:  # e.g. a NaN progress from the engine: a bug, counted
            log.warning("event=bad_estimate session=%s seq=%d detail=%r", sid, seq, str(exc))
            self._count_drop(s, "bad_estimate")
            return
        # The routing rule (docs/protocol.md, "Sockets"): an estimate goes to the connection
        # that sent its frame, so a peer that resumes a session cannot take the answers to
        # frames another connection sent. Only if that connection is gone (the headset
        # reconnected) does it go to the session's current one, which under --secure is
        # the same key by construction.
        dropped = self._send(sender, data)
        if dropped == "unroutable" and s.identity != sender:
            dropped = self._send(s.identity, data)
        self._publish(s, data)
        if dropped is not None:
            self._count_drop(s, dropped)
            return
        self.latency.record((self.clock() - t_recv) * 1e6)
        self.counters.estimates_out += 1
        s.counters.estimates_out += 1

    def _publish(self, s: Session, data: bytes) -> None:
        if self._estimates.publish(s.id, s.owner, data):
            self.counters.published += 1
        else:
            self.counters.dropped["publish_failed"] += 1

    def _drop_older(self, s: Session, seq: int) -> None:
        """Frames the engine skipped (it answered a newer one) are dropped: 'superseded'."""
        older = [q for q in s.in_flight if q < seq]
        for q in older:
            del s.in_flight[q]
            self._in_flight -= 1
            self._count_drop(s, "superseded")

    def _drop_in_flight(self, s: Session, reason: str) -> None:
        for _ in range(len(s.in_flight)):
            self._count_drop(s, reason)
        self._in_flight -= len(s.in_flight)
        s.in_flight.clear()
        s.pending.clear()  # waiting frames are in in_flight too: counted above

    def _count_drop(self, s: Session, reason: str) -> None:
        self.counters.dropped[reason] += 1
        s.counters.dropped[reason] += 1

    # ------------------------------------------------------------------ housekeeping

    def _close(self, s: Session, why: str) -> None:
        self._drop_in_flight(s, "session_closed")
        del self.sessions[s.id]
        if self.recorder is not None:
            self.recorder.closed(s.id, why)
        self._set_owner(s, None)  # frees a slot of its client's max_sessions_per_client
        try:
            self.pipeline.close_session(s.id)
        except Exception:  # noqa: BLE001 - a failed cleanup must not keep the session
            log.exception("event=close_failed session=%s", s.id)
        if why == "expired":
            self.counters.sessions_expired += 1
        else:
            self.counters.sessions_closed += 1
        self._logs.log(logging.INFO, "session_close",
                       "event=session_close session=%s why=%s frames_in=%d estimates_out=%d",
                       s.id, why, s.counters.frames_in, s.counters.estimates_out)

    def _sweep(self, now: float) -> None:
        """Expire silent sessions; drop frames waited on too long (a stalled engine feeds
        nothing, so waiting frames are dropped here too, not only in _feed)."""
        if getattr(self.pipeline, "answers_socket", None) is not None:
            self._step()  # an engine in other processes: heartbeats, lost workers, when idle
        refilled = self.config.hello_burst / self.config.hello_rate
        for key in [k for k, b in self._hellos.items() if now - b.stamp > refilled]:
            del self._hellos[key]  # full again: forget it (connections come and go)
        for s in list(self.sessions.values()):
            if now - s.last_seen > self.config.idle_timeout_s:
                self._close(s, "expired")
                continue
            deadline = now - self.config.in_flight_timeout_s
            self._drop_stale(s, deadline)
            # What is left before the deadline is in the engine (same test as _drop_stale,
            # so no waiting frame is taken for one).
            late = [q for q, (t, _sender) in s.in_flight.items() if t < deadline]
            for q in late:
                del s.in_flight[q]
                self._in_flight -= 1
                self._count_drop(s, "engine_timeout")

    def _account_at_stop(self) -> None:
        """Nothing lost silently at shutdown: frames still queued in libzmq or waiting for
        the engine are counted as dropped ('shutdown'), the queue read without blocking."""
        for _ in range(self.config.max_batch * 16):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError, AttributeError):
                break
            self.counters.messages_in += 1
            s = self._frame_session(parts)
            if s is not None:
                self.counters.frames_in += 1
                s.counters.frames_in += 1
                self._count_drop(s, "shutdown")
        for s in self.sessions.values():
            self._drop_in_flight(s, "shutdown")

    def _frame_session(self, parts: list[bytes]) -> Session | None:
        """The session of a queued, decodable frame message, else None."""
        try:
            msg = P.decode(parts[-1])
        except Exception:  # noqa: BLE001 - anything undecodable was never a frame
            return None
        if msg.get("type") != "frame":
            return None
        return self.sessions.get(msg["session"])

    def report(self) -> str:
        """The exit table: counters and latency percentiles."""
        final = self._final or self.stats()
        return format_table(final["counters"], self.latency.summary())


# ---------------------------------------------------------------------- helpers


def _estimate_msg(sid: str, seq: int, t_capture: float, est: Any, t_recv: float,
                  t_send: float) -> dict:
    """Wire ``estimate`` from an :class:`masa_rt.align.Estimate` (duck-typed)."""
    return P.estimate(
        sid, seq, t_capture, t_recv, t_send, phase_id=est.phase_id,
        phase_name=est.phase_name or None, phase_progress=est.phase_progress,
        progress=est.progress, confidence=est.confidence, state=est.state,
        activity=est.activity or None)


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the actual endpoint (``tcp://127.0.0.1:0`` picks a free port)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:  # as an OSError: the CLI reports it as one line
        hint = (" (another masa-rt serve? choose a port with --bind / --pub)"
                if exc.errno == zmq.EADDRINUSE else
                " (expected e.g. tcp://127.0.0.1:5555 or ipc:///tmp/masa.sock)")
        raise OSError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}{hint}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def install_signal_handlers(server: Server) -> None:
    """SIGINT/SIGTERM ask the loop to stop; it finishes the step, reports and closes."""
    def handler(signum: int, _frame: object) -> None:
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        server.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _open_reason(exc: Exception) -> str:
    """Protocol reason for a pipeline refusing a session (it names what it refused)."""
    text = str(exc).lower()
    if "layout" in text:
        return "wrong_layout"
    if "reference" in text or "activity" in text:
        return "unknown_reference"
    return "malformed"

"""Sending poses: :class:`PoseOutlet`, one headset's session with the server (DEALER).

In the spirit of pylsl's ``StreamOutlet``: ``push`` never blocks (a full queue or a
missing link drops the frame locally and counts it, because a stale pose is worthless in
real time), ``pull`` returns ``None`` on timeout, and only a server that stops answering
raises :class:`~clients.errors.ConnectionLost`.

Liveness and recovery (rules in docs/protocol.md, "Sessions"):

* every ``heartbeat`` seconds the outlet pings; a ping unanswered for ``lost_after``
  seconds (nothing at all heard meanwhile) makes ``pull`` raise ``ConnectionLost``;
* ZeroMQ re-establishes a dropped TCP link by itself; when it does, the outlet re-sends
  ``hello`` with ``resume=True`` so the server keeps (or, after a restart, re-creates) the
  session; an ``unknown_session`` error triggers the same resume hello. A resume hello
  that cannot be queued (the link is not writable yet) is sent again on the next call;
* ``push`` reads the replies already queued too (never waiting), so an app that only
  pushes still resumes an expired session and keeps its clock offset fresh; the
  estimates it reads wait for ``pull``.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from clients._sockets import CurveKeys, connect, new_socket
from clients.clock import ClockOffset, local_clock
from clients.errors import ConnectionLost, MasaClientError, ServerError
from clients.inlet import Estimate
from masa_rt import protocol as P

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
CLIENT_NAME = "masa-rt-py/1"
_REHELLO_INTERVAL = 0.25  # s; one resume hello per burst of unknown_session errors


class PoseOutlet:
    """A pose stream to the masa-rt server; estimates for it come back on the same link.

    >>> with PoseOutlet(fps=30.0) as outlet:           # doctest: +SKIP
    ...     outlet.push(joints)                         # (J, C) float32, NaN = missing joint
    ...     est = outlet.pull(timeout=0.1)              # Estimate or None
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, session: str | None = None,
                 layout: str = "h2o_hands", fps: float = 30.0, reference: str | None = None,
                 *, curve: CurveKeys | None = None, lost_after: float = 3.0,
                 heartbeat: float | None = None, sndhwm: int = 256, sndbuf: int = 65_536,
                 context: zmq.Context | None = None,
                 layout_declaration: dict | None = None) -> None:
        self.address = address
        self.session = session or uuid.uuid4().hex
        self.layout, self.fps, self.reference = layout, float(fps), reference
        # A layout the server may not know, declared in full in every hello (a layout file's
        # contents, docs/formats.md "Layout files"); None: a layout the server knows.
        self.layout_declaration = layout_declaration
        self.lost_after = lost_after
        self.heartbeat = heartbeat if heartbeat is not None else lost_after / 4.0
        self.welcome: dict | None = None
        self.sent = 0
        self.dropped: Counter[str] = Counter()  # frames not sent: 'disconnected' | 'hwm_full'
        self.rejected: Counter[str] = Counter()  # frames the server refused, by reason
        self.malformed = 0  # undecodable replies (a broken or hostile server)
        self.clock = ClockOffset()
        self.last_stats: dict | None = None
        self._curve, self._sndhwm, self._sndbuf = curve, sndhwm, sndbuf
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._connected = self._ever_connected = False
        self._refused = False  # CURVE: the server's ZAP handler refused our key
        self._next_seq = 0
        self._last_stamp = float("-inf")  # capture times must increase (docs/protocol.md)
        self._pending: deque[Estimate] = deque(maxlen=10_000)
        # Estimates that arrived while 10,000 were already waiting unread (the oldest goes):
        # counted, so a caller that never pulls can see what it lost.
        self.estimates_discarded = 0
        self._unanswered_since: float | None = None
        self._last_ping = float("-inf")
        self._hello_sent_at = float("-inf")
        self._resume_due = False  # a resume hello could not be queued: send it again

    # ----------------------------------------------------------------- lifecycle

    def open(self, timeout: float = 5.0, resume: bool = False) -> dict:
        """Connect, send ``hello`` and wait for ``welcome`` (returned, also in ``.welcome``).

        ``resume=True`` continues a session the server may still hold (a restarted app
        with the same ``session`` id); numbering goes on after the server's ``last_seq``.

        Raises ``ServerError`` if the server refuses the session and ``ConnectionLost`` if
        no welcome arrives within ``timeout`` seconds.
        """
        try:
            if self._sock is None:
                self._connect()
            self._handshake(local_clock() + timeout, resume)
        except Exception:  # a refusal, a bad address or bad hello fields: no socket left
            self.close()
            raise
        return self.welcome

    def _connect(self) -> None:
        self._sock = new_socket(self._ctx, zmq.DEALER, curve=self._curve)
        # No queueing towards a link that is not up: frames would arrive stale.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        # A small kernel send buffer: when the server falls behind, frames back up in
        # the SNDHWM queue, where push() sees it and counts them ('hwm_full'), not in
        # megabytes of loopback TCP buffer that nobody can count.
        self._sock.setsockopt(zmq.SNDBUF, self._sndbuf)
        events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        if self._curve is not None:  # a refused key is reported, not taken for no server
            events |= zmq.EVENT_HANDSHAKE_FAILED_AUTH
        self._monitor = self._sock.get_monitor_socket(events)
        connect(self._sock, self.address)

    def _handshake(self, deadline: float, resume: bool) -> None:
        if not self._wait_writable(deadline):
            self._raise_if_refused()
            raise ConnectionLost(f"no server at {self.address}")
        self._send_hello(resume)
        if self._wait_for("welcome", deadline) is None:
            raise ConnectionLost(f"no welcome from {self.address}")

    def _wait_writable(self, deadline: float) -> bool:
        """Wait for the link; with CURVE, stop early if the server refuses our key."""
        if self._curve is None:
            return bool(self._sock.poll(_ms(deadline - local_clock()), zmq.POLLOUT))
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLOUT)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._refused:
            ready = dict(poller.poll(_ms(deadline - local_clock())))
            if self._sock in ready:
                return True
            if not ready:
                return False
            self._poll_events()
        return False

    def _raise_if_refused(self) -> None:
        if self._refused:
            raise ServerError("unauthorised", f"{self.address} refused this client's CURVE "
                              "key (not on the server's allow-list)")

    def close(self) -> None:
        """Say ``bye`` (best effort) and release the sockets. Safe to call twice."""
        if self._sock is None:
            return
        if self.welcome is not None:
            self._try_send(P.bye(self.session))
        if self._monitor is not None:  # None if open() failed before it was made
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close()
        self._sock = self._monitor = None
        self.welcome = None

    def __enter__(self) -> PoseOutlet:
        if self._sock is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the TCP link is up right now (as last reported by ZeroMQ)."""
        self._poll_events()
        return self._connected

    # ----------------------------------------------------------------- streaming

    def push(self, joints: np.ndarray, stamp: float | None = None) -> int | None:
        """Send one (J, C) pose captured at ``stamp`` (client clock; default: now).

        Returns the frame's sequence number, or None if it was dropped locally (link down
        or send queue full; counted in ``dropped``). Never blocks. Raises ``ValueError``
        for a shape the server did not ask for or a stamp that is not finite or not after
        the previous frame's (the server would refuse it and every frame stamped before
        it: give stamps from one monotonic clock, e.g. ``clients.clock.local_clock``), and
        ``ProtocolError`` for +-inf values. A refused frame uses no sequence number.
        Replies already queued are handled first (never waiting): ``ServerError`` if the
        server ended the session; estimates are kept for ``pull``.
        """
        self._require_open()
        a = np.asarray(joints, dtype=np.float32)
        expected = tuple(self.welcome["shape"])
        if a.shape != expected:
            raise ValueError(f"joints shape {a.shape} != {expected} for layout {self.layout}")
        now = local_clock()
        t = now if stamp is None else float(stamp)
        if not t > self._last_stamp or not np.isfinite(t):
            raise ValueError(f"stamp {t!r} is not finite or not after the previous frame's "
                             f"{self._last_stamp!r}: give capture times from one monotonic "
                             "clock (clients.clock.local_clock)")
        # Queued replies first: a resume's welcome moves _next_seq on, and an
        # unknown_session error (the session expired) must reach a caller that never pulls.
        self._drain(stop_at="", check_alive=False)
        seq = self._next_seq
        data = P.encode(P.frame(self.session, seq, t, a))  # +-inf: ProtocolError, no seq used
        self._next_seq += 1  # a dropped frame still uses its number: the gap shows the loss
        self._last_stamp = t
        if not self._try_send(data):
            self.dropped["disconnected" if not self._connected else "hwm_full"] += 1
            return None
        self.sent += 1
        return seq

    def pull(self, timeout: float = 0.0) -> Estimate | None:
        """The next estimate for this session, waiting up to ``timeout`` s; None if none.

        Raises ``ConnectionLost`` if the server has not answered a heartbeat for
        ``lost_after`` seconds, ``ServerError`` if it ended the session.
        """
        self._require_open()
        if self._pending:
            return self._pending.popleft()
        deadline = local_clock() + timeout
        while True:
            est = self._drain(stop_at="estimate")
            if est is not None:
                return est
            now = local_clock()
            if now >= deadline:
                return None
            self._sock.poll(_ms(min(deadline - now, self.heartbeat)))

    def time_correction(self, timeout: float = 2.0, probes: int = 8) -> float:
        """Server-minus-client clock offset (s), from ``probes`` ping/pong exchanges.

        ``server_time ~= local_clock() + offset``; the error is at most
        ``self.clock.uncertainty`` (half the best round trip). Heartbeat pongs refine it.
        """
        self._require_open()
        deadline = local_clock() + timeout
        for _ in range(probes):
            self._ping(local_clock())
            if self._wait_for("pong", deadline) is None:
                break
        if self.clock.offset is None:
            raise ConnectionLost(f"no pong from {self.address} within {timeout:g} s")
        return self.clock.offset

    def stats(self, timeout: float = 1.0, whole_server: bool = False) -> dict | None:
        """Ask the server for its counters (this session's, or the whole server's)."""
        self._require_open()
        self._try_send(P.stats(None if whole_server else self.session))
        return self._wait_for("stats_reply", local_clock() + timeout)

    @property
    def socket(self) -> zmq.Socket:
        """The DEALER socket, for a ``zmq.Poller`` multiplexing many outlets (replay)."""
        self._require_open()
        return self._sock

    # ----------------------------------------------------------------- internals

    def _require_open(self) -> None:
        if self._sock is None or self.welcome is None:
            raise MasaClientError("outlet is not open: call open() or use it as a context")

    def _try_send(self, msg: dict | bytes) -> bool:
        try:
            self._sock.send(msg if isinstance(msg, bytes) else P.encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _send_hello(self, resume: bool) -> None:
        self._hello_sent_at = local_clock()
        sent = self._try_send(P.hello(self.session, self.layout, self.fps, self._hello_sent_at,
                                      reference=self.reference, resume=resume,
                                      client=CLIENT_NAME,
                                      layout_declaration=self.layout_declaration))
        # A lost resume hello would leave the session unknown to the server: retry it.
        self._resume_due = resume and not sent

    def _ping(self, now: float) -> None:
        self._last_ping = now
        if self._unanswered_since is None:
            self._unanswered_since = now
        self._try_send(P.ping(now, self.session))

    def _heartbeat(self, now: float) -> None:
        if self._resume_due and self._connected:
            self._send_hello(resume=True)
        if now - self._last_ping >= self.heartbeat:
            self._ping(now)

    def _check_alive(self, now: float) -> None:
        if self._unanswered_since is not None and now - self._unanswered_since > self.lost_after:
            self._unanswered_since = None  # the next call starts a fresh deadline
            self._raise_if_refused()  # e.g. the key was revoked and the link re-handshaked
            raise ConnectionLost(f"no answer from {self.address} for {self.lost_after:g} s")

    def _poll_events(self) -> None:
        """Track link state; a second 'connected' is a reconnect: resume the session."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._connected = False
            elif event == zmq.EVENT_CONNECTED:
                self._connected = True
                if self._ever_connected and self.welcome is not None:
                    self._send_hello(resume=True)
                self._ever_connected = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = True

    def _drain(self, stop_at: str, check_alive: bool = True) -> Estimate | dict | None:
        """Handle every queued reply; return the first estimate (or ``stop_at`` message;
        ``""``: none, estimates are kept for ``pull``). ``check_alive``: raise
        ``ConnectionLost`` if the server has not answered for ``lost_after`` s."""
        now = local_clock()
        self._poll_events()
        self._heartbeat(now)
        while self._sock.poll(0):
            data = self._sock.recv(zmq.NOBLOCK)
            t_recv = local_clock()
            try:
                msg = P.decode(data)
            except P.ProtocolError:
                self.malformed += 1
                continue
            self._unanswered_since = None  # anything valid from the server proves it alive
            est = self._handle(msg, t_recv)
            if est is not None:
                if stop_at == "estimate":
                    return est
                if len(self._pending) == self._pending.maxlen:
                    self.estimates_discarded += 1
                self._pending.append(est)
            elif msg["type"] == stop_at != "estimate":
                return msg
        if check_alive:
            self._check_alive(local_clock())
        return None

    def _wait_for(self, kind: str, deadline: float) -> dict | None:
        """Process replies until one of type ``kind`` arrives; estimates are kept for pull."""
        while True:
            msg = self._drain(stop_at=kind)
            if msg is not None:
                return msg
            now = local_clock()
            if now >= deadline:
                return None
            self._sock.poll(_ms(min(deadline - now, self.heartbeat)))

    def _handle(self, msg: dict, t_recv: float) -> Estimate | None:
        kind = msg["type"]
        if kind == "estimate":
            return Estimate.received(msg, t_recv) if msg["session"] == self.session else None
        if kind == "pong":
            self.clock.add(msg["client_time"], msg["server_time"], t_recv)
        elif kind == "welcome":
            self._on_welcome(msg)
        elif kind == "error":
            self._on_error(msg)
        elif kind == "stats_reply":
            self.last_stats = msg
        return None

    def _on_welcome(self, msg: dict) -> None:
        self.welcome = msg
        # A resumed session continues after the last frame the server accepted, even if
        # this process restarted and its own counter began again at 0.
        self._next_seq = max(self._next_seq, msg["last_seq"] + 1)

    def _on_error(self, msg: dict) -> None:
        if msg["seq"] is not None:  # about one frame: count it, the stream goes on
            self.rejected[msg["reason"]] += 1
        elif msg["reason"] == "unknown_session" and self.welcome is not None:
            # The server restarted or expired us: resume (it re-creates the session).
            if local_clock() - self._hello_sent_at > _REHELLO_INTERVAL:
                self._send_hello(resume=True)
        else:
            raise ServerError(msg["reason"], msg["detail"])


def _ms(seconds: float) -> int:
    """zmq poll timeout in whole milliseconds, rounded up so a wait is never cut short."""
    return max(0, int(seconds * 1000.0 + 0.999))

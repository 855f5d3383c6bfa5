"""Receiving estimates: the :class:`Estimate` value and the :class:`EstimateInlet` (SUB).

The server republishes every estimate on a PUB socket as ``[topic=session, payload]``.
An inlet is what dashboards and loggers use to watch one session or all of them; the
headset itself gets its own estimates back on its :class:`~clients.outlet.PoseOutlet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import zmq

from clients._sockets import CurveKeys, connect, new_socket
from clients.clock import local_clock
from masa_rt.protocol import EstimateMsg, ProtocolError, decode, topic

DEFAULT_PUB_ADDRESS = "tcp://127.0.0.1:5556"


@dataclass(frozen=True, slots=True)
class Estimate(EstimateMsg):
    """An estimate as received: the server's fields plus when it arrived here.

    ``t_capture`` and ``t_received`` are both client-clock times, so ``latency`` is the
    full capture -> answer delay without any clock correction (same machine, same clock).
    """

    t_received: float = 0.0

    @property
    def latency(self) -> float:
        """Seconds from frame capture to this estimate's arrival, in the client clock."""
        return self.t_received - self.t_capture

    def stages(self, offset: float) -> dict[str, float]:
        """Split the latency into uplink / server / downlink seconds.

        ``offset`` is server-minus-client (``PoseOutlet.time_correction()``); the split is
        only as good as the offset (error up to half the probe round trip).
        """
        uplink = self.t_server_recv - offset - self.t_capture
        server = self.t_server_send - self.t_server_recv
        return {"uplink": uplink, "server": server, "downlink": self.latency - uplink - server}

    @classmethod
    def received(cls, msg: dict, t_received: float) -> Estimate:
        """From a decoded ``estimate`` message and its local arrival time."""
        return cls(**{f.name: msg[f.name] for f in fields(EstimateMsg)}, t_received=t_received)


class EstimateInlet:
    """Subscribe to the server's estimate stream, for one session or all (``session=None``).

    Against a ``--secure`` server ``curve`` keys are needed, and "all" means all of this
    key's sessions; an operator key (``masa-rt keys new NAME --operator``) with
    ``operator=True`` reads every session of every client.

    ``pull(timeout)`` returns ``None`` on timeout, like pylsl's ``pull_sample``. Junk from
    the wire is skipped and counted in ``malformed``, never raised: a dashboard should not
    die of one bad message. A SUB socket cannot tell a quiet server from a gone one, so an
    inlet never raises ``ConnectionLost``; ZeroMQ reconnects it by itself.
    """

    def __init__(self, address: str = DEFAULT_PUB_ADDRESS, session: str | None = None, *,
                 hwm: int = 10_000, curve: CurveKeys | None = None, operator: bool = False,
                 context: zmq.Context | None = None) -> None:
        self.session = session
        self.malformed = 0
        self._ctx = context or zmq.Context.instance()
        self._sock = new_socket(self._ctx, zmq.SUB, curve=curve, linger_ms=0)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.SUBSCRIBE, self._subscription(curve, operator))
        connect(self._sock, address)

    def _subscription(self, curve: CurveKeys | None, operator: bool) -> bytes:
        """What to ask the server for. A secure server publishes under ``KEY/session`` and
        lets a key read only its own (docs/protocol.md, "Sockets"); an operator key may
        read every session, so it subscribes to all and this inlet filters."""
        if curve is not None and not operator:
            return topic(self.session or "", curve.public)
        if curve is None and self.session is not None:
            return topic(self.session)
        return b""

    def pull(self, timeout: float = 0.0) -> Estimate | None:
        """The next estimate, waiting up to ``timeout`` seconds; None if none arrived."""
        deadline = local_clock() + timeout
        while True:
            remaining = max(0.0, deadline - local_clock())
            if not self._sock.poll(math.ceil(remaining * 1000)):  # up: 0.4 ms is not 0
                return None
            est = self._receive()
            if est is not None:
                return est

    def pull_chunk(self, max_items: int = 1024) -> list[Estimate]:
        """Everything already queued (up to ``max_items``) without waiting."""
        out: list[Estimate] = []
        while len(out) < max_items and self._sock.poll(0):
            est = self._receive()
            if est is not None:
                out.append(est)
        return out

    def _receive(self) -> Estimate | None:
        """Read one queued message; None (and count it) if it is not an estimate for us."""
        parts = self._sock.recv_multipart(zmq.NOBLOCK)
        t_received = local_clock()
        if len(parts) != 2:
            self.malformed += 1
            return None
        try:
            msg = decode(parts[1])
        except ProtocolError:
            self.malformed += 1
            return None
        if msg["type"] != "estimate":
            self.malformed += 1
            return None
        if self.session is not None and msg["session"] != self.session:
            return None  # ZeroMQ matches topics by prefix: session "a" also gets "ab"
        return Estimate.received(msg, t_received)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> EstimateInlet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The server's estimate stream (PUB), private per tenant under ``--secure``.

Plain mode (loopback, one trusted user): a PUB socket, topic = session id, anyone connected
reads every session, as docs/protocol.md has always said.

``--secure``: every estimate is published under ``<owner key>/<session>`` (the Z85 CURVE
public key of the client that owns the session, :func:`masa_rt.protocol.topic`), on an XPUB
socket in manual mode, so the server itself decides which subscriptions take effect: a key
may subscribe only to topics under its own key, which ZeroMQ's prefix matching cannot widen
to another tenant (the prefix is the whole 40-character key and its slash). Operator keys
(``KEYDIR/operators/``, :mod:`engine.security`) may subscribe to anything, e.g. ``b""`` for
every session of every tenant. A refused subscription takes no effect and is counted; the
subscriber simply receives nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from masa_rt import protocol as P

log = logging.getLogger("masa_rt.server")

__all__ = ["EstimateFeed"]

# Subscriptions read per loop: a flood of (un)subscribes must not starve the frames.
MAX_SUBSCRIPTIONS_PER_DRAIN = 64


class EstimateFeed:
    """Publish estimates; under ``--secure`` also vet each subscription (see module doc).

    ``is_operator(key)`` says whether a Z85 key may read every tenant (None: plain mode).
    """

    def __init__(self, ctx: zmq.Context, hwm: int,
                 is_operator: Callable[[bytes], bool] | None = None) -> None:
        self.secure = is_operator is not None
        self._is_operator = is_operator
        self.socket = ctx.socket(zmq.XPUB if self.secure else zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        if self.secure:
            self.socket.setsockopt(zmq.XPUB_MANUAL, 1)
        self.subscriptions = {"allowed": 0, "denied": 0}

    def publish(self, session: str, owner: bytes | None, data: bytes) -> bool:
        """Send one estimate under its session's topic (``owner``: the tenant's key);
        False if it could not be queued."""
        try:
            self.socket.send_multipart([P.topic(session, owner if self.secure else None), data],
                                       zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # PUB drops at its HWM by itself; this is belt and braces
            return False

    def drain_subscriptions(self) -> None:
        """Apply the allowed subscriptions queued on the XPUB (secure mode only)."""
        for _ in range(MAX_SUBSCRIPTIONS_PER_DRAIN if self.secure else 0):
            try:
                msg = self.socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._vet(msg)

    def _vet(self, msg: zmq.Frame) -> None:
        body = msg.bytes
        if not body or body[0] not in (0, 1):
            return  # not a (un)subscription: XPUB passes nothing else up
        subscribe, topic = body[0] == 1, body[1:]
        key = msg.get("User-Id").encode()
        if not subscribe:  # dropping one's own subscription is always fine
            self.socket.setsockopt(zmq.UNSUBSCRIBE, topic)
            return
        if topic.startswith(key + b"/") or self._is_operator(key):
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)  # applies to that subscriber only
            self.subscriptions["allowed"] += 1
            return
        self.subscriptions["denied"] += 1
        log.warning("event=subscription_denied client_key=%s topic=%r detail=\"a key may "
                    "subscribe only under its own key (operators: anything)\"",
                    key.decode("ascii", "replace"), topic[:80])

    def counters(self) -> dict[str, int]:
        """``auth.subscriptions_allowed`` / ``_denied`` (secure mode; plain vets nothing)."""
        if not self.secure:
            return {}
        return {f"auth.subscriptions_{k}": v for k, v in self.subscriptions.items()}

    def close(self) -> None:
        self.socket.close(linger=0)

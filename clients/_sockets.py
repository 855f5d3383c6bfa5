"""Socket setup shared by the outlet and the inlet: limits, linger and optional CURVE."""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from masa_rt.protocol import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE keys (``zmq.curve_keypair()``; ``masa-rt keys new`` makes them).

    With keys the link is encrypted and the server can authenticate the client against
    its allow-list; without them traffic is plaintext (fine on loopback only).
    """

    server_public: bytes
    public: bytes
    secret: bytes


def new_socket(ctx: zmq.Context, kind: int, *, curve: CurveKeys | None = None,
               linger_ms: int = 100) -> zmq.Socket:
    """A socket that drops oversized messages and never hangs the process on close."""
    sock = ctx.socket(kind)
    # A hostile or broken peer cannot make us buffer more than one protocol message.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # Short linger: close() still flushes a 'bye', but a dead server cannot block exit.
    sock.setsockopt(zmq.LINGER, linger_ms)
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    return sock


def connect(sock: zmq.Socket, address: str) -> None:
    """``sock.connect(address)``; a malformed address is a ValueError naming it (libzmq's
    own error says only 'Invalid argument')."""
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot connect to {address!r}: {exc.strerror} (expected e.g. "
                         "tcp://127.0.0.1:5555)") from None

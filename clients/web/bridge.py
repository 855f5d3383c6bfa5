"""A headset page's link to the server: its own DEALER, messages relayed both ways.

The page speaks protocol v1 (docs/protocol.md) in msgpack over the WebSocket; the gateway
passes every message on as it is, so validation, limits and counters stay in the server,
and passes the server's replies back. Its own checks are the ones the server cannot make
through it (each refusal answered with a protocol ``error`` and counted):

* binary messages only, at most ``MAX_MESSAGE_BYTES`` (``malformed``, ``too_large``);
* session ownership per token name (:mod:`clients.web.owners`): ``session_owner``,
  ``too_many_sessions``.

One DEALER per page gives each page the return path the server already keeps per
connection (it answers the connection a message came from), so a page's estimates never
reach another page. A message that cannot be sent at once (the server unreachable, or its
queue full) is dropped and counted, never queued: a stale pose is worthless.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from clients._sockets import CurveKeys, connect, new_socket
from clients.web.config import GatewayConfig
from clients.web.counters import GatewayCounters
from clients.web.owners import SessionOwners
from masa_rt import protocol as P

log = logging.getLogger("clients.web")


class HeadsetBridge:
    def __init__(self, ws, owner: str | None, ctx: zmq.asyncio.Context, cfg: GatewayConfig,
                 curve: CurveKeys | None, owners: SessionOwners,
                 counters: GatewayCounters) -> None:
        self.ws, self.owner, self.cfg = ws, owner, cfg
        self.owners, self.counters = owners, counters
        self.sessions: set[str] = set()  # opened through this page, for SessionOwners.hold
        self.dealer = new_socket(ctx, zmq.DEALER, curve=curve, linger_ms=0)
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)  # no frames queued towards a link that is down
        self.dealer.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        connect(self.dealer, cfg.server)

    async def run(self, connect_wait_s: float = 2.0) -> None:
        """Relay until the page goes; then its sessions are held for its return.

        The page's first messages wait (in the WebSocket) up to ``connect_wait_s`` for the
        link to the server, as ``PoseOutlet.open`` waits before its hello: without it the
        hello of a page that has just connected would be dropped."""
        monitor = self.dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        await self.dealer.poll(int(connect_wait_s * 1000), zmq.POLLOUT)
        tasks = {asyncio.create_task(self._from_page()), asyncio.create_task(self._to_page()),
                 asyncio.create_task(self._refused_by_server(monitor))}
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    # Mostly a page gone mid-send; a page can cause it at will: debug only.
                    log.debug("event=bridge_end error=%r", task.exception())
        finally:
            for task in tasks:
                task.cancel()
            self.dealer.disable_monitor()
            monitor.close(linger=0)
            self.dealer.close(linger=0)
            self.owners.hold(self.sessions, self.owner)

    async def _from_page(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            await self.relay(msg.get("bytes"))

    async def _to_page(self) -> None:
        while True:
            data = await self.dealer.recv()
            await self.ws.send_bytes(data)
            self.counters.count("messages_to_pages")

    async def _refused_by_server(self, monitor) -> None:
        """With CURVE: the server's allow-list refused the gateway's key. Say so to the
        page as the server's ``unauthorised`` (as ``PoseOutlet.open`` raises it), end."""
        await recv_monitor_message(monitor)  # only EVENT_HANDSHAKE_FAILED_AUTH is asked for
        self.counters.count("refused_by_server.unauthorised")
        await self.ws.send_bytes(P.encode(P.error(
            "unauthorised", "the server refused the gateway's CURVE key (not on its "
            "allow-list: masa-rt keys new, docs/security.md)")))

    async def relay(self, data: bytes | None) -> None:
        """Check one page message and pass it on, or refuse it with an ``error``."""
        if data is None:
            return await self._refuse("malformed", "send binary msgpack, not text", {})
        if len(data) > self.cfg.max_message_bytes:
            return await self._refuse("too_large",
                                      f"{len(data)} > {self.cfg.max_message_bytes} bytes", {})
        head = _peek(data)
        reason = self._ownership(head)
        if reason is not None:
            detail = ("another page's session" if reason == "session_owner"
                      else f"at most {self.cfg.max_sessions_per_client} sessions per token")
            return await self._refuse(reason, detail, head)
        try:
            await self.dealer.send(data, zmq.NOBLOCK)
        except zmq.Again:  # the server is not connected, or this page's queue is full
            self.counters.count("dropped.server_unreachable")
            return
        self.counters.count("messages_to_server")

    def _ownership(self, head: dict) -> str | None:
        """Apply SessionOwners to a message naming a session; the refusal reason or None."""
        session, kind = head.get("session"), head.get("type")
        if not isinstance(session, str):
            return None  # the server refuses what has no valid session, and counts it
        if kind == "hello":
            reason = self.owners.claim(session, self.owner)
            if reason is None:
                self.sessions.add(session)
            return reason
        reason = self.owners.check(session, self.owner)
        if reason is None and kind == "bye":
            self.owners.release(session, self.owner)
            self.sessions.discard(session)
        return reason

    async def _refuse(self, reason: str, detail: str, head: dict) -> None:
        self.counters.count(f"rejected.{reason}")
        seq = head.get("seq") if head.get("type") == "frame" else None
        session = head.get("session")
        valid_session = isinstance(session, str) and P.SESSION_PATTERN.fullmatch(session)
        reply = P.error(reason, f"gateway: {detail}",
                        seq=seq if isinstance(seq, int) and 0 <= seq <= P.MAX_SEQ else None,
                        session=session if valid_session else None)
        await self.ws.send_bytes(P.encode(reply))


def _peek(data: bytes) -> dict:
    """The message's map without validating it ({} if it is not one: the server says so)."""
    try:
        msg = P.unpack(data)
    except P.ProtocolError:
        return {}
    return msg if isinstance(msg, dict) else {}

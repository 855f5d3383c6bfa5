"""What the gateway reads from the server for the dashboard: the PUB estimate stream and a
``stats`` poll, each an asyncio task feeding the :class:`~clients.web.board.Board`.

Junk from the wire is counted (``malformed_from_server``) and skipped, never raised: as
with ``EstimateInlet``, a dashboard must not die of one bad message.
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from clients._sockets import CurveKeys, connect, new_socket
from clients.web.board import Board
from clients.web.counters import GatewayCounters
from masa_rt import protocol as P


async def follow_estimates(board: Board, ctx: zmq.asyncio.Context, address: str,
                           curve: CurveKeys | None, counters: GatewayCounters) -> None:
    """Subscribe to every session's estimates until cancelled."""
    sub = new_socket(ctx, zmq.SUB, curve=curve, linger_ms=0)
    sub.setsockopt(zmq.RCVHWM, 10_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    connect(sub, address)
    try:
        while True:
            parts = await sub.recv_multipart()
            try:
                msg = P.decode(parts[1]) if len(parts) == 2 else None
            except P.ProtocolError:
                msg = None
            if msg is None or msg["type"] != "estimate":
                counters.count("malformed_from_server")
                continue
            board.update(msg)
    finally:
        sub.close(linger=0)


async def poll_stats(board: Board, ctx: zmq.asyncio.Context, address: str,
                     curve: CurveKeys | None, period_s: float) -> None:
    """Ask the server for its whole-server counters every ``period_s`` until cancelled."""
    dealer = new_socket(ctx, zmq.DEALER, curve=curve, linger_ms=0)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    connect(dealer, address)
    request = P.encode(P.stats(None))
    try:
        while True:
            board.server_stats, board.server_note = await _ask(dealer, request, period_s,
                                                               address, board.server_stats)
            await asyncio.sleep(period_s)
    finally:
        dealer.close(linger=0)


async def _ask(dealer, request: bytes, timeout_s: float, address: str,
               last: dict | None) -> tuple[dict | None, str]:
    """(stats, note): the reply, or the last one kept with a note saying it is stale."""
    try:
        await dealer.send(request, zmq.NOBLOCK)
    except zmq.Again:
        return last, f"server {address} not connected"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (left := deadline - loop.time()) > 0:
        if not await dealer.poll(int(left * 1000) + 1):
            break
        try:
            msg = P.decode(await dealer.recv())
        except P.ProtocolError:
            continue
        if msg["type"] == "stats_reply":
            return {"counters": msg["counters"], "latency": msg["latency"]}, ""
    return last, f"no stats reply from {address} within {timeout_s:g} s"

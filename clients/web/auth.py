"""The first message on every gateway WebSocket: who is this page?

A browser cannot set headers on a WebSocket, and a token in the URL would end up in access
logs, so the page sends its token as the first message, msgpack as everything else::

    page    -> gateway   {"v": 1, "type": "auth", "token": str | nil}
    gateway -> page      {"v": 1, "type": "auth_ok", "name": str | nil, "server": str,
                          "tokens": bool}

or the gateway closes the socket with a code and a one-line reason (and counts it):
4400 ``bad_auth`` (not an auth message), 4401 ``unauthorised`` (no such token), 4403
``bad_origin`` (opened by a page of another site), 4408 ``auth_timeout``, 4429
``too_many_pages`` (``max_headset_pages`` already streaming). Without a
token file any ``auth`` message is admitted (loopback use) and ``name`` is nil.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgpack

from clients.web.counters import GatewayCounters
from clients.web.tokens import TokenFile
from masa_rt import protocol as P

CLOSE_CODES = {"bad_auth": 4400, "unauthorised": 4401, "bad_origin": 4403,
               "auth_timeout": 4408, "too_many_pages": 4429}


@dataclass(frozen=True)
class Admission:
    """An admitted page: its token name (None without a token file)."""

    name: str | None


class Refused(Exception):
    """Why a page is not admitted: a CLOSE_CODES key and a line for the page."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def same_origin(origin: str | None, host: str | None) -> bool:
    """A page of this gateway (or a non-browser client, which sends no Origin)."""
    if origin is None:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def read_token(data: bytes | None) -> str | None:
    """The token of an ``auth`` message; ``Refused('bad_auth')`` for anything else."""
    try:
        msg = P.unpack(data or b"")
    except P.ProtocolError as exc:
        raise Refused("bad_auth", f"first message: {exc.detail}") from None
    if not isinstance(msg, dict) or msg.get("type") != "auth" or msg.get("v") != 1:
        raise Refused("bad_auth", "first message must be {v: 1, type: 'auth', token}")
    token = msg.get("token")
    if token is not None and not isinstance(token, str):
        raise Refused("bad_auth", "auth.token must be a string or nil")
    return token


async def admit(ws, tokens: TokenFile | None, timeout_s: float, server: str,
                counters: GatewayCounters) -> Admission | None:
    """Accept ``ws`` and read its auth message; None (closed and counted) if refused."""
    await ws.accept()
    try:
        if not same_origin(ws.headers.get("origin"), ws.headers.get("host")):
            raise Refused("bad_origin", "this page is not served by the gateway")
        try:
            first = await asyncio.wait_for(ws.receive(), timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 - a distinct class on Python 3.10
            raise Refused("auth_timeout", f"no auth message within {timeout_s:g} s") from None
        if first.get("type") == "websocket.disconnect":
            counters.count("refused.disconnected")
            return None
        token = read_token(first.get("bytes"))
        name = tokens.check(token) if tokens is not None else None
        if tokens is not None and name is None:
            raise Refused("unauthorised", "unknown token")
    except Refused as why:
        await refuse(ws, why, counters)
        return None
    await ws.send_bytes(msgpack.packb({"v": 1, "type": "auth_ok", "name": name,
                                       "server": server, "tokens": tokens is not None}))
    return Admission(name)


async def refuse(ws, why: Refused, counters: GatewayCounters) -> None:
    """Close ``ws`` with the reason's code and a one-line reason; count it."""
    counters.count(f"refused.{why.reason}")
    await ws.close(code=CLOSE_CODES[why.reason], reason=f"{why.reason}: {why.detail}"[:120])

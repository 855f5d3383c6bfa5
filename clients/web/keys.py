"""The gateway's own CURVE keys, for a server run with ``masa-rt serve --secure KEYDIR``.

The gateway is one client of the server, with one keypair, an operator's since its
dashboard reads every session's estimates (``masa-rt keys new web --operator``), laid out
as for any client (docs/security.md)::

    KEYDIR/server/NAME.key            the server's public key (exactly one)
    KEYDIR/private/WEBNAME.key_secret the gateway's keypair, 0600

This reads them as ``engine.security.load_client_keys`` does; it is repeated here because
``clients/`` depends on the wire protocol only, never on the engine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq.auth

from clients._sockets import CurveKeys


def load_gateway_keys(keydir: str | Path, name: str) -> CurveKeys:
    """CurveKeys(server public, gateway public, gateway secret); one-line ValueErrors."""
    keydir = Path(keydir).expanduser()
    servers = sorted((keydir / "server").glob("*.key"))
    if len(servers) != 1:
        raise ValueError(f"{keydir / 'server'}: expected exactly one server public key "
                         f"(*.key), found {len(servers)}")
    server_public, _ = zmq.auth.load_certificate(servers[0])
    secret_file = keydir / "private" / f"{name}.key_secret"
    if not secret_file.is_file():
        raise ValueError(f"secret key {secret_file} not found (masa-rt keys new {name})")
    if os.name == "posix" and secret_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"secret key {secret_file} is readable by others: "
                         f"chmod 600 {secret_file}")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return CurveKeys(server_public=server_public, public=public, secret=secret)

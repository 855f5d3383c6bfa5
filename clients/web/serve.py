"""``masa-rt web``: serve the gateway with uvicorn until Ctrl-C / SIGTERM.

Logs ``event=web_serving url=... server=... pub=...`` once listening (with the port
actually bound, so ``--port 0`` is usable by scripts and tests), and warns as the server
does when it listens off loopback without tokens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket

from clients.web.app import Gateway
from clients.web.config import GatewayConfig
from clients.web.keys import load_gateway_keys

log = logging.getLogger("clients.web")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface: when in doubt, it is not loopback


def check_config(cfg: GatewayConfig) -> None:
    """One-line errors before anything binds."""
    if cfg.keydir is not None and cfg.token_file is None:
        raise ValueError("--secure needs --token-file: the server's CURVE check would "
                         "admit any browser that reaches the gateway")
    if (cfg.certfile is None) != (cfg.keyfile is None):
        raise ValueError("--certfile and --keyfile go together (HTTPS)")
    if cfg.token_file is None and not is_loopback_host(cfg.host):
        log.warning("event=plain_mode host=%s: any browser that reaches it sees every "
                    "session and may stream; use --token-file (and --secure)", cfg.host)


def serve(cfg: GatewayConfig) -> int:
    import uvicorn  # the [web] extra, imported here so that `masa-rt --help` needs none

    check_config(cfg)
    curve = load_gateway_keys(cfg.keydir, cfg.key_name) if cfg.keydir else None
    app = Gateway(cfg, curve).app()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            # a frame over the protocol cap is cut off by the WebSocket
                            # layer (close 1009) before it is buffered whole
                            ws_max_size=2 * cfg.max_message_bytes,
                            ssl_certfile=cfg.certfile, ssl_keyfile=cfg.keyfile)
    sock = listen(cfg.host, cfg.port)  # ours, so that a port in use is one line
    server = uvicorn.Server(config)
    asyncio.run(_serve(server, sock, cfg))  # the app logs event=stopped with its counters
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0: any free one); OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None


async def _serve(server, sock: socket.socket, cfg: GatewayConfig) -> None:
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        scheme = "https" if cfg.certfile else "http"
        log.info("event=web_serving url=%s://%s:%d server=%s pub=%s tokens=%s secure=%s",
                 scheme, cfg.host, sock.getsockname()[1], cfg.server, cfg.pub,
                 cfg.token_file is not None, cfg.keydir is not None)

    task = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()

"""``masa-rt web``: serve the gateway with uvicorn until Ctrl-C / SIGTERM.

Logs ``event=web_serving url=... server=... pub=...`` once listening (with the port
actually bound, so ``--port 0`` is usable by scripts and tests), and warns as the server
does when it listens off loopback without tokens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from clients.web.app import create_app
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
    app = create_app(cfg, curve)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            # a frame over the protocol cap is cut off by the WebSocket
                            # layer (close 1009) before it is buffered whole
                            ws_max_size=2 * cfg.max_message_bytes,
                            ssl_certfile=cfg.certfile, ssl_keyfile=cfg.keyfile)
    server = uvicorn.Server(config)
    asyncio.run(_serve(server, cfg))
    return 0


async def _serve(server, cfg: GatewayConfig) -> None:
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if cfg.certfile else "http"
        log.info("event=web_serving url=%s://%s:%d server=%s pub=%s tokens=%s secure=%s",
                 scheme, cfg.host, port, cfg.server, cfg.pub, cfg.token_file is not None,
                 cfg.keydir is not None)

    task = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        task.cancel()

"""The gateway's web application (Starlette): pages, recordings and the two WebSockets.

    GET  /                   -> /dashboard
    GET  /dashboard          operator dashboard (static/dashboard.html)
    GET  /headset            headset page: WebXR hands, or a recording replayed
    GET  /static/...         the pages' scripts and styles
    GET  /recordings         JSON list of replayable recordings      (token needed*)
    GET  /recordings/NAME    one of them as a msgpack message        (token needed*)
    POST /recordings         an uploaded .npz back as that message   (token needed*)
    GET  /stats              the gateway's counters, JSON            (token needed*)
    WS   /ws/headset         protocol v1 bridged to the server (clients.web.bridge)
    WS   /ws/dashboard       dashboard snapshots, msgpack, snapshot_hz a second

    * with --token-file: ``Authorization: Bearer TOKEN``; WebSockets: clients.web.auth.

The pages themselves hold no data and load without a token; the token travels in the
URL's fragment (``/dashboard#token=...``), which browsers never send to a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import zmq.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from clients._sockets import CurveKeys
from clients.web.auth import Refused, admit, refuse
from clients.web.board import Board
from clients.web.bridge import HeadsetBridge
from clients.web.config import GatewayConfig
from clients.web.counters import GatewayCounters
from clients.web.feeds import follow_estimates, poll_stats
from clients.web.owners import SessionOwners
from clients.web.recordings import list_recordings, named_recording, uploaded_recording
from clients.web.tokens import TokenFile

STATIC = Path(__file__).resolve().parent / "static"
MSGPACK = "application/x-msgpack"
log = logging.getLogger("clients.web")


class Gateway:
    """The shared state of one gateway: config, tokens, counters, board, zmq context."""

    def __init__(self, cfg: GatewayConfig, curve: CurveKeys | None = None) -> None:
        self.cfg, self.curve = cfg, curve
        self.tokens = TokenFile(cfg.token_file) if cfg.token_file else None
        self.counters = GatewayCounters()
        self.board = Board(cfg.forget_s)
        self.owners = SessionOwners(cfg.session_hold_s, cfg.max_sessions_per_client)
        self.ctx: zmq.asyncio.Context | None = None
        self.headset_pages = 0  # bridges running now

    # ------------------------------------------------------------------ lifespan

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.ctx = zmq.asyncio.Context()
        feeds = [asyncio.create_task(follow_estimates(self.board, self.ctx, self.cfg.pub,
                                                      self.curve, self.counters)),
                 asyncio.create_task(poll_stats(self.board, self.ctx, self.cfg.server,
                                                self.curve, self.cfg.stats_period_s))]
        try:
            yield
        finally:
            for task in feeds:
                task.cancel()
            await asyncio.gather(*feeds, return_exceptions=True)
            self.ctx.destroy(linger=0)
            # Here, not after uvicorn returns: on SIGTERM it re-raises the signal at exit.
            counts = " ".join(f"{k}={v}" for k, v in self.counters.snapshot().items())
            log.info("event=stopped %s", counts or "nothing_counted=1")

    # ------------------------------------------------------------------ HTTP

    def _allowed(self, request: Request) -> bool:
        if self.tokens is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.tokens.check(token.strip()) is not None:
            return True
        self.counters.count("refused.unauthorised_http")
        return False

    async def recordings(self, request: Request) -> Response:
        if not self._allowed(request):
            return _unauthorised()
        return JSONResponse(list_recordings(self.cfg.recordings))

    async def recording(self, request: Request) -> Response:
        if not self._allowed(request):
            return _unauthorised()
        try:
            data = named_recording(self.cfg.recordings, request.path_params["name"])
        except (OSError, ValueError) as exc:
            self.counters.count("refused.recording")
            return _error(404 if isinstance(exc, FileNotFoundError) else 422, str(exc))
        return Response(data, media_type=MSGPACK)

    async def upload(self, request: Request) -> Response:
        if not self._allowed(request):
            return _unauthorised()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.cfg.max_upload_bytes:
                self.counters.count("refused.upload_too_large")
                return _error(413, f"upload over {self.cfg.max_upload_bytes} bytes")
        name = request.query_params.get("name", "upload.npz")[:128]
        try:
            data = uploaded_recording(bytes(body), name, self.cfg.max_unpacked_bytes)
        except Exception as exc:  # noqa: BLE001 - any junk upload is the sender's problem
            self.counters.count("refused.upload_not_recording")
            return _error(422, str(exc) if isinstance(exc, ValueError)
                          else f"{name}: not a recording ({type(exc).__name__})")
        self.counters.count("uploads")
        return Response(data, media_type=MSGPACK)

    async def stats(self, request: Request) -> Response:
        if not self._allowed(request):
            return _unauthorised()
        return JSONResponse(self.counters.snapshot())

    # ------------------------------------------------------------------ WebSockets

    async def headset_socket(self, ws: WebSocket) -> None:
        if self.headset_pages >= self.cfg.max_headset_pages:  # before a DEALER is made
            await ws.accept()  # so that the close carries its reason to the page
            return await refuse(ws, Refused("too_many_pages", f"{self.headset_pages} pages "
                                            "are streaming already"), self.counters)
        self.headset_pages += 1  # from here on: two pages at once cannot both pass
        try:
            admitted = await admit(ws, self.tokens, self.cfg.auth_timeout_s, self.cfg.server,
                                   self.counters)
            if admitted is None:
                return
            self.counters.count("pages.headset")
            await HeadsetBridge(ws, admitted.name, self.ctx, self.cfg, self.curve,
                                self.owners, self.counters).run()
        finally:
            self.headset_pages -= 1

    async def dashboard_socket(self, ws: WebSocket) -> None:
        admitted = await admit(ws, self.tokens, self.cfg.auth_timeout_s, self.cfg.server,
                               self.counters)
        if admitted is None:
            return
        self.counters.count("pages.dashboard")
        tasks = {asyncio.create_task(self._send_snapshots(ws)),
                 asyncio.create_task(_until_closed(ws))}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    async def _send_snapshots(self, ws: WebSocket) -> None:
        period = 1.0 / self.cfg.snapshot_hz
        with contextlib.suppress(Exception):  # the page went away mid-send
            while True:
                await ws.send_bytes(self.board.encoded(self.counters.snapshot()))
                await asyncio.sleep(period)

    def app(self) -> Starlette:
        routes = [
            Route("/", lambda r: RedirectResponse("/dashboard")),
            Route("/dashboard", lambda r: FileResponse(STATIC / "dashboard.html")),
            Route("/headset", lambda r: FileResponse(STATIC / "headset.html")),
            Route("/recordings", self.recordings, methods=["GET"]),
            Route("/recordings", self.upload, methods=["POST"]),
            Route("/recordings/{name}", self.recording, methods=["GET"]),
            Route("/stats", self.stats),
            WebSocketRoute("/ws/headset", self.headset_socket),
            WebSocketRoute("/ws/dashboard", self.dashboard_socket),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return Starlette(routes=routes, lifespan=self.lifespan)


async def _until_closed(ws: WebSocket) -> None:
    """Read (and ignore) what a dashboard page sends, until it closes."""
    with contextlib.suppress(Exception):  # closed under us: that is the end too
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass


def _error(status: int, line: str) -> Response:
    return JSONResponse({"error": line}, status_code=status)


def _unauthorised() -> Response:
    return _error(401, "unauthorised: send Authorization: Bearer TOKEN (see --token-file)")


def create_app(cfg: GatewayConfig, curve: CurveKeys | None = None) -> Starlette:
    """The gateway as an ASGI app (``masa-rt web`` serves it with uvicorn)."""
    return Gateway(cfg, curve).app()

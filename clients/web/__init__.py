"""The web gateway (``masa-rt web``): browsers on a running ``masa-rt serve``.

A client of the server like any other (wire protocol only, docs/protocol.md): headset
pages' protocol messages are bridged over WebSocket to a DEALER each, and the operator
dashboard is drawn from the server's PUB stream and its ``stats``. Needs the ``[web]``
extra (starlette, uvicorn, websockets); nothing here is imported by the core install.

Modules: ``config`` (GatewayConfig), ``tokens`` (browser tokens), ``keys`` (the gateway's
CURVE keys), ``auth`` (a WebSocket's first message), ``owners`` (sessions per token),
``bridge`` (headset page <-> server), ``phases`` (phase extents learnt from estimates),
``board`` (dashboard state), ``feeds`` (PUB and stats readers), ``recordings`` (replay
files for pages without XR), ``app`` (routes), ``serve`` (uvicorn). Pages: ``static/``.
"""

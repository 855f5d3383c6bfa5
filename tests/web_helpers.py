"""Helpers of the web gateway tests: a real server in-process (the shipped model and the
shipped pour_milk reference: torch-free, starts in a second) and the gateway on uvicorn
in a thread, both on loopback with ports the OS picks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "pour_milk.npz"
RECORDING = ROOT / "examples" / "demos" / "pour_milk.npz"


def pour_milk_phases() -> list[str]:
    with np.load(REFERENCE) as f:
        return [str(p) for p in f["phase_names"]]


@contextlib.contextmanager
def shipped_server(**config) -> Iterator[object]:
    """engine.server.Server with the shipped hand model and the pour_milk reference;
    ``config``: more ServerConfig fields (e.g. ``keydir`` for CURVE)."""
    from engine.pipeline import Pipeline
    from engine.server import Server, ServerConfig
    from masa_rt.shipped import shipped_onnx_path

    pipeline = Pipeline.from_files(shipped_onnx_path("h2o_hands"), [REFERENCE], capacity=8)
    try:
        with Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                           pub_bind="tcp://127.0.0.1:0", **config)) as srv:
            yield srv
    finally:
        pipeline.close()


@contextlib.contextmanager
def running_gateway(cfg, curve=None) -> Iterator[str]:
    """The gateway app for ``cfg`` (port ignored) on uvicorn in a thread; yields its URL."""
    uvicorn = pytest.importorskip("uvicorn")
    from clients.web.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(cfg, curve), host="127.0.0.1", port=0,
                                           log_level="warning",
                                           ws_max_size=2 * cfg.max_message_bytes))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)

"""A real ``masa-rt serve`` in its own process on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextmanager
def serving(*args: str) -> Iterator[str]:
    """``masa-rt serve ARGS`` on free loopback ports; yields its ROUTER address and stops it
    with SIGTERM (as Ctrl-C would) on the way out."""
    cmd = [sys.executable, "-m", "masa_rt.cli", "serve", "--bind", "tcp://127.0.0.1:0",
           "--pub", "tcp://127.0.0.1:0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        yield wait_for_bind(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def wait_for_bind(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """The ROUTER endpoint from the server's 'event=serving' log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"server exited: {proc.wait()}")
        m = re.search(r"event=serving bind=(\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("server did not start")

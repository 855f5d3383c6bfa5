"""The child that prepares a model (export, reference build) for serve: its progress is
shown, its error is one line, and stopping serve stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

from engine.serve_commands import _run_child


def test_the_childs_output_comes_through_and_its_last_line_is_the_error(capsys):
    code, out, last = _run_child([sys.executable, "-c",
                                  "import sys; print('step 1/2', file=sys.stderr); "
                                  "print('{\"onnx\": 1}'); "
                                  "sys.exit('no such checkpoint')"])
    assert code == 1 and out.strip() == '{"onnx": 1}' and last == "no such checkpoint"
    assert "step 1/2" in capsys.readouterr().err  # shown as it came, not swallowed


def _alive(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


def test_sigterm_to_the_parent_stops_the_child():
    marker = f"masa-rt-test-{uuid.uuid4().hex}"
    sleeper = (f"import sys, time; print('building', file=sys.stderr, flush=True); "
               f"time.sleep(60)  # {marker}")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from engine.serve_commands import _run_child; "
         f"_run_child([sys.executable, '-c', {sleeper!r}])"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert parent.stderr.readline().strip() == "building"  # the child runs
        assert _alive(marker)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=20) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(marker)
    finally:
        parent.kill()
        subprocess.run(["pkill", "-f", marker], check=False)

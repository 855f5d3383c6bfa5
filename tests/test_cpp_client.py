"""C++ client: build it with CMake, stream a file to a fake server, check what arrived."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fake_server import FakeServer

from clients.export_raw import export_raw
from clients.replay import Recording

ROOT = Path(__file__).resolve().parents[1]


def _missing_toolchain() -> str | None:
    """Why the C++ client cannot be built here, or None if it can."""
    for tool in ("cmake", "c++", "pkg-config"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    for module in (("libzmq",), ("msgpack-c", "msgpack")):
        ok = any(subprocess.run(["pkg-config", "--exists", m]).returncode == 0 for m in module)
        if not ok:
            return f"pkg-config module {module[0]} missing (apt-get install libzmq3-dev " \
                   f"libmsgpack-dev)"
    return None


pytestmark = pytest.mark.skipif(_missing_toolchain() is not None,
                                reason=f"C++ client not buildable: {_missing_toolchain()}")


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return build / "masa_stream_file"


@pytest.fixture(scope="module")
def outlet_checks(stream_file) -> Path:
    """clients/cpp/outlet_checks.cpp, built by CMake with the library."""
    return stream_file.parent / "masa_outlet_checks"


def test_outlet_checks(outlet_checks):
    """Bad stamps/joints refused locally; queued replies read before liveness; timeouts."""
    with FakeServer() as server:
        done = subprocess.run([str(outlet_checks), server.address, "tcp://127.0.0.1:1"],
                              capture_output=True, text=True, timeout=60)
        frames = list(server.frames)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "all checks passed"
    stamps = [f["t"] for f in frames if f["session"] == "cpp-checks"]
    assert [f["seq"] for f in frames if f["session"] == "cpp-checks"] == [0, 1, 2, 3]
    assert stamps == sorted(set(stamps))  # strictly increasing


def test_stream_file_delivers_every_frame_intact(stream_file, tmp_path):
    rng = np.random.default_rng(0)
    joints = rng.normal(size=(25, 42, 3)).astype(np.float32)
    joints[3, 7] = np.nan  # missing joint must survive the trip
    raw = export_raw(Recording(joints, "h2o_hands", 200.0), tmp_path / "seq.masaraw")
    with FakeServer(lookahead_s=0.1) as server:
        done = subprocess.run([str(stream_file), str(raw), "--address", server.address,
                               "--session", "cpp-headset"],
                              capture_output=True, text=True, timeout=60)
        frames = list(server.frames)
        hellos, byes = list(server.hellos), list(server.byes)
    assert done.returncode == 0, done.stdout + done.stderr
    assert hellos[0]["layout"] == "h2o_hands" and hellos[0]["fps"] == 200.0
    assert [f["seq"] for f in frames] == list(range(25))
    assert all(f["session"] == "cpp-headset" for f in frames)
    received = np.stack([f["joints"] for f in frames])
    assert received.shape == joints.shape and received.tobytes() == joints.tobytes()
    stamps = [f["t"] for f in frames]
    assert stamps == sorted(stamps)  # capture stamps from the monotonic clock
    lines = done.stdout.splitlines()
    assert lines[0].endswith(" lookahead_s=0.100")  # the welcome's lag, read by the client
    assert sum(line.startswith("estimate seq=") for line in lines) == 25
    assert lines[-1] == "done sent=25 answered=25 rejected=0 dropped=0"
    assert byes == ["cpp-headset"]


def test_stream_file_reports_refusal(stream_file, tmp_path):
    raw = export_raw(Recording(np.zeros((2, 42, 3), np.float32), "h2o_hands", 30.0),
                     tmp_path / "seq.masaraw")
    with FakeServer(refuse="wrong_layout") as server:
        done = subprocess.run([str(stream_file), str(raw), "--address", server.address],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "server refused: wrong_layout" in done.stderr

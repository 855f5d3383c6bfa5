"""The pages' msgpack.js against Python's msgpack, run in Node where it is installed:
whatever Python packs, the script decodes and packs back to the same value."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest

NODE = shutil.which("node")
SCRIPT = Path(__file__).resolve().parents[1] / "clients" / "web" / "static" / "msgpack.js"
ROUND_TRIP = """
import { decode, encode } from "./msgpack.mjs";
import { readFileSync, writeFileSync } from "node:fs";
writeFileSync(process.argv[3], encode(decode(readFileSync(process.argv[2]))));
"""


@pytest.mark.skipif(NODE is None, reason="node not installed")
def test_msgpack_js_round_trips_what_python_packs(tmp_path):
    value = {
        "ints": [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1,
                 -1, -32, -33, -128, -129, -32769, -(2**31), -(2**31) - 1, -(2**63)],
        "floats": [0.5, -1.25, 1e300, 3.0e-9],
        "text": ["", "phase é ✓", "x" * 31, "y" * 32, "z" * 300, "w" * 70_000],
        "bin": [b"", b"\x00\xff" * 8, bytes(range(256)) * 300],
        "nested": {str(k): [k, None, True, False, {"deep": [k]}] for k in range(20)},
        "array16": list(range(20)),
        "none": None,
    }
    packed = msgpack.packb(value, use_bin_type=True)
    (tmp_path / "msgpack.mjs").write_text(SCRIPT.read_text())
    (tmp_path / "round_trip.mjs").write_text(ROUND_TRIP)
    (tmp_path / "in.bin").write_bytes(packed)
    subprocess.run([NODE, "round_trip.mjs", "in.bin", "out.bin"], cwd=tmp_path, check=True,
                   timeout=60)
    assert msgpack.unpackb((tmp_path / "out.bin").read_bytes(), raw=False) == value

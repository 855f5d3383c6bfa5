"""Export a sequence as a raw pose file for native clients (``clients/cpp/stream_file``).

Format (``.masaraw``, version 1): one ASCII header line of ``key=value`` tokens, then the
joints as raw little-endian float32, frame after frame, joint after joint, ``(T, J, C)``::

    MASA-RAW 1 frames=T joints=J dims=C fps=30 layout=h2o_hands\\n<T*J*C float32 LE>

Why not the .npz: a C++ headset app should not need a zip and npy reader to stream a
recording; this file is one ``getline`` and one ``read``. NaN (missing joint) survives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clients.replay import Recording, load_recording

MAGIC = "MASA-RAW"
VERSION = 1


def export_raw(source: str | Path | Any, out: str | Path) -> Path:
    """Write ``source`` (.npz path or sequence-like object) as a .masaraw file."""
    rec = load_recording(source)
    T, J, C = rec.joints.shape
    header = f"{MAGIC} {VERSION} frames={T} joints={J} dims={C} fps={rec.fps:g} layout={rec.layout}"
    out = Path(out)
    with open(out, "wb") as f:
        f.write(header.encode("ascii") + b"\n")
        f.write(rec.joints.astype("<f4", copy=False).tobytes())
    return out


def read_raw(path: str | Path) -> Recording:
    """Read a .masaraw file back (tests, and checking an export)."""
    with open(path, "rb") as f:
        magic, version, *tokens = f.readline().decode("ascii").split()
        if magic != MAGIC or int(version) != VERSION:
            raise ValueError(f"{path}: not a {MAGIC} v{VERSION} file")
        meta = dict(t.split("=", 1) for t in tokens)
        shape = (int(meta["frames"]), int(meta["joints"]), int(meta["dims"]))
        joints = np.frombuffer(f.read(), dtype="<f4")
    if joints.size != np.prod(shape):
        raise ValueError(f"{path}: {joints.size} floats, header says {shape}")
    return Recording(joints.reshape(shape), meta["layout"], float(meta["fps"]))

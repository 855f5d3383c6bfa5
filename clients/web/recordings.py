"""Recordings the headset page can replay when there is no XR: the gateway's folder of
``.npz`` sequences (the shipped ``examples/demos``) or a file the page uploads.

The page gets a recording as one msgpack map, so it needs no zip or .npy reader::

    {"v": 1, "type": "recording", "name": str, "layout": str, "fps": number,
     "activity": str | nil, "shape": [T, J, C], "dtype": "<f4", "data": bin}

Files are read by ``clients.replay.load_recording`` (numpy, ``allow_pickle=False``), the
reader ``masa-rt replay`` uses; a file that is not a recording is a one-line ValueError.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import msgpack
import numpy as np

from clients.replay import Recording, load_recording


def list_recordings(folder: Path | None) -> list[str]:
    """Names of the ``.npz`` recordings in ``folder`` (references and junk left out)."""
    if folder is None or not folder.is_dir():
        return []
    return [p.name for p in sorted(folder.glob("*.npz")) if _is_recording(p)]


def _is_recording(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {"joints", "layout", "fps"} <= set(f.files) and "embeddings" not in f.files
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError):
        return False  # AttributeError: a bare .npy array has no .files


def named_recording(folder: Path | None, name: str) -> bytes:
    """The listed recording ``name`` as a message; only listed names (no paths) are served."""
    if name not in list_recordings(folder):
        raise FileNotFoundError(f"no recording {name!r} here (see /recordings)")
    return _message(load_recording(folder / name), name)


def uploaded_recording(data: bytes, name: str, max_unpacked_bytes: int = 256 << 20) -> bytes:
    """An uploaded ``.npz`` file's recording as a message; ValueError if it is not one,
    or if its arrays would unpack to more than ``max_unpacked_bytes`` (a compressed .npz
    of a few MiB can claim gigabytes)."""
    _check_unpacked_size(data, name, max_unpacked_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.npz"
        path.write_bytes(data)
        try:
            recording = load_recording(path)
        except ValueError as exc:  # the message names the temporary file: name the upload
            raise ValueError(str(exc).replace(str(path), name or "upload")) from None
    return _message(recording, name)


def _check_unpacked_size(data: bytes, name: str, limit: int) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, ValueError):
        return  # not a zip: load_recording says what it is instead
    if total > limit:
        raise ValueError(f"{name}: its arrays unpack to {total} bytes, over {limit}")


def _message(rec: Recording, name: str) -> bytes:
    joints = np.ascontiguousarray(rec.joints, dtype="<f4")
    return msgpack.packb({"v": 1, "type": "recording", "name": name, "layout": rec.layout,
                          "fps": rec.fps, "activity": rec.activity,
                          "shape": list(joints.shape), "dtype": "<f4",
                          "data": joints.tobytes()}, use_bin_type=True)

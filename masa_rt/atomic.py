"""Crash-safe file writes.

A reader (the engine hot-reloading a reference, a trainer resuming from a checkpoint) must
never see a half-written file. Every writer in masa-rt therefore writes to a temporary file
in the *same directory* (so ``os.replace`` is an atomic rename on the same filesystem),
fsyncs it, and only then renames it over the target. On any exception the temporary file
is removed and the previous version of the target stays untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_json"]


def _current_umask() -> int:
    # mkstemp creates files 0600; the result should get the permissions a plain open()
    # would give. Reading the umask means setting it, so do it once at import time.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort, since some platforms cannot open a dir."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` atomically when the block exits cleanly.

    ``mode`` must be a write mode (``"wb"`` or ``"w"``); text mode uses UTF-8. Write to
    the yielded file object, not to ``path`` (``np.savez(f, ...)`` with the file object
    works; with a str path numpy would append ``.npz`` and bypass the rename).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode: expected 'w' or 'wb', found {mode!r}")
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    encoding = None if "b" in mode else "utf-8"
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave litter next to the target.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(directory)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)

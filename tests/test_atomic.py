"""Tests for masa_rt.atomic: the target is either the old file or the new one, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from masa_rt.atomic import atomic_write, atomic_write_json


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_writes_bytes_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with atomic_write(target) as f:
        f.write(b"hello")
    assert target.read_bytes() == b"hello"
    assert _siblings(target) == ["out.bin"]


def test_text_mode_and_replacing_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "note.txt"
    target.write_text("old")
    with atomic_write(target, "w") as f:
        f.write("new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"


def test_exception_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as f:
        f.write(b"partial new contents")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _siblings(target) == ["keep.bin"]


def test_exception_without_old_file_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "never.bin"
    with pytest.raises(KeyError), atomic_write(target) as f:
        f.write(b"x")
        raise KeyError("stop")
    assert _siblings(target) == []


def test_temp_file_lives_in_target_directory(tmp_path: Path) -> None:
    # Same directory = same filesystem, which is what makes os.replace atomic.
    target = tmp_path / "sub" / "x.bin"
    target.parent.mkdir()
    with atomic_write(target) as f:
        f.write(b"x")
        (temp,) = _siblings(target)
        assert temp.startswith(".x.bin.") and temp.endswith(".tmp")
    assert _siblings(target) == ["x.bin"]


def test_numpy_savez_through_file_object(tmp_path: Path) -> None:
    target = tmp_path / "arrays.npz"
    with atomic_write(target) as f:
        np.savez_compressed(f, a=np.arange(5), b=np.array("text"))
    assert _siblings(target) == ["arrays.npz"]  # no "arrays.npz.npz"
    with np.load(target, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["a"], np.arange(5))
        assert str(z["b"]) == "text"


def test_file_gets_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "perm.bin"
    with atomic_write(target) as f:
        f.write(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_json_and_bad_values(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": [1, 2], "b": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "ü"}
    with pytest.raises(ValueError):
        atomic_write_json(target, {"nan": float("nan")})  # NaN is not JSON
    assert json.loads(target.read_text(encoding="utf-8"))["a"] == [1, 2]
    assert _siblings(target) == ["m.json"]


def test_rejects_read_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "r", "rb"):
        pass

"""Small helpers the command-line plugins share: checked numeric argparse types and a
check of output paths.

A numeric option out of range is refused by argparse itself (``masa-rt eval: error:
argument --max-videos: expected an integer >= 1, found '0'``, exit status 2) instead of
running with a value that gives an empty or silently wrong result. Light on purpose: no
torch, no numpy, so ``masa-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["check_output_path", "float_range", "int_range", "nonnegative_int",
           "positive_float", "positive_int", "probability"]


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def _number(kind: type, what: str, lo: float | None, hi: float | None, lo_open: bool,
            hi_open: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` between ``lo`` and ``hi``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}") from None
        bad = (not math.isfinite(value)
               or (lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (None: unbounded on that side)."""
    what = f"an integer {_bounds(lo, hi, False, False)}".rstrip()
    return _number(int, what, lo, hi, False, False)


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number between ``lo`` and ``hi`` (open ends if asked)."""
    what = f"a finite number {_bounds(lo, hi, lo_open, hi_open)}".rstrip()
    return _number(float, what, lo, hi, lo_open, hi_open)


positive_int = int_range(1)
nonnegative_int = int_range(0)
positive_float = float_range(0.0, lo_open=True)
probability = float_range(0.0, 1.0)


def check_output_path(out: str | os.PathLike[str],
                      inputs: Iterable[str | os.PathLike[str] | None] = (),
                      replaceable: tuple[str, Callable[[Path], bool]] | None = None) -> Path:
    """Refuse an output file that is a directory or one of ``inputs`` (compared resolved, so
    ``./a.npz`` and ``a.npz`` are the same file); returns ``Path(out)``. ``replaceable``
    ``(what, test)``: an existing file is replaced only if ``test(path)`` says it is
    ``what`` (a previous output), never a recording or anything else found there.

    Raises ValueError naming the path, before the slow part of the command: writing it
    would destroy an input or another file, or fail with a bare ``IsADirectoryError``.
    """
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory, not a file: give a file path "
                         "(inside it, or elsewhere)")
    target = path.resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == target:
            raise ValueError(f"output {path} is also an input ({item}); writing it would "
                             "replace the input: choose another output path")
    if replaceable is not None and path.exists():
        what, test = replaceable
        if not test(path):
            raise ValueError(f"output {path} exists and is not {what}; refusing to replace "
                             "it: remove it first or choose another output path")
    return path

"""Phase labels from a CSV of boundaries: ``masa-rt label DEMO --phases FILE``.

A person watching a recording notes where each phase starts. The CSV has a header and one
row per boundary, in order:

    time,phase              frame,phase
    0,reach_carton          0,reach_carton
    1.0,grasp_carton        30,grasp_carton
    1.5,lift                45,lift

``time``: seconds from the recording's first frame (its ``timestamps``, else frame / fps);
``frame``: 0-based frame index. The first phase starts at 0; each phase runs until the
next boundary, the last one to the end. A name may come back (a repeated phase) and keeps
its first id. The result is what ``masa-rt reference build`` reads (docs/formats.md):
``phases`` (T,) int32 ids into ``phase_names``, in order of first appearance.

Any problem is a :class:`LabelError` (a ``ValueError``) of one line naming the file and
the CSV line: unknown or missing columns, a start that is not a number, boundaries that do
not increase, a boundary outside the recording, a phase that covers no frame.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from masa_rt.sequence import Sequence

__all__ = ["Boundaries", "LabelError", "frame_times", "label_sequence", "phase_labels",
           "read_boundaries"]

UNITS = ("time", "frame")  # what a boundary's start is: seconds or a frame index
_TOLERANCE_S = 1e-6  # a boundary typed to the microsecond still lands on its frame


class LabelError(ValueError):
    """A phase CSV that cannot label the recording; one line."""


@dataclass(frozen=True)
class Boundaries:
    """Phase starts read from a CSV: ``starts[i]`` (seconds or frames) begins ``names[i]``."""

    file: str
    unit: str  # "time" | "frame"
    starts: tuple[float, ...]
    names: tuple[str, ...]
    lines: tuple[int, ...]  # CSV line of each row, for errors


def read_boundaries(path: str | Path) -> Boundaries:
    """Parse and check a boundary CSV (everything that does not need the recording)."""
    name = str(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1)
                if any(cell.strip() for cell in row)]  # blank lines are not boundaries
    if not rows:
        raise LabelError(f"{name}: empty: expected a header 'time,phase' or 'frame,phase' "
                         "and one row per phase start")
    unit, start_col, phase_col = _header(name, rows[0][1])
    starts, names, lines = [], [], []
    for line, row in rows[1:]:
        if len(row) != 2:
            raise LabelError(f"{name} line {line}: expected 2 fields ({unit}, phase), found "
                             f"{len(row)}")
        start = _start(name, line, unit, row[start_col].strip())
        phase = row[phase_col].strip()
        if not phase:
            raise LabelError(f"{name} line {line}: empty phase name")
        if starts and not start > starts[-1]:
            raise LabelError(f"{name} line {line}: boundaries must increase: {unit} "
                             f"{start:g} after {starts[-1]:g} (line {lines[-1]})")
        starts.append(start)
        names.append(phase)
        lines.append(line)
    if not starts:
        raise LabelError(f"{name}: no boundaries after the header")
    if starts[0] != 0:
        raise LabelError(f"{name} line {lines[0]}: the first phase must start at {unit} 0 "
                         f"(frames before {starts[0]:g} would have no phase)")
    return Boundaries(name, unit, tuple(starts), tuple(names), tuple(lines))


def _header(name: str, header: list[str]) -> tuple[str, int, int]:
    """(unit, column of the start, column of the phase) from the header row."""
    cols = [c.strip().lower() for c in header]
    for c in cols:
        if c not in (*UNITS, "phase"):
            raise LabelError(f"{name} line 1: unknown column {c!r} (expected a header "
                             "'time,phase' or 'frame,phase')")
    units = [c for c in cols if c in UNITS]
    if len(cols) != 2 or len(units) != 1 or "phase" not in cols:
        raise LabelError(f"{name} line 1: expected a header 'time,phase' or 'frame,phase', "
                         f"found {','.join(cols)!r}")
    return units[0], cols.index(units[0]), cols.index("phase")


def _start(name: str, line: int, unit: str, text: str) -> float:
    """One boundary's start: a finite number >= 0; a whole number for frames."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        what = "seconds >= 0" if unit == "time" else "a frame index >= 0"
        raise LabelError(f"{name} line {line}: {unit}: expected {what}, found {text!r}")
    if unit == "frame" and value != int(value):
        raise LabelError(f"{name} line {line}: frame: expected a whole frame index, found "
                         f"{text!r}")
    return value


def frame_times(seq: Sequence) -> np.ndarray:
    """Seconds of each frame from the first (its timestamps, else frame / fps)."""
    if seq.timestamps is not None:
        t = np.asarray(seq.timestamps, dtype=np.float64)
        return t - t[0]
    return np.arange(seq.num_frames) / float(seq.fps)


def phase_labels(b: Boundaries, times: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(phases (T,) int32, phase_names) for frames at ``times`` (s from the first frame)."""
    n = len(times)
    # Each row's first frame: the first frame at or after its start.
    if b.unit == "frame":
        firsts = np.asarray(b.starts, dtype=np.int64)
        outside = firsts >= n
        where = f"frames 0 to {n - 1}"
    else:
        firsts = np.searchsorted(times, np.asarray(b.starts) - _TOLERANCE_S, side="left")
        outside = np.asarray(b.starts) > times[-1] + _TOLERANCE_S
        where = f"0 to {times[-1]:.3f} s"
    for k in np.flatnonzero(outside)[:1]:
        raise LabelError(f"{b.file} line {b.lines[k]}: {b.unit} {b.starts[k]:g} is outside "
                         f"the recording ({where})")
    ends = np.append(firsts[1:], n)
    for k in np.flatnonzero(ends <= firsts)[:1]:
        raise LabelError(f"{b.file} line {b.lines[k]}: phase {b.names[k]!r} covers no frame "
                         f"(the next boundary, line {b.lines[k + 1]}, comes before the next "
                         "frame)")
    names = tuple(dict.fromkeys(b.names))  # first appearance order; repeats share an id
    ids = np.array([names.index(p) for p in b.names], dtype=np.int32)
    phases = np.repeat(ids, ends - firsts).astype(np.int32)
    return phases, names


def label_sequence(seq: Sequence, boundaries: Boundaries,
                   activity: str | None = None) -> Sequence:
    """``seq`` with ``phases`` / ``phase_names`` from ``boundaries`` (and ``activity``)."""
    phases, names = phase_labels(boundaries, frame_times(seq))
    return replace(seq, phases=phases, phase_names=names,
                   activity=activity if activity is not None else seq.activity)


def default_output(demo: str | Path) -> Path:
    """Where ``masa-rt label DEMO`` writes without ``-o``: ``DEMO``'s stem + ``.labelled.npz``
    beside it (never the recording itself)."""
    demo = Path(demo)
    return demo.with_name(demo.stem + ".labelled.npz")


def run_cli(args) -> int:
    """``masa-rt label DEMO --phases FILE [-o OUT] [--activity NAME]``."""
    from masa_rt.cli_types import check_output_path
    from masa_rt.sequence import SequenceFormatError, load_sequence, save_sequence

    def is_sequence(path: Path) -> bool:  # a previous output may be replaced, nothing else
        try:
            load_sequence(path)
        except (SequenceFormatError, OSError):
            return False
        return True

    out = check_output_path(args.out or default_output(args.demo), [args.demo, args.phases],
                            replaceable=("a sequence file", is_sequence))
    boundaries = read_boundaries(args.phases)  # the CSV first: it is the likelier mistake
    labelled = label_sequence(load_sequence(args.demo), boundaries, args.activity)
    save_sequence(out, labelled)
    times = frame_times(labelled)
    print(f"wrote {out}: {len(labelled.phase_names)} phases over {labelled.num_frames} frames "
          f"({times[-1]:.2f} s)")
    for first, last in _segments(labelled.phases):
        name = labelled.phase_names[labelled.phases[first]]
        print(f"  {name:<24} frames {first}-{last}  ({times[first]:.2f}-{times[last]:.2f} s)")
    return 0


def _segments(phases: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) frame of each run of one phase id."""
    starts = np.flatnonzero(np.diff(phases, prepend=-1))
    ends = np.append(starts[1:], len(phases)) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))

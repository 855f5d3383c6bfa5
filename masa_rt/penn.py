"""Penn Action import: the official ``labels/*.mat`` keypoints -> a masa-rt dataset folder.

Penn Action (Zhang, Zhu, Derpanis, "From Actemes to Action", ICCV 2013) ships one MATLAB
file per video with 13 2D joints per frame. We convert each video to one ``<id>.npz``
sequence in the ``penn13`` layout and write a ``manifest.json``, so the trainer and the
evaluation see real data through exactly the same API as synthetic data.

Choices, and why:

* Raw pixel coordinates (x right, y down) are kept; ``skeleton.normalise`` does the
  root/scale normalisation downstream, and keeping pixels lets ``inspect`` draw the frames
  over the image geometry without guessing.
* Joints with ``visibility == 0`` become NaN: the annotators' guesses for occluded joints
  are unreliable, and NaN is the format's one way to say "missing".
* ``fps = 30``: the .mat files carry no frame rate. Penn Action was collected from online
  videos that are (near-)universally 30 fps, and the dataset literature treats it as such;
  this is an assumption, not a fact read from the data.
* Split: the official ``train`` flag, ``+1 -> "train"`` and ``-1 -> "val"`` (the official
  test set serves as our validation split; there are no phase labels to tune on anyway).
* Joint names are the official ones, unchanged. Note that they look viewer-relative: over
  the converted data, ``l_shoulder`` is image-left of ``r_shoulder`` in 77% of the frames
  of "front" videos and in 10% of "back" ones (anatomical naming would give the reverse).
  Mirror augmentation makes this harmless for training; a left/right-sensitive consumer
  must decide which convention it wants.
* ``bbox`` and ``dimensions`` are not stored: nothing downstream uses them, and two official
  files have a bbox with fewer rows than frames, which must not fail the import.

* A video with no visible joint at all is skipped with a logged warning, not converted:
  the format forbids an all-missing sequence, and the one such official video (1516, a
  pushup) repeats a single placeholder pose in all 68 frames, so it carries no motion.

* ``events=True`` (``--events``) also labels the videos of the actions in
  ``masa_rt.penn_events`` with rule-based key-event phases (``phases`` /
  ``phase_names``); a video the rule refuses is still written, unlabelled. The per-action
  counts go to ``events.json`` beside the manifest. The one manifest stays the index:
  a consumer wanting labelled videos checks ``seq.phases is not None`` or reads the
  labelled ids in ``events.json``.

A malformed file never aborts the whole import: every failure is collected as one line
naming the file and field, the good videos are still written, and the import then raises
``PennImportError`` listing the failures (the CLI exits non-zero).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from masa_rt import penn_events
from masa_rt.atomic import atomic_write_json
from masa_rt.sequence import Manifest, ManifestEntry, Sequence, save_manifest, save_sequence

__all__ = [
    "PENN_FPS",
    "PENN_JOINTS",
    "NothingVisibleError",
    "PennFormatError",
    "PennImportError",
    "PennVideo",
    "import_penn",
    "read_penn_mat",
    "run_cli",
]

PENN_FPS = 30.0  # assumption, see the module docstring
PENN_JOINTS = 13
LAYOUT = "penn13"
SOURCE_PREFIX = "pennaction"
EVENTS_NAME = "events.json"
_SPLITS = {1: "train", -1: "val"}
log = logging.getLogger(__name__)


class PennFormatError(ValueError):
    """One malformed Penn Action file; the message is one line: ``file: field: problem``."""


class NothingVisibleError(PennFormatError):
    """A well-formed file whose every joint is invisible: skipped, not a failure."""


class PennImportError(ValueError):
    """Some files failed to convert; the others were written and are in ``manifest``."""

    def __init__(self, failures: list[str], manifest: Manifest):
        self.failures = failures
        self.manifest = manifest
        super().__init__(
            f"{len(failures)} Penn Action file(s) failed to convert, first: {failures[0]}"
        )


@dataclass(frozen=True)
class PennVideo:
    """One video's annotations, validated. ``joints`` is float32 ``(T, 13, 2)`` in pixels."""

    video_id: str
    action: str
    split: str
    joints: np.ndarray


def _field(mat: dict, name: str, where: str) -> np.ndarray:
    if name not in mat:
        raise PennFormatError(f"{where}: {name}: missing field")
    return np.asarray(mat[name])


def _string_field(mat: dict, name: str, where: str) -> str:
    """MATLAB strings arrive as a 1-element unicode array; anything else is malformed."""
    value = _field(mat, name, where).ravel()
    if value.size != 1 or value.dtype.kind != "U" or not str(value[0]).strip():
        raise PennFormatError(f"{where}: {name}: expected a non-empty string")
    return str(value[0]).strip()


def _int_field(mat: dict, name: str, where: str) -> int:
    value = _field(mat, name, where).ravel()
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise PennFormatError(f"{where}: {name}: expected one number, found {value.size} values")
    return int(value[0])


def _coords_field(mat: dict, name: str, where: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """A (T, 13) numeric array; ``shape`` pins T to the first coordinate array read."""
    value = _field(mat, name, where)
    if value.dtype.kind not in "iuf" or value.ndim != 2 or value.shape[1] != PENN_JOINTS:
        raise PennFormatError(
            f"{where}: {name}: expected a numeric (nframes, {PENN_JOINTS}) array, "
            f"found {value.dtype} {value.shape}"
        )
    if shape is not None and value.shape != shape:
        raise PennFormatError(f"{where}: {name}: shape {value.shape} differs from x {shape}")
    return value


def _load_mat(path: Path) -> dict:
    """scipy raises a zoo of exception types on bad files; fold them into one line."""
    try:
        return scipy.io.loadmat(path)
    except Exception as exc:  # any failure to parse means "not a .mat"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PennFormatError(f"{path.name}: not a readable .mat file ({reason})") from None


def read_penn_mat(path: str | os.PathLike[str]) -> PennVideo:
    """Read and validate one ``labels/<id>.mat``; raises ``PennFormatError`` on any defect."""
    path = Path(path)
    where = path.name
    mat = _load_mat(path)
    x = _coords_field(mat, "x", where, None)
    y = _coords_field(mat, "y", where, x.shape)
    visibility = _coords_field(mat, "visibility", where, x.shape)
    if x.shape[0] == 0:
        raise PennFormatError(f"{where}: x: no frames")
    nframes = _int_field(mat, "nframes", where)
    if nframes != x.shape[0]:
        raise PennFormatError(f"{where}: nframes: says {nframes}, x has {x.shape[0]} rows")
    train = _int_field(mat, "train", where)
    if train not in _SPLITS:
        raise PennFormatError(f"{where}: train: expected +1 or -1, found {train}")
    joints = np.stack([x, y], axis=-1).astype(np.float32)  # (T, 13, 2)
    joints[visibility == 0] = np.nan
    if np.isnan(joints).all():
        raise NothingVisibleError(f"{where}: visibility: no joint is visible in any frame")
    return PennVideo(path.stem, _string_field(mat, "action", where), _SPLITS[train], joints)


def to_sequence(video: PennVideo) -> Sequence:
    """The masa-rt sequence for one video (no phases: Penn Action has no phase labels)."""
    source = f"{SOURCE_PREFIX}/{video.video_id}"
    return Sequence(
        joints=video.joints,
        layout=LAYOUT,
        fps=PENN_FPS,
        activity=video.action,
        subject=source,
        source=source,
    )


def _with_events(seq: Sequence, video: PennVideo) -> dict | None:
    """Label ``seq`` in place when its action has a rule; the video's summary record."""
    if video.action not in penn_events.ACTIONS:
        return None
    labels, result, agree = penn_events.outcome(video.action, video.joints)
    if labels is not None:
        seq.phases, seq.phase_names = labels.phases, labels.phase_names
    return {"video": video.video_id, "action": video.action, "split": video.split,
            "outcome": result, "agree": agree}


def _convert_one(job: tuple[str, str, bool]) -> tuple[str, tuple | str]:
    """Worker: convert one file -> ("ok", (entry, event record or None)) |
    ("skipped", reason) | ("failed", error).

    Reasons travel back as values, not log records, because a worker process may not
    share the parent's logging setup. The event rule runs here too, so it is spread over
    the pool like the conversion.
    """
    mat_path, out_dir, events = job
    try:
        video = read_penn_mat(mat_path)
        name = f"{video.video_id}.npz"
        seq = to_sequence(video)
        record = _with_events(seq, video) if events else None
        save_sequence(Path(out_dir) / name, seq)
    except NothingVisibleError as exc:
        return "skipped", str(exc)
    except PennFormatError as exc:
        return "failed", str(exc)
    except (OSError, ValueError) as exc:  # a write failure or a sequence-format rejection
        return "failed", f"{Path(mat_path).name}: {' '.join(str(exc).split())}"
    return "ok", (ManifestEntry(file=name, activity=video.action, split=video.split), record)


def _run_jobs(jobs: list[tuple[str, str, bool]], workers: int, progress: bool) -> Iterable:
    bar = dict(total=len(jobs), desc="import-penn", unit="video", disable=not progress)
    if workers <= 1:
        yield from tqdm(map(_convert_one, jobs), **bar)
        return
    # spawn, not fork: a forked child of a process with threads (a zmq context, ONNX
    # Runtime's pool, a test run's servers) can inherit a lock some thread held and wait
    # on it for ever (the test suite hung that way in import-penn's pool).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(_convert_one, jobs, chunksize=16), **bar)


def import_penn(
    labels_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    progress: bool = True,
    events: bool = False,
) -> Manifest:
    """Convert every ``labels_dir/*.mat`` into ``out_dir/<id>.npz`` plus ``manifest.json``.

    With ``events``, the actions with an event rule get phase labels and the per-action
    counts are written to ``out_dir/events.json`` (also when some files fail).

    Returns the manifest. Videos with no visible joint are skipped with a logged warning.
    If any file fails, the others are still written (with a manifest listing only them)
    and ``PennImportError`` is raised with one line per failure.
    """
    labels_dir, out_dir = Path(labels_dir), Path(out_dir)
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"Penn Action labels folder not found: {labels_dir}")
    mats = sorted(labels_dir.glob("*.mat"))
    if not mats:
        raise FileNotFoundError(f"no .mat files in {labels_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(out_dir), events) for p in mats]
    entries, records, failures = [], [], []
    with logging_redirect_tqdm():  # warnings print above the bar, not through it
        for kind, value in _run_jobs(jobs, workers, progress):
            if kind == "ok":
                entries.append(value[0])
                records += [value[1]] if value[1] is not None else []
            elif kind == "skipped":
                log.warning("skipped %s", value)
            else:
                failures.append(value)
    manifest = Manifest(
        layout=LAYOUT,
        fps=PENN_FPS,
        activities=sorted({e.activity for e in entries}),
        files=entries,
    )
    save_manifest(out_dir, manifest)
    if events:
        atomic_write_json(out_dir / EVENTS_NAME, penn_events.summarise(records))
    if failures:
        raise PennImportError(failures, manifest)
    return manifest


def format_counts(manifest: Manifest) -> str:
    """Per-action and per-split video counts, as a small table."""
    per_action = Counter((e.activity, e.split) for e in manifest.files)
    lines = [f"{'action':<16}{'train':>7}{'val':>7}{'total':>7}"]
    for action in manifest.activities:
        tr, va = per_action[(action, "train")], per_action[(action, "val")]
        lines.append(f"{action:<16}{tr:>7}{va:>7}{tr + va:>7}")
    splits = Counter(e.split for e in manifest.files)
    lines.append(
        f"{'all':<16}{splits['train']:>7}{splits['val']:>7}{len(manifest.files):>7}"
    )
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``masa-rt import-penn LABELS_DIR --out DIR [--events]``: convert, print counts (and
    the event-label table) and the elapsed time."""
    # Two workers roughly halve the time: a third of it is fsync (atomic writes), not CPU.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = getattr(args, "workers", None) or min(2, cpus or 1)
    start = time.perf_counter()
    try:
        manifest = import_penn(args.labels_dir, args.out, workers=workers, events=args.events)
        failures: list[str] = []
    except PennImportError as exc:
        manifest, failures = exc.manifest, exc.failures
    elapsed = time.perf_counter() - start
    n_mats = len(list(Path(args.labels_dir).glob("*.mat")))
    skipped = n_mats - len(manifest.files) - len(failures)
    print(format_counts(manifest))
    if args.events:
        summary = json.loads((Path(args.out) / EVENTS_NAME).read_text())
        print(f"event phase labels (labelled/videos; second signal agrees/checked), "
              f"{Path(args.out) / EVENTS_NAME}:")
        print(penn_events.format_table(summary))
    print(f"wrote {len(manifest.files)} of {n_mats} videos to {args.out} in {elapsed:.1f} s"
          + (f" ({skipped} skipped, see warnings)" if skipped else ""))
    for line in failures:
        print(f"failed: {line}")
    if failures:
        print(f"{len(failures)} file(s) failed to convert")
        return 1
    return 0

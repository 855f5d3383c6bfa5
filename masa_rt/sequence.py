"""The ``.npz`` sequence format (v1) and datasets of such files.

One sequence = one ``.npz`` file (see ``docs/formats.md`` for the field table). Files are
read with ``allow_pickle=False`` and checked field by field; any problem raises
:class:`SequenceFormatError` with one line ``"<file>: field '<field>': expected <...>,
found <...>"`` so a user can fix their converter without a debugger. Writes are atomic.

A dataset is a folder of sequence files plus ``manifest.json`` listing each file with its
activity and split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as _Seq
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masa_rt.atomic import atomic_write, atomic_write_json
from masa_rt.layout_file import LayoutFileError, declaration_of, declare, declare_json
from masa_rt.layout_file import load_layout_file as _load_layout_file
from masa_rt.skeleton import LAYOUTS, Layout, UnknownLayoutError, get_layout

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "Dataset",
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "Sequence",
    "SequenceFormatError",
    "load_manifest",
    "load_sequence",
    "save_manifest",
    "save_sequence",
    "write_dataset_files",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
_STRING_FIELDS = ("activity", "subject", "source")


class SequenceFormatError(ValueError):
    """A sequence file (or manifest) that does not follow the format; one-line message."""

    def __init__(self, file: str, field: str | None, expected: str, found: str) -> None:
        self.file, self.field, self.expected, self.found = file, field, expected, found
        where = f"{file}: field '{field}'" if field else str(file)
        # One line, always: a message from a nested exception may carry newlines.
        super().__init__(f"{where}: expected {expected}, found {found}".replace("\n", " "))


class ManifestError(SequenceFormatError):
    """A dataset manifest that is missing, malformed or inconsistent with its folder."""


# ---------------------------------------------------------------------------------------
# The Sequence
# ---------------------------------------------------------------------------------------

@dataclass(eq=False)  # arrays have no single truth value; compare fields explicitly
class Sequence:
    """One recorded or synthetic sequence; field meanings in ``docs/formats.md``.

    ``joints`` is ``(T, J, C)`` with NaN for missing joints. Construct freely; call
    :meth:`validate` (``save_sequence`` does) to check it against the format.
    """

    joints: np.ndarray
    layout: str
    fps: float
    timestamps: np.ndarray | None = None
    features: np.ndarray | None = None
    phases: np.ndarray | None = None
    phase_names: tuple[str, ...] | None = None
    canonical_time: np.ndarray | None = None
    activity: str | None = None
    subject: str | None = None
    source: str | None = None

    @property
    def num_frames(self) -> int:
        return int(np.shape(self.joints)[0])

    @property
    def layout_obj(self) -> Layout:
        return get_layout(self.layout)

    def validate(self, name: str = "<memory>") -> None:
        """Raise :class:`SequenceFormatError` (naming ``name``) if this breaks the format."""
        _Checker(name).check({"format_version": FORMAT_VERSION, **self._fields()})

    def _fields(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


# ---------------------------------------------------------------------------------------
# Field checks, shared by validate / save / load so memory and disk obey the same rules
# ---------------------------------------------------------------------------------------

def _describe(value: Any) -> str:
    """Short description of a value for 'found ...' (never a full array dump)."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return f"{value.dtype} scalar {value.item()!r}"
        return f"{value.dtype} array of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Checks raw fields (from a file or a dataclass) and returns canonical values."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, field: str, expected: str, found: str) -> SequenceFormatError:
        return SequenceFormatError(self.name, field, expected, found)

    # --- scalars --------------------------------------------------------------------------

    def string(self, field: str, value: Any) -> str:
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind == "U":
            return str(value[()])
        if isinstance(value, str):
            return value
        raise self.fail(field, "a string", _describe(value))

    def real(self, field: str, value: Any) -> float:
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype.kind not in "iuf":
            raise self.fail(field, "a real number", _describe(value))
        return float(arr)

    # --- arrays ---------------------------------------------------------------------------

    def array(self, field: str, value: Any, kinds: str, ndim: int, what: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype.kind not in kinds:
            raise self.fail(field, f"{what} dtype", f"dtype {arr.dtype}")
        if arr.ndim != ndim:
            raise self.fail(field, f"{ndim}-d array", f"shape {arr.shape}")
        return arr

    def length(self, field: str, arr: np.ndarray, t: int) -> None:
        if arr.shape[0] != t:
            raise self.fail(field, f"length {t} (frames in joints)", f"length {arr.shape[0]}")

    def finite(self, field: str, arr: np.ndarray) -> None:
        if not np.isfinite(arr).all():
            raise self.fail(field, "finite values", "NaN or inf")

    # --- the format -----------------------------------------------------------------------

    def check(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Validate ``raw`` and return canonical fields (dtypes cast, strings as str)."""
        if "joints" not in raw and "embeddings" in raw:  # masa_rt.align.Reference.save's keys
            raise SequenceFormatError(self.name, None, "a recording (joints, layout, fps)",
                                      "a built reference (embeddings, no joints): give the "
                                      "demo recording it was built from")
        for field in ("format_version", "joints", "layout", "fps"):
            if field not in raw:
                raise self.fail(field, "a value (required field)", "none")
        self.version(raw["format_version"])
        if "layout_declaration" in raw:  # a self-describing recording of a declared layout
            self.declaration(raw["layout_declaration"])
        out: dict[str, Any] = {"layout": self.layout(raw["layout"])}
        out["joints"] = self.joints(raw["joints"], get_layout(out["layout"]))
        t = out["joints"].shape[0]
        fps = self.real("fps", raw["fps"])
        if not (math.isfinite(fps) and fps > 0):
            raise self.fail("fps", "a finite number > 0", repr(fps))
        out["fps"] = fps
        if "timestamps" in raw:
            out["timestamps"] = self.timestamps(raw["timestamps"], t)
        if "features" in raw:
            feats = self.array("features", raw["features"], "f", 2, "floating")
            self.length("features", feats, t)
            self.finite("features", feats)
            out["features"] = feats.astype(np.float32)
        out.update(self.phases(raw, t))
        if "canonical_time" in raw:
            out["canonical_time"] = self.canonical_time(raw["canonical_time"], t)
        for field in _STRING_FIELDS:
            if field in raw:
                out[field] = self.string(field, raw[field])
        return out

    def version(self, value: Any) -> None:
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype.kind not in "iu":
            raise self.fail("format_version", "an integer scalar", _describe(value))
        if int(arr) > FORMAT_VERSION:
            raise self.fail("format_version", f"<= {FORMAT_VERSION} (this reader; upgrade "
                            "masa-rt to read newer files)", str(int(arr)))
        if int(arr) < 1:
            raise self.fail("format_version", f"1..{FORMAT_VERSION}", str(int(arr)))

    def declaration(self, value: Any) -> None:
        """Declare the layout a file carries (``masa_rt.layout_file``, JSON text)."""
        text = self.string("layout_declaration", value)
        try:
            declare_json(text, f"{self.name}: field 'layout_declaration'")
        except LayoutFileError as e:
            raise self.fail("layout_declaration", "a valid layout declaration",
                            e.problem) from None

    def layout(self, value: Any) -> str:
        name = self.string("layout", value)
        try:
            get_layout(name)
        except UnknownLayoutError:
            known = ", ".join(sorted(LAYOUTS))
            raise self.fail("layout", f"a registered layout ({known})", repr(name)) from None
        return name

    def joints(self, value: Any, layout: Layout) -> np.ndarray:
        j = self.array("joints", value, "f", 3, "floating")
        if j.shape[1:] != (layout.num_joints, layout.dims):
            raise self.fail("joints", f"(T, {layout.num_joints}, {layout.dims}) for layout "
                            f"{layout.name}", f"shape {j.shape}")
        if j.shape[0] == 0:
            raise self.fail("joints", "at least one frame", "T = 0")
        if np.isinf(j).any():
            raise self.fail("joints", "finite values or NaN (missing)", "inf")
        if np.isnan(j).all():
            raise self.fail("joints", "at least one observed joint", "every frame all NaN")
        return j.astype(np.float32)

    def timestamps(self, value: Any, t: int) -> np.ndarray:
        ts = self.array("timestamps", value, "iuf", 1, "numeric")
        self.length("timestamps", ts, t)
        self.finite("timestamps", ts)
        steps = np.diff(ts)
        if (steps < 0).any():
            k = int(np.argmax(steps < 0))
            raise self.fail("timestamps", "non-decreasing seconds",
                            f"{float(ts[k + 1])!r} after {float(ts[k])!r} at frame {k + 1}")
        return ts.astype(np.float64)

    def phases(self, raw: dict[str, Any], t: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "phase_names" in raw:
            names = raw["phase_names"]
            arr = np.asarray(names)
            if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind != "U":
                raise self.fail("phase_names", "a non-empty 1-d list of strings",
                                _describe(names))
            out["phase_names"] = tuple(str(s) for s in arr)
        if "phases" not in raw:
            return out
        if "phase_names" not in out:
            raise self.fail("phase_names", "a list of names (phases are present)", "none")
        phases = self.array("phases", raw["phases"], "iu", 1, "integer")
        self.length("phases", phases, t)
        p = len(out["phase_names"])
        bad = (phases < 0) | (phases >= p)
        if bad.any():
            raise self.fail("phases", f"values in [0, {p}) (len(phase_names))",
                            f"{int(phases[bad][0])} at frame {int(np.argmax(bad))}")
        out["phases"] = phases.astype(np.int32)
        return out

    def canonical_time(self, value: Any, t: int) -> np.ndarray:
        ct = self.array("canonical_time", value, "f", 1, "floating")
        self.length("canonical_time", ct, t)
        self.finite("canonical_time", ct)
        if ct.min() < 0 or ct.max() > 1:
            raise self.fail("canonical_time", "values in [0, 1]",
                            f"range [{ct.min():g}, {ct.max():g}]")
        return ct.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def _to_disk(fields: dict[str, Any]) -> dict[str, np.ndarray]:
    """Canonical fields -> arrays for ``np.savez`` (strings as numpy unicode, no pickles)."""
    arrays = {"format_version": np.array(FORMAT_VERSION, dtype=np.int64)}
    declaration = declaration_of(fields["layout"])
    if declaration is not None:  # a declared layout travels in the file: self-describing
        arrays["layout_declaration"] = np.array(json.dumps(declaration, sort_keys=True),
                                                dtype=np.str_)
    for key, value in fields.items():
        if key == "phase_names":
            arrays[key] = np.array(list(value), dtype=np.str_)
        elif isinstance(value, str):
            arrays[key] = np.array(value, dtype=np.str_)
        else:
            arrays[key] = np.asarray(value)
    return arrays


def save_sequence(path: str | os.PathLike[str], seq: Sequence) -> None:
    """Validate ``seq`` and write it to ``path`` (compressed ``.npz``, atomically)."""
    fields = _Checker(str(path)).check({"format_version": FORMAT_VERSION, **seq._fields()})
    with atomic_write(path, "wb") as f:
        # To the file object: given a str path, numpy would append ".npz" itself.
        np.savez_compressed(f, **_to_disk(fields))


def _read_npz(path: Path) -> dict[str, Any]:
    """All arrays of an ``.npz``; unreadable files become one-line format errors."""
    name = str(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        # Not a zip, truncated, empty, or a pickle (refused by allow_pickle=False).
        raise _unreadable(name, e) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise SequenceFormatError(name, None, "a .npz archive", "a single .npy array")
    with npz:
        return {key: _read_member(npz, key, name) for key in npz.files}


def _read_member(npz: Any, key: str, name: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:
        if "pickle" in str(e):
            raise SequenceFormatError(name, key, "a numeric or string array",
                                      "a pickled object array") from None
        raise _unreadable(name, e) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        # The zip directory was fine but this member's bytes are damaged.
        raise _unreadable(name, e) from None


def _unreadable(name: str, e: Exception) -> SequenceFormatError:
    return SequenceFormatError(name, None, "a .npz (zip) archive",
                               f"an unreadable file ({type(e).__name__}: {e})")


def load_sequence(path: str | os.PathLike[str]) -> Sequence:
    """Read and validate one sequence file (``FileNotFoundError`` if it does not exist)."""
    path = Path(path)
    fields = _Checker(str(path)).check(_read_npz(path))
    return Sequence(**fields)


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestEntry:
    """One file of a dataset: its name relative to the dataset folder, activity, split."""

    file: str
    activity: str
    split: str


@dataclass
class Manifest:
    """The contents of ``manifest.json``; every file shares ``layout`` and ``fps``.

    A declared layout (``masa_rt.layout_file``) is named by ``layout_file`` (a path
    relative to the dataset folder) or carried inline as ``layout_declaration``.
    """

    layout: str
    fps: float
    activities: list[str]
    files: list[ManifestEntry]
    layout_file: str | None = None
    layout_declaration: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"format_version": FORMAT_VERSION, **asdict(self)}
        for key in ("layout_file", "layout_declaration"):  # absent: as manifests always were
            if d[key] is None:
                del d[key]
        return d


def save_manifest(root: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``<root>/manifest.json`` atomically (after checking it)."""
    path = Path(root) / MANIFEST_NAME
    _parse_manifest(manifest.to_json(), str(path))
    atomic_write_json(path, manifest.to_json())


def _parse_manifest(obj: Any, name: str) -> Manifest:
    """Check the JSON structure of a manifest (not the files on disk)."""
    chk = _Checker(name)

    def fail(field: str, expected: str, found: Any) -> ManifestError:
        return ManifestError(name, field, expected, _describe(found))

    if not isinstance(obj, dict):
        raise fail("<root>", "a JSON object", obj)
    for key in ("format_version", "layout", "fps", "activities", "files"):
        if key not in obj:
            raise ManifestError(name, key, "a value (required field)", "none")
    layout_file, declaration = _manifest_declaration(obj, name)
    try:
        chk.version(obj["format_version"])
        layout = chk.layout(obj["layout"])
        fps = chk.real("fps", obj["fps"])
    except SequenceFormatError as e:
        raise ManifestError(name, e.field, e.expected, e.found) from None
    if not (math.isfinite(fps) and fps > 0):
        raise fail("fps", "a finite number > 0", fps)
    activities = obj["activities"]
    if not isinstance(activities, list) or not all(isinstance(a, str) for a in activities):
        raise fail("activities", "a list of strings", activities)
    if not isinstance(obj["files"], list):
        raise fail("files", "a list of {file, activity, split} objects", obj["files"])
    entries = [_parse_entry(e, i, set(activities), fail) for i, e in enumerate(obj["files"])]
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.file in seen:
            raise fail(f"files[{i}].file", "each file listed once", e.file)
        seen.add(e.file)
    return Manifest(layout, fps, list(activities), entries, layout_file, declaration)


def _manifest_declaration(obj: dict[str, Any], name: str
                          ) -> tuple[str | None, dict[str, Any] | None]:
    """Declare the manifest's layout from ``layout_file`` (relative to the manifest's
    folder) or an inline ``layout_declaration``; returns both as found."""
    layout_file, declaration = obj.get("layout_file"), obj.get("layout_declaration")
    if layout_file is not None:
        if not isinstance(layout_file, str) or not layout_file:
            raise ManifestError(name, "layout_file", "a path relative to the dataset folder",
                                _describe(layout_file))
        try:
            _load_layout_file(Path(name).parent / layout_file)
        except FileNotFoundError:
            raise ManifestError(name, "layout_file", "an existing layout file",
                                f"no {layout_file!r} beside the manifest") from None
        except LayoutFileError as e:
            raise ManifestError(name, "layout_file", "a valid layout file", str(e)) from None
    if declaration is not None:
        try:
            declare(declaration, f"{name}: field 'layout_declaration'", strict=False)
        except LayoutFileError as e:
            raise ManifestError(name, "layout_declaration", "a valid layout declaration",
                                e.problem) from None
    return layout_file, declaration


def _parse_entry(obj: Any, i: int, activities: set[str], fail) -> ManifestEntry:
    if not isinstance(obj, dict) or not {"file", "activity", "split"} <= set(obj):
        raise fail(f"files[{i}]", "an object with file, activity, split", obj)
    file, activity, split = obj["file"], obj["activity"], obj["split"]
    # Files live inside the dataset folder: no absolute paths, no escaping with "..".
    if (not isinstance(file, str) or not file or Path(file).is_absolute()
            or ".." in Path(file).parts):
        raise fail(f"files[{i}].file", "a path relative to the dataset folder", file)
    if activity not in activities:
        raise fail(f"files[{i}].activity", "one of the manifest's activities", activity)
    if split not in SPLITS:
        raise fail(f"files[{i}].split", f"one of {', '.join(SPLITS)}", split)
    return ManifestEntry(file, activity, split)


def load_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Read and check ``<root>/manifest.json``, including that every listed file exists."""
    path = Path(root) / MANIFEST_NAME
    name = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(str(root), None, f"a dataset folder with {MANIFEST_NAME}",
                            "no manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(name, None, "valid JSON", f"{type(e).__name__}: {e}") from None
    manifest = _parse_manifest(obj, name)
    for i, e in enumerate(manifest.files):
        if not (Path(root) / e.file).is_file():
            raise ManifestError(name, f"files[{i}].file", "an existing file",
                                f"no {e.file!r} in {root}")
    return manifest


class Dataset:
    """A dataset folder: ``manifest.json`` plus the sequence files it lists."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)

    def __len__(self) -> int:
        return len(self.manifest.files)

    def entries(self, split: str | None = None) -> list[ManifestEntry]:
        """Manifest entries, all or of one split, in manifest order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)} or None, "
                             f"found {split!r}")
        return [e for e in self.manifest.files if split is None or e.split == split]

    def files(self, split: str | None = None) -> list[str]:
        """File names (relative to the root) of all entries or of one split."""
        return [e.file for e in self.entries(split)]

    def load(self, entry: ManifestEntry | str) -> Sequence:
        """Load one sequence, checked against the manifest (layout, fps, activity).

        A sequence without an ``activity`` takes the manifest's.
        """
        if isinstance(entry, str):
            entry = self._entry(entry)
        path = self.root / entry.file
        seq = load_sequence(path)
        m = self.manifest
        if seq.layout != m.layout:
            raise SequenceFormatError(str(path), "layout", f"{m.layout} (manifest)", seq.layout)
        if not math.isclose(seq.fps, m.fps, rel_tol=1e-6):
            raise SequenceFormatError(str(path), "fps", f"{m.fps:g} (manifest)", f"{seq.fps:g}")
        if seq.activity is None:
            seq.activity = entry.activity
        elif seq.activity != entry.activity:
            raise SequenceFormatError(str(path), "activity", f"{entry.activity!r} (manifest)",
                                      repr(seq.activity))
        return seq

    def sequences(self, split: str | None = None) -> Iterator[Sequence]:
        """Load the sequences of a split one by one (never all in memory at once)."""
        for e in self.entries(split):
            yield self.load(e)

    def fingerprint(self) -> str:
        """16 hex chars identifying the dataset's *content*.

        sha256 over the manifest (canonical JSON) and, per listed file, its name and the
        name, CRC-32 and uncompressed size of every array in its zip directory. Those CRCs
        cover the uncompressed array bytes, so the fingerprint ignores mtimes, copies and
        zip timestamps (re-saving identical data keeps it) yet changes with any array
        change; only the small central directory of each file is read.
        """
        h = hashlib.sha256(json.dumps(self.manifest.to_json(), sort_keys=True).encode())
        for e in sorted(self.manifest.files, key=lambda e: e.file):
            h.update(e.file.encode() + b"\0")
            with zipfile.ZipFile(self.root / e.file) as z:
                for info in sorted(z.infolist(), key=lambda i: i.filename):
                    h.update(f"{info.filename}:{info.CRC}:{info.file_size};".encode())
        return h.hexdigest()[:16]

    def _entry(self, name: str) -> ManifestEntry:
        for e in self.manifest.files:
            if e.file == name:
                return e
        raise KeyError(f"{self.root}: no file {name!r} in {MANIFEST_NAME}")


def write_dataset_files(root: str | os.PathLike[str],
                        items: Iterable[tuple[str, Sequence, str]],
                        activities: _Seq[str] | None = None) -> Manifest:
    """Write ``(file name, sequence, split)`` items and their manifest into ``root``.

    Every sequence needs an ``activity``; all must share layout and fps. ``activities``
    fixes the manifest's activity order (default: order of first appearance). The manifest
    is written last, so an interrupted run never leaves a manifest naming missing files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries: list[ManifestEntry] = []
    layout, fps = None, None
    for file, seq, split in items:
        where = str(root / file)
        if seq.activity is None:
            raise SequenceFormatError(where, "activity", "a string (datasets need it)", "None")
        layout = seq.layout if layout is None else layout
        fps = seq.fps if fps is None else fps
        if seq.layout != layout or seq.fps != fps:
            raise SequenceFormatError(where, "layout/fps", f"{layout}/{fps:g} like the "
                                      f"first file", f"{seq.layout}/{seq.fps:g}")
        save_sequence(root / file, seq)
        entries.append(ManifestEntry(file, seq.activity, split))
    if layout is None or fps is None:
        raise ValueError(f"write_dataset_files: items for {root}: expected at least one, "
                         "found none")
    seen = list(dict.fromkeys(e.activity for e in entries))
    manifest = Manifest(layout, float(fps), list(activities) if activities else seen, entries,
                        layout_declaration=declaration_of(layout))
    save_manifest(root, manifest)
    return manifest

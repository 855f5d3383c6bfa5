"""A recorded reference: one demonstration's embeddings, phase labels and optional phase
decoder, and its ``.npz`` file format (docs/aligner.md, "Reference file")."""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masa_rt.atomic import atomic_write
from masa_rt.phase_decoder import DecoderEnsemble, PhaseDecoder

# A file is written with the lowest version that reads it right: 1, 2 for a phase
# decoder with lookahead (decoder.lookahead), which a version-1 server would run as a
# causal one, 3 for an ensemble of decoders (decoder.members, arrays stacked), which
# older servers cannot read; other references stay readable by version-1 servers.
_FORMAT_CAUSAL, _FORMAT_LOOKAHEAD, _FORMAT_ENSEMBLE = 1, 2, 3
REFERENCE_FORMAT_VERSION = _FORMAT_ENSEMBLE  # the newest this code reads
EPS = 1e-8


class ReferenceFormatError(ValueError):
    """A reference (in memory or on disk) with missing fields or inconsistent shapes."""

    def __init__(self, message: str) -> None:
        # One line, always: messages are shown in logs and client UIs.
        super().__init__(message.replace("\n", " "))



def is_reference_file(path: str | Path) -> bool:
    """A built reference (its ``embeddings``, :meth:`Reference.save`) rather than a
    recording (joints)? ValueError naming the file if it is no ``.npz`` at all."""
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, empty, pickles
        raise ValueError(f"{path}: not a reference or recording .npz ({exc or 'empty'})"
                         ) from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path}: not a reference or recording .npz (one .npy array)")
    with f:
        return "embeddings" in f.files

def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1.0) < 1e-6):
        return x.astype(np.float32)  # already unit: keep bits, so save/load round-trips exactly
    return (x / np.maximum(norms, EPS)).astype(np.float32)


@dataclass(eq=False)  # arrays have no single truth value
class Reference:
    """One demonstration of an activity, embedded by a model, with its phase labels.

    ``embeddings`` (T, d) are L2-normalised on construction, so a dot product is a cosine.
    ``model_fingerprint`` names the model that produced them: embeddings of different
    models live in different spaces and must never be compared.
    """

    name: str
    activity: str
    embeddings: np.ndarray  # (T, d) float32, unit rows
    phases: np.ndarray  # (T,) int32 in [0, len(phase_names))
    phase_names: list[str]
    times: np.ndarray  # (T,) float64 seconds
    fps: float
    model_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # Optional: trained on the demo's labels (masa_rt.phase_decoder); the aligner adds its
    # -log(p(phase) / max p) to the cost of each frame of that phase (decoder_weight).
    # One decoder or several (an ensemble, their log-probabilities averaged); a lone
    # PhaseDecoder given here is held as an ensemble of one.
    decoder: DecoderEnsemble | None = None
    # Optional (T, D): the same demos' normalised keypoints (the model's input rows, unit
    # length), averaged on the same timeline: the reference of the raw-keypoint baseline
    # that ``masa-rt score`` runs beside the engine. Older files have none.
    raw_embeddings: np.ndarray | None = None
    # Optional (N, d) and (N,): every frame of every demo the reference was built from,
    # with its phase: the phase filter's exemplars (masa_rt.align.phase_filter). Absent
    # (one demo, older files): the reference's own frames serve.
    exemplar_embeddings: np.ndarray | None = None
    exemplar_phases: np.ndarray | None = None
    # Optional (K,): the row of exemplar_embeddings where each demo starts (0 first), so
    # that an exemplar's motion is read within its own demo. Absent with exemplars (files
    # before it): the exemplars are read as one demo.
    exemplar_starts: np.ndarray | None = None
    # Optional (P,): each phase's mean length in the demos, model frames (absent: its
    # length on the reference's timeline).
    phase_frames: np.ndarray | None = None
    # Derived on construction, per frame: first/last frame of the run of equal phase the
    # frame belongs to (a run, not a phase id, so a phase that recurs is still linear).
    run_start: np.ndarray = field(init=False, repr=False)
    run_end: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        emb = np.asarray(self.embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
            raise ReferenceFormatError(
                f"embeddings: expected (T >= 2, d) array, found shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ReferenceFormatError("embeddings: expected finite values, found NaN or inf")
        t = emb.shape[0]
        self.embeddings = unit_rows(emb)
        self.phase_names = [str(p) for p in self.phase_names]
        self.phases = self._checked_frames("phases", self.phases, np.int32, t)
        if len(self.phase_names) == 0:
            raise ReferenceFormatError("phase_names: expected at least one name, found none")
        if self.phases.min() < 0 or self.phases.max() >= len(self.phase_names):
            raise ReferenceFormatError(
                f"phases: expected values in [0, {len(self.phase_names)}), found "
                f"[{self.phases.min()}, {self.phases.max()}]")
        self.times = self._checked_frames("times", self.times, np.float64, t)
        self.fps = float(self.fps)
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise ReferenceFormatError(f"fps: expected a number > 0, found {self.fps}")
        self.meta = dict(self.meta)
        if self.raw_embeddings is not None:
            raw = np.asarray(self.raw_embeddings, dtype=np.float32)
            if raw.ndim != 2 or raw.shape[0] != t or not np.isfinite(raw).all():
                raise ReferenceFormatError(
                    f"raw_embeddings: expected finite ({t}, D) values, found {raw.shape}")
            self.raw_embeddings = unit_rows(raw)
        self._check_exemplars()
        if isinstance(self.decoder, PhaseDecoder):
            self.decoder = DecoderEnsemble([self.decoder])
        if self.decoder is not None and self.decoder.num_phases != len(self.phase_names):
            raise ReferenceFormatError(
                f"decoder: expected {len(self.phase_names)} phases (phase_names), found "
                f"{self.decoder.num_phases}")
        self._derive_runs()

    def _check_exemplars(self) -> None:
        if (self.exemplar_embeddings is None) != (self.exemplar_phases is None):
            raise ReferenceFormatError("exemplar_embeddings and exemplar_phases: expected "
                                       "both or neither")
        if self.exemplar_embeddings is not None:
            emb = np.asarray(self.exemplar_embeddings, dtype=np.float32)
            ph = np.asarray(self.exemplar_phases)
            if (emb.ndim != 2 or emb.shape[1] != self.dim or ph.shape != (len(emb),)
                    or not np.isfinite(emb).all()):
                raise ReferenceFormatError(
                    f"exemplar_embeddings: expected finite (N, {self.dim}) with N phases, "
                    f"found {emb.shape} and {ph.shape}")
            if len(ph) and (ph.min() < 0 or ph.max() >= len(self.phase_names)):
                raise ReferenceFormatError("exemplar_phases: expected phase ids of phase_names")
            self.exemplar_embeddings, self.exemplar_phases = unit_rows(emb), ph.astype(np.int32)
        if self.exemplar_starts is not None:
            if self.exemplar_embeddings is None:
                raise ReferenceFormatError("exemplar_starts: expected with exemplar_embeddings")
            starts = np.asarray(self.exemplar_starts)
            n = len(self.exemplar_phases)
            if (starts.ndim != 1 or not len(starts) or starts[0] != 0
                    or (np.diff(starts) <= 0).any() or starts[-1] >= n):
                raise ReferenceFormatError(
                    "exemplar_starts: expected increasing rows of exemplar_embeddings from "
                    f"0, found {starts.tolist()[:8]}")
            self.exemplar_starts = starts.astype(np.int64)
        if self.phase_frames is not None:
            frames = np.asarray(self.phase_frames, dtype=np.float64)
            if frames.shape != (len(self.phase_names),) or not np.isfinite(frames).all():
                raise ReferenceFormatError(
                    f"phase_frames: expected ({len(self.phase_names)},) finite lengths, "
                    f"found {frames.shape}")
            self.phase_frames = frames

    def exemplars(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, d) unit embeddings and (N,) phases of every demo frame (the phase filter's
        exemplars); the reference's own frames where the demos were not kept."""
        if self.exemplar_embeddings is None:
            return self.embeddings, self.phases
        return self.exemplar_embeddings, self.exemplar_phases

    def exemplar_motion(self, lag: int) -> np.ndarray:
        """(N, d) each exemplar's direction of motion over ``lag`` frames within its own
        demo (:func:`motion_directions`), row for row with :meth:`exemplars`."""
        starts = self.exemplar_starts  # None: one demo (or a file from before them)
        return motion_directions(self.exemplars()[0],
                                 np.zeros(1, np.int64) if starts is None else starts, lag)

    def phase_lengths(self) -> np.ndarray:
        """(P,) each phase's mean length in the demos, model frames."""
        if self.phase_frames is not None:
            return self.phase_frames
        return np.bincount(self.phases, minlength=len(self.phase_names)).astype(np.float64)

    @staticmethod
    def _checked_frames(name: str, value: Any, dtype: type, t: int) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != (t,):
            raise ReferenceFormatError(
                f"{name}: expected shape ({t},) (frames in embeddings), found {arr.shape}")
        return arr.astype(dtype)

    def _derive_runs(self) -> None:
        t = len(self.phases)
        change = np.flatnonzero(np.diff(self.phases)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change - 1, [t - 1]])
        run = np.repeat(np.arange(len(starts)), ends - starts + 1)
        self.run_start, self.run_end = starts[run], ends[run]

    # -- derived views ------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def phase_bounds(self) -> np.ndarray:
        """(P, 2) first and last frame of each phase id; (-1, -1) for an absent phase."""
        bounds = np.full((len(self.phase_names), 2), -1, dtype=np.int64)
        for p in range(len(self.phase_names)):
            idx = np.flatnonzero(self.phases == p)
            if idx.size:
                bounds[p] = idx[0], idx[-1]
        return bounds

    @property
    def phase_progress(self) -> np.ndarray:
        """(T,) linear progress within each phase run: 0 at its first frame, 1 at its last."""
        return self.phase_progress_at(np.arange(len(self), dtype=np.float64))

    @property
    def progress(self) -> np.ndarray:
        """(T,) overall progress ``frame / (T - 1)``."""
        return np.arange(len(self)) / (len(self) - 1)

    def phase_progress_at(self, index: np.ndarray | float) -> np.ndarray:
        """Phase progress at fractional frame indices (the run is the rounded frame's)."""
        x = np.clip(np.asarray(index, dtype=np.float64), 0, len(self) - 1)
        i = np.rint(x).astype(np.int64)
        s, e = self.run_start[i], self.run_end[i]
        return np.clip((x - s) / np.maximum(e - s, 1), 0.0, 1.0)

    # -- file format --------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write a ``.npz`` (no pickles; strings as unicode arrays) atomically."""
        arrays = {
            "format_version": np.int64(self._format_version()),
            "name": np.str_(self.name),
            "activity": np.str_(self.activity),
            "embeddings": self.embeddings,
            "phases": self.phases,
            "phase_names": np.array(self.phase_names, dtype=np.str_),
            "times": self.times,
            "fps": np.float64(self.fps),
            "model_fingerprint": np.str_(self.model_fingerprint),
            "meta": np.str_(json.dumps(self.meta)),
            **(self.decoder.to_npz_members() if self.decoder is not None else {}),
            **({"raw_embeddings": self.raw_embeddings} if self.raw_embeddings is not None
               else {}),
            **({"exemplar_embeddings": self.exemplar_embeddings,
                "exemplar_phases": self.exemplar_phases}
               if self.exemplar_embeddings is not None else {}),
            **({"phase_frames": self.phase_frames} if self.phase_frames is not None else {}),
            **({"exemplar_starts": self.exemplar_starts}
               if self.exemplar_starts is not None else {}),
        }
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)

    def _format_version(self) -> int:
        if self.decoder is None:
            return _FORMAT_CAUSAL
        if self.decoder.size > 1:
            return _FORMAT_ENSEMBLE
        return _FORMAT_LOOKAHEAD if self.decoder.lookahead else _FORMAT_CAUSAL

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a file written by :meth:`save`; any problem is one ``ReferenceFormatError``."""
        data = _read_npz(Path(path))
        try:
            version = int(data["format_version"])
            if version > REFERENCE_FORMAT_VERSION:
                raise ReferenceFormatError(
                    f"format_version: expected <= {REFERENCE_FORMAT_VERSION}, found {version}")
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict):
                raise ReferenceFormatError("meta: expected a JSON object")
            return cls(
                name=str(data["name"]), activity=str(data["activity"]),
                embeddings=data["embeddings"], phases=data["phases"],
                phase_names=[str(s) for s in np.atleast_1d(data["phase_names"])],
                times=data["times"], fps=float(data["fps"]),
                model_fingerprint=str(data["model_fingerprint"]), meta=meta,
                decoder=DecoderEnsemble.from_npz_members(data),
                raw_embeddings=data.get("raw_embeddings"),
                exemplar_embeddings=data.get("exemplar_embeddings"),
                exemplar_phases=data.get("exemplar_phases"),
                phase_frames=data.get("phase_frames"),
                exemplar_starts=data.get("exemplar_starts"),
            )
        except (ValueError, TypeError) as e:  # includes ReferenceFormatError, JSON errors
            raise ReferenceFormatError(f"{path}: {e}") from None


_REQUIRED = ("format_version", "name", "activity", "embeddings", "phases", "phase_names",
             "times", "fps", "model_fingerprint", "meta")
_OPTIONAL = ("raw_embeddings", "exemplar_embeddings", "exemplar_phases", "phase_frames",
             "exemplar_starts")


def motion_directions(emb: np.ndarray, starts: np.ndarray, lag: int) -> np.ndarray:
    """(N, d) unit ``emb[i] - emb[i - lag]`` of the frames of sequences laid end to end
    (each starting at a row of ``starts``), the difference never reaching into the
    previous sequence: a sequence's first ``lag`` frames take its first frame instead
    (the first frame itself has no motion: a zero row, as has any frame that did not
    move). The phase filter reads a live stream's frames the same way."""
    emb = np.asarray(emb, dtype=np.float32)
    rows = np.arange(len(emb))
    first = np.asarray(starts)[np.searchsorted(starts, rows, side="right") - 1]
    return motion_units(emb - emb[np.maximum(rows - lag, first)])


def motion_units(diff: np.ndarray) -> np.ndarray:
    """Rows of ``diff`` (B, d) made unit length, zero where (nearly) nothing moved: the one
    rule for a demo's motion (:func:`motion_directions`) and a live stream's."""
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    return np.where(norm > 1e-6, diff / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All required members of a reference archive, or one-line errors naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ReferenceFormatError(f"{path}: expected a .npz archive, found one array")
            missing = [k for k in _REQUIRED if k not in npz.files]
            if missing:
                raise ReferenceFormatError(f"{path}: missing fields {', '.join(missing)}")
            return {k: npz[k] for k in npz.files
                    if k in _REQUIRED or k in _OPTIONAL or k.startswith("decoder.")}
    except ReferenceFormatError:
        raise
    except (ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ReferenceFormatError(f"{path}: not a readable reference .npz ({e})") from None

"""Online alignment of a live embedding stream to recorded references.

The aligner is a stepper: ``Aligner(references).step(embedding, t) -> Estimate``, one call
per frame, ``reset()`` between sessions. Per reference it keeps two dynamic programs over
the cosine cost ``c(i) = 1 - cos(q_t, ref_i)``:

- the **tracker**: online time warping (Dixon 2005, "Live tracking of musical performances
  using on-line time warping"; Arzt & Widmer's score followers) -- an accumulated-cost row
  restricted to a band ``[pos - back, pos + band]``, forward steps of up to ``max_step``
  reference frames per query frame, re-normalised every frame. O(band) per frame; its
  accumulated (undecayed) cost is what makes it steady under noise;
- the **relocaliser**: the same step pattern over the *whole* reference, but with
  exponential forgetting, i.e. a streaming subsequence DTW in the manner of SPRING
  (Sakurai et al. 2007) whose window is a time constant instead of a hard cut. Its value at
  ``j`` is the recent mean cost of the best path ending at ``j``; when a far-away ``j`` is
  better than the tracked position by a margin for a few frames, the tracker jumps there
  (restarts, skipped and repeated phases). O(T_ref * max_step), vectorised.

With several references every relocaliser runs (its best recent cost scores the activity)
and only the chosen reference's tracker does. A reference built with a **phase decoder**
(``masa_rt.phase_decoder``, trained on the demo's labels) adds ``decoder_weight *
-log(p(phase) / max p)`` to the cost of each of its frames, from the frame's model input
(``inputs=``), before both programs read it. States and tuning: ``docs/aligner.md``.

``offline_dtw`` and ``subsequence_dtw`` are the exact batch counterparts (the upper bound
in the streaming evaluation, offline checks).
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from masa_rt.atomic import atomic_write
from masa_rt.phase_decoder import DecoderEnsemble, DecoderStack, PhaseDecoder, mean_log_probs

__all__ = [
    "REFERENCE_FORMAT_VERSION",
    "STATES",
    "Aligner",
    "AlignerBank",
    "AlignerConfig",
    "Estimate",
    "EstimateBatch",
    "Reference",
    "is_reference_file",
    "ReferenceFormatError",
    "offline_dtw",
    "path_to_index",
    "subsequence_dtw",
]

# A file is written with the lowest version that reads it right: 1, 2 for a phase
# decoder with lookahead (decoder.lookahead), which a version-1 server would run as a
# causal one, 3 for an ensemble of decoders (decoder.members, arrays stacked), which
# older servers cannot read; other references stay readable by version-1 servers.
_FORMAT_CAUSAL, _FORMAT_LOOKAHEAD, _FORMAT_ENSEMBLE = 1, 2, 3
REFERENCE_FORMAT_VERSION = _FORMAT_ENSEMBLE  # the newest this code reads
STATES = ("waiting", "tracking", "paused", "off_script", "tracking_lost", "finished")
_EPS = 1e-8


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------

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

def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1.0) < 1e-6):
        return x.astype(np.float32)  # already unit: keep bits, so save/load round-trips exactly
    return (x / np.maximum(norms, _EPS)).astype(np.float32)


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
        self.embeddings = _unit_rows(emb)
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
            self.raw_embeddings = _unit_rows(raw)
        if isinstance(self.decoder, PhaseDecoder):
            self.decoder = DecoderEnsemble([self.decoder])
        if self.decoder is not None and self.decoder.num_phases != len(self.phase_names):
            raise ReferenceFormatError(
                f"decoder: expected {len(self.phase_names)} phases (phase_names), found "
                f"{self.decoder.num_phases}")
        self._derive_runs()

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
            )
        except (ValueError, TypeError) as e:  # includes ReferenceFormatError, JSON errors
            raise ReferenceFormatError(f"{path}: {e}") from None


_REQUIRED = ("format_version", "name", "activity", "embeddings", "phases", "phase_names",
             "times", "fps", "model_fingerprint", "meta")
_OPTIONAL = ("raw_embeddings",)


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


# ---------------------------------------------------------------------------------------
# Configuration and output
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlignerConfig:
    """Aligner parameters. Counts are in frames of the stream (the engine resamples streams
    to the model's rate, which is also the references' rate); costs are ``1 - cos``."""

    # Tracker (banded online DTW).
    band: int = 20  # look-ahead of the tracker window, reference frames
    back: int = 2  # tolerated backward motion (jitter, overshoot), reference frames
    max_step: int = 4  # most reference frames advanced per query frame (user up to 4x faster)
    # Move penalties: 0 since learned embeddings (the stream's speed varies 0.5-2x per phase;
    # any bias toward moving or staying costs accuracy; harness, docs/aligner.md).
    stay_penalty: float = 0.0  # cost of not advancing
    skip_penalty: float = 0.005  # per extra frame skipped beyond the first
    back_penalty: float = 0.02  # per frame moved backwards
    smoothing: float = 0.0  # EMA factor of the reported index (0 = raw argmin)
    # Pause: the stream's embedding speed (mean of the last `pause_lag` frames against the
    # mean of the `pause_lag` before, so per-frame jitter averages out) below a fraction of
    # the reference's median speed, measured the same way, for `pause_frames` frames.
    pause_speed_ratio: float = 0.2
    pause_lag: int = 4
    pause_frames: int = 4
    # Off script: no frame of any reference is this similar, for this many frames.
    off_script_sim: float = 0.5
    off_script_frames: int = 10
    # Relocaliser (global streaming subsequence DTW with forgetting).
    relocalise_memory: float = 4.0  # time constant of forgetting, frames
    relocalise_margin: int = 8  # a jump must move at least this far, reference frames
    relocalise_cost_margin: float = 0.04  # ... and be this much cheaper (mean cost) ...
    relocalise_patience: int = 2  # ... for this many consecutive frames
    finish_tolerance: int = 2  # "finished" within this many frames of the end
    # Activity choice among several references: EMA of each one's best recent cost.
    activity_memory: float = 10.0  # frames
    activity_margin: float = 0.02
    activity_patience: int = 8
    # References with a phase decoder: cost += decoder_weight * -log(p(the frame's phase) /
    # p(the decoder's best phase)). 0.1 weighs a confident decoder (p 0.9 against 0.1: 2.2
    # nats) about like a cosine gap of 0.2. The defaults above and this weight were tuned
    # together for references with 128-wide decoders (docs/changelog.md, "Tenth round");
    # references without decoders get DECODER_FREE (see for_references).
    decoder_weight: float = 0.1
    # Where the active reference's decoder gives one phase more than this probability and
    # the tracked frame lies in the phase before or after it, the *reported* position
    # moves to the nearest frame of the decoder's phase (the tracker itself is untouched):
    # a confident decoder places boundaries sooner than the tracker, whose steps are
    # bounded, catches up with them (docs/changelog.md, "Eleventh round"). 1: never; nor with
    # decoder_weight 0, which leaves the decoders out altogether.
    decoder_phase_confidence: float = 0.5
    # Hysteresis on each decoder's phase: the phase it named on the last frame gets this
    # much log-probability on top (e**0.5 ~ 1.65 times as probable), as an HMM's
    # self-transitions do. The frames around a boundary are nearly still and alike on
    # both sides, and the shipped decoders called the next phase a frame or two early
    # more often than late (368 against 206 wrong frames within three of a boundary, 72
    # clean streams). 0.5: +0.12 to +0.18 on the harness's scenario mean, shipped causal
    # and lookahead references, seeds 0 and 1, no scenario lower by more than 0.07;
    # 0.4 and 0.7 alike, 1.0 lower (docs/changelog.md, "Sixteenth round"). 0: off.
    decoder_stickiness: float = 0.5

    def __post_init__(self) -> None:
        ints = {"band": 1, "back": 0, "max_step": 1, "pause_lag": 1, "pause_frames": 1,
                "off_script_frames": 1, "relocalise_margin": 0, "relocalise_patience": 1,
                "finish_tolerance": 0, "activity_patience": 1}
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise ValueError(f"AlignerConfig.{name}: expected >= {low}, "
                                 f"found {getattr(self, name)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"AlignerConfig.smoothing: expected [0, 1), found {self.smoothing}")
        if not (math.isfinite(self.decoder_weight) and self.decoder_weight >= 0):
            raise ValueError(f"AlignerConfig.decoder_weight: expected a number >= 0, "
                             f"found {self.decoder_weight}")
        if not (math.isfinite(self.decoder_stickiness) and self.decoder_stickiness >= 0):
            raise ValueError(f"AlignerConfig.decoder_stickiness: expected a number >= 0, "
                             f"found {self.decoder_stickiness}")
        if not 0.0 <= self.decoder_phase_confidence <= 1.0:
            raise ValueError(f"AlignerConfig.decoder_phase_confidence: expected [0, 1], "
                             f"found {self.decoder_phase_confidence}")
        for name in ("relocalise_memory", "activity_memory"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"AlignerConfig.{name}: expected >= 1 frame, "
                                 f"found {getattr(self, name)}")

    @classmethod
    def for_references(cls, references: Reference | Sequence[Reference]) -> AlignerConfig:
        """The defaults for these references: the class defaults (tuned with phase
        decoders, as ``masa-rt reference build`` makes them) if any has a decoder, else
        the values tuned for embeddings alone (``DECODER_FREE``; older references, raw
        keypoints, ``--decoder-steps 0``)."""
        refs = [references] if isinstance(references, Reference) else list(references)
        if any(r.decoder is not None for r in refs):
            return cls()
        return cls(**DECODER_FREE)


# The defaults for references without a phase decoder (embeddings alone): smoothing and
# slower relocalising keep the reported position steadier (fourth round, changelog.md).
# A wider band (24 reference frames, was 12) and a small cost for standing still (0.03,
# was 0) since issue 27: without a decoder's boundaries the tracker stalled where the next
# stretch of the reference resembled the user less than the frame it held (a squat's
# descent against an averaged bottom), while offline DTW, forced through, was right. Tuned
# on data the reported benchmarks do not use (Penn key-event *train* videos against
# references from other train videos; synth seed 11; harness seed 1): Penn 81.3 -> 86.5 %,
# synth K=1 / K=5 74.9 -> 76.3 / 76.2 -> 76.6, harness scenario mean 69.3 -> 72.6 (clean
# +6.7, pause -0.6).
DECODER_FREE: dict[str, Any] = {
    "band": 24, "stay_penalty": 0.03, "skip_penalty": 0.0, "smoothing": 0.3,
    "relocalise_memory": 8.0, "relocalise_cost_margin": 0.08, "relocalise_patience": 4}


@dataclass(slots=True)
class Estimate:
    """Where the user is in the chosen reference. ``phase_id`` is -1 while ``waiting``."""

    phase_id: int
    phase_name: str
    phase_progress: float  # 0..1 within the current phase
    progress: float  # 0..1 over the whole reference
    ref_index: float  # fractional reference frame
    confidence: float  # 0..1
    state: str  # one of STATES
    activity: str
    t: float  # the frame's timestamp, seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Batch DTW (offline upper bound, relocaliser checks)
# ---------------------------------------------------------------------------------------

def _cosine_cost(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    q = _unit_rows(np.asarray(query, dtype=np.float64)).astype(np.float64)
    r = _unit_rows(np.asarray(reference, dtype=np.float64)).astype(np.float64)
    return 1.0 - q @ r.T  # (Tq, Tr)


def _accumulate(cost: np.ndarray, free_start: bool) -> np.ndarray:
    """DTW accumulated cost with steps (1,0), (0,1), (1,1), one vectorised pass per row.

    Within a row, ``D[i,j] = min(a_j, c[i,j] + D[i,j-1])`` with ``a_j`` the best of the
    previous row; unrolled that is ``S_j + min_{m<=j}(a_m - S_m)`` with ``S`` the running
    sum of the row, so a cumulative minimum replaces the inner loop.
    """
    tq, tr = cost.shape
    acc = np.empty_like(cost)
    # A subsequence may start at any reference frame, so row 0 does not accumulate.
    acc[0] = cost[0] if free_start else np.cumsum(cost[0])
    diag = np.empty(tr)
    for i in range(1, tq):
        diag[0] = np.inf
        diag[1:] = acc[i - 1, :-1]
        a = cost[i] + np.minimum(acc[i - 1], diag)
        s = np.cumsum(cost[i])
        acc[i] = s + np.minimum.accumulate(a - s)
    return acc


def _backtrack(acc: np.ndarray, end: int, free_start: bool) -> np.ndarray:
    i, j = acc.shape[0] - 1, end
    path = [(i, j)]
    while i > 0 or (j > 0 and not free_start):
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            # Order matters on ties: prefer the diagonal.
            moves = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
            i, j = min(moves, key=lambda m: acc[m])
        path.append((i, j))
    return np.array(path[::-1], dtype=np.int64)


def offline_dtw(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Full DTW between (Tq, d) and (Tr, d) with cosine cost; returns the path (L, 2) of
    (query frame, reference frame) pairs from (0, 0) to (Tq-1, Tr-1)."""
    acc = _accumulate(_cosine_cost(query, reference), free_start=False)
    return _backtrack(acc, acc.shape[1] - 1, free_start=False)


def subsequence_dtw(query: np.ndarray, reference: np.ndarray) -> tuple[int, int, float]:
    """Best match of the whole query to any reference segment (Mueller 2007, subsequence
    DTW). Returns ``(start, end, cost)``: inclusive reference frames and the accumulated
    cosine cost divided by the query length."""
    acc = _accumulate(_cosine_cost(query, reference), free_start=True)
    end = int(np.argmin(acc[-1]))
    path = _backtrack(acc, end, free_start=True)
    return int(path[0, 1]), end, float(acc[-1, end] / acc.shape[0])


def path_to_index(path: np.ndarray, n_query: int) -> np.ndarray:
    """(n_query,) mean reference frame matched to each query frame along a DTW path."""
    sums = np.bincount(path[:, 0], weights=path[:, 1], minlength=n_query)
    counts = np.bincount(path[:, 0], minlength=n_query)
    return sums / np.maximum(counts, 1)



# ---------------------------------------------------------------------------------------
# Online alignment: one batched implementation for one stream or many
# ---------------------------------------------------------------------------------------
#
# Every session's state lives in rows of stacked arrays (``_Sessions``), and one step for B
# sessions is a fixed number of numpy operations over (B, ...) arrays: one matmul, ~10
# passes over (B, P) for the relocaliser, small gathers for the tracker. ``Aligner`` is a
# session store of one row, ``AlignerBank`` one of many rows; the math is the same code.

# State codes: indices into STATES.
_WAITING, _TRACKING, _PAUSED, _OFF_SCRIPT, _LOST, _FINISHED = range(len(STATES))
# The relocaliser rows are the bulk of the work and memory, (B, P) per step: float32 halves
# both. Its values are recent sums of costs (< 2 * relocalise_memory), so float32 keeps
# ~1e-6 absolute, far below any margin. The tracker band rows stay float64.
_RELOC_DTYPE = np.float32


def _window_speed(embeddings: np.ndarray, fps: float, lag: int) -> float:
    """Median speed (per second) of a sequence, measured as the aligner measures a stream's
    (distance between the means of consecutive blocks of ``lag`` frames)."""
    lag = max(min(lag, len(embeddings) // 2), 1)
    csum = np.concatenate([np.zeros((1, embeddings.shape[1])), np.cumsum(embeddings, axis=0)])
    means = (csum[lag:] - csum[:-lag]) / lag  # mean of frames i .. i+lag-1
    steps = np.linalg.norm(means[lag:] - means[:-lag], axis=1)
    return float(np.median(steps)) * fps / lag


def _checked_references(references: Reference | Sequence[Reference]) -> list[Reference]:
    refs = [references] if isinstance(references, Reference) else list(references)
    if not refs:
        raise ValueError("Aligner: expected at least one reference, found none")
    if len({r.dim for r in refs}) > 1:
        raise ValueError("Aligner: references have different embedding sizes "
                         f"{sorted({r.dim for r in refs})}")
    prints = {r.model_fingerprint for r in refs if r.model_fingerprint}
    if len(prints) > 1:
        raise ValueError(f"Aligner: references come from different models {sorted(prints)}")
    return refs


class _Model:
    """The references and config compiled into read-only arrays, shared by all sessions.

    Every reference frame gets a *column* in one row of ``P`` columns, each reference
    preceded by ``pad`` columns and the last one followed by ``tail`` columns::

        [pad | ref 0 (T_0 frames) | pad | ref 1 (T_1) | ... | ref K-1 | tail]

    Pad columns cost +inf, so the relocaliser's shifted minima, the tracker's window and the
    gap's neighbourhood never reach across references: one pass covers all references.
    """

    def __init__(self, refs: list[Reference], cfg: AlignerConfig) -> None:
        self.refs, self.cfg = refs, cfg
        self.n_refs = len(refs)
        self.dim = refs[0].dim
        self.width = cfg.back + cfg.band + 1  # W: cells of the tracker's window, at most
        self.pad = max(cfg.max_step, cfg.back)
        tail = max(self.pad, self.width)
        self.lengths = np.array([len(r) for r in refs], dtype=np.int64)  # (K,) T_k
        self.offsets = self.pad + np.concatenate(  # (K,) column of each reference's frame 0
            [[0], np.cumsum(self.lengths + self.pad)[:-1]]).astype(np.int64)
        self.cols = int(self.offsets[-1] + self.lengths[-1] + tail)  # P
        emb = np.zeros((self.cols, self.dim), dtype=np.float32)  # (P, d), zero rows on pads
        is_pad = np.ones(self.cols, dtype=bool)
        # Per column (P,): phase id, and first/last frame of its run (local frame indices).
        self.phases = np.zeros(self.cols, dtype=np.int64)
        self.run_start = np.zeros(self.cols, dtype=np.int64)
        self.run_end = np.zeros(self.cols, dtype=np.int64)
        for r, o in zip(refs, self.offsets.tolist(), strict=True):
            cols = slice(o, o + len(r))
            emb[cols], is_pad[cols] = r.embeddings, False
            self.phases[cols], self.run_start[cols], self.run_end[cols] = (
                r.phases, r.run_start, r.run_end)
        self.embeddings = emb
        self.pad_cols = np.flatnonzero(is_pad)
        self.ref_cols = [slice(o, o + n) for o, n in
                         zip(self.offsets.tolist(), self.lengths.tolist(), strict=True)]
        self.phase_names = [r.phase_names for r in refs]
        self.activities = [r.activity for r in refs]
        # Pause: each reference's median speed, and its frame period (K,).
        self.ref_speed = np.array(
            [_window_speed(r.embeddings, r.fps, cfg.pause_lag) for r in refs])
        self.frame_dt = np.array([1.0 / r.fps for r in refs])
        # Speed meter: frames go round a ring of 2*lag slots; with the newest frame in slot
        # s, row s of these weights gives (time of the recent half - time of the older
        # half) / lag, i.e. the time between the two means.
        lag = cfg.pause_lag
        halves = np.concatenate([np.full(lag, -1.0 / lag), np.full(lag, 1.0 / lag)])
        self.meter_weights = np.stack([np.roll(halves, s + 1) for s in range(2 * lag)])
        # Tracker predecessors of cell i: i - k for k = max_step .. -back, in window order.
        ks = np.arange(cfg.max_step, -cfg.back - 1, -1)
        self.penalty = np.select(  # (max_step + back + 1,)
            [ks < 0, ks == 0, ks >= 2],
            [cfg.back_penalty * -ks, np.full(ks.shape, cfg.stay_penalty),
             cfg.skip_penalty * (ks - 1)], 0.0)
        # Relocaliser: R(j) = c(j) + lam * min(R(j) + stay, R(j-1), ..., R(j-max_step)), a
        # sum over an exponential window (~relocalise_memory frames). The stay penalty is
        # divided by lam so it weighs like a cost; skips are free: it is a detector.
        self.lam = 1.0 - 1.0 / cfg.relocalise_memory
        self.reloc_stay = cfg.stay_penalty / self.lam
        self._compile_decoders(refs, cfg)

    def _compile_decoders(self, refs: list[Reference], cfg: AlignerConfig) -> None:
        """Phase decoders of one shape form one ``DecoderStack``, stepped in one pass.

        Group g's recurrent state is columns ``dec_slots[g]`` of a session's flat decoder
        state (its (K_g, L, H) block); ``dec_targets[g][i]`` is the column range of the
        group's i-th reference and the phase of each of its frames, where that decoder's
        log-probabilities go. (Column ranges, not one index array: assigning a (B, frames)
        block through two index arrays took 25x as long.) An ensemble's members are
        consecutive decoders of the stack; ``dec_starts[g]`` is the first of each
        reference's (None where every reference of the group has one decoder).
        """
        with_dec = [(k, r.decoder) for k, r in enumerate(refs)
                    if r.decoder is not None and cfg.decoder_weight > 0]
        dims = {d.input_dim for _, d in with_dec}
        if len(dims) > 1:
            raise ValueError(f"Aligner: the references' phase decoders take different "
                             f"inputs (dims {sorted(dims)}); build them with one model")
        self.input_dim = dims.pop() if dims else 0
        lookaheads = {d.lookahead for _, d in with_dec}
        if len(lookaheads) > 1:
            raise ValueError(f"Aligner: the references' phase decoders have different "
                             f"lookaheads {sorted(lookaheads)} (frames); build them with one "
                             "--decoder-lookahead")
        self.lookahead = lookaheads.pop() if lookaheads else 0
        groups: dict[tuple[int, int], list[tuple[int, DecoderEnsemble]]] = {}
        for k, d in with_dec:
            groups.setdefault((d.hidden, d.layers), []).append((k, d))
        self.decoders: list[DecoderStack] = []
        self.dec_slots: list[slice] = []
        self.dec_targets: list[list[tuple[slice, np.ndarray]]] = []
        self.dec_refs: list[np.ndarray] = []  # group g's references, in its order
        self.dec_starts: list[np.ndarray | None] = []
        start = 0
        for members in groups.values():
            stack = DecoderStack([m for _, d in members for m in d.members])
            self.decoders.append(stack)
            self.dec_slots.append(slice(start, start + stack.k * stack.layers * stack.hidden))
            self.dec_targets.append([(self.ref_cols[k], self.phases[self.ref_cols[k]])
                                     for k, _ in members])
            self.dec_refs.append(np.array([k for k, _ in members], dtype=np.int64))
            sizes = [d.size for _, d in members]
            self.dec_starts.append(np.cumsum([0, *sizes[:-1]]) if max(sizes) > 1 else None)
            start = self.dec_slots[-1].stop
        self.dec_size = max(start, 1)
        # First and last local frame of each (reference, phase) that is one run of frames;
        # -1 where the phase is absent or comes back (no single range to report into).
        p_max = max(len(r.phase_names) for r in refs)
        self.phase_lo = np.full((len(refs), p_max), -1, dtype=np.int64)
        self.phase_hi = np.full((len(refs), p_max), -1, dtype=np.int64)
        for k, r in enumerate(refs):
            b = r.phase_bounds
            one_run = (b[:, 0] >= 0) & (r.run_end[np.maximum(b[:, 0], 0)] == b[:, 1])
            self.phase_lo[k, :len(b)] = np.where(one_run, b[:, 0], -1)
            self.phase_hi[k, :len(b)] = np.where(one_run, b[:, 1], -1)
        # decoder_phase_confidence as a log-probability (the decoders give log-softmax).
        self.log_confidence = (math.log(cfg.decoder_phase_confidence)
                               if cfg.decoder_phase_confidence > 0 else -math.inf)


# Per-session fields: name -> (shape after the session axis, dtype, value after reset).
# "K" is the number of references, "P" the number of columns, "W" the tracker window,
# "d" the embedding size, "2lag" the speed meter's ring.
_FIELDS: dict[str, tuple[tuple[str, ...], Any, float]] = {
    "seen": ((), bool, False),  # a valid frame has arrived since the reset
    "active": ((), np.int64, 0),  # chosen reference
    "switch_streak": ((), np.int64, 0),  # frames another reference has been better
    "still": ((), np.int64, 0),  # consecutive slow frames
    "off": ((), np.int64, 0),  # consecutive off-script frames
    "sim": ((), np.float64, 0.0),  # EMA of the cosine at the tracked position
    # Tracker (of the active reference; a switch re-seeds it, so one per session suffices).
    "pos": ((), np.int64, 0),  # argmin of the band row, local frame index
    "shown": ((), np.float64, 0.0),  # smoothed position (the tracker's)
    "report": ((), np.float64, 0.0),  # what is reported: shown, or moved into the
    # decoder's phase (AlignerConfig.decoder_phase_confidence)
    "lo": ((), np.int64, 0),  # local frame of band cell 0
    "band": (("W",), np.float64, math.inf),  # accumulated cost of frames lo .., inf past hi
    "streak": ((), np.int64, 0),  # frames the relocaliser has wanted a jump
    # Relocaliser, every reference: (P,) row, and the EMA of its best mean cost per ref.
    "reloc": (("P",), _RELOC_DTYPE, math.inf),
    "activity_cost": (("K",), np.float64, math.inf),
    # Speed meter: the last 2*lag frames (zero before they arrive), their times (relative
    # to the first frame after a restart, for precision), and the running difference
    # (sum of the recent lag frames) - (sum of the lag before).
    "m_count": ((), np.int64, 0),
    "m_t0": ((), np.float64, 0.0),
    "m_ring": (("2lag", "d"), np.float64, 0.0),
    "m_times": (("2lag",), np.float64, 0.0),
    "m_diff": (("d",), np.float64, 0.0),
    # The last estimate's own fields (the rest follows from active and shown).
    "last_state": ((), np.int8, _WAITING),
    "last_conf": ((), np.float64, 0.0),
    "last_t": ((), np.float64, math.nan),
    # Phase decoders' recurrent states, all references' laid end to end ("S" floats).
    "dec": (("S",), np.float32, 0.0),
    # Each reference's decoder's phase on the last frame it was heard (-1: none yet), for
    # AlignerConfig.decoder_stickiness.
    "dec_last": (("K",), np.int64, -1),
    # Lookahead delay line (decoders with lookahead L > 0): a ring of L ("look") slots holding the
    # frames the aligner has yet to step, while their decoder reads L frames further on;
    # slot dl_head holds the oldest, which the next frame replaces.
    "dl_q": (("look", "d"), np.float32, 0.0),
    "dl_ok": (("look",), bool, False),
    "dl_t": (("look",), np.float64, math.nan),
    "dl_head": ((), np.int64, 0),
}
# Scratch rows, allocated once: fresh (B, P) or (B, d) temporaries every step would cost
# page faults that take longer than the arithmetic. name -> (shape, dtype).
_SCRATCH: dict[str, tuple[tuple[str, ...], Any]] = {
    "sims": (("P",), np.float32),  # this step's cosines, then costs
    "reloc_spare": (("P",), _RELOC_DTYPE),  # the relocaliser's new rows
    "reloc_src": (("P",), _RELOC_DTYPE),  # its old rows, gathered (some sessions step)
    "reloc_pairs": (("P",), _RELOC_DTYPE),  # min of neighbouring old cells
    "m_new": (("d",), np.float64),  # the speed meter's frames: arriving,
    "m_middle": (("d",), np.float64),  # moving from the recent to the older half,
    "m_leaving": (("d",), np.float64),  # leaving
    "dec_added": (("P",), np.float32),  # the phase decoders' cost term
    "dec_best": (("K",), np.int64),  # each reference's decoder: its best phase
    "dec_top": (("K",), np.float32),  # ... and that phase's log-probability
}


class _Sessions:
    """The state of ``n`` sessions in rows ``0 .. n-1`` of arrays with spare capacity.

    Removing a session moves the last row into its slot (arrays stay compact), adding one
    takes row ``n`` (doubling the capacity when full).
    """

    def __init__(self, model: _Model, capacity: int = 1) -> None:
        self.model = model
        sizes = {"K": model.n_refs, "P": model.cols, "W": model.width, "d": model.dim,
                 "2lag": 2 * model.cfg.pause_lag, "S": model.dec_size,
                 "look": model.lookahead}
        self._shapes = {name: tuple(sizes[s] for s in spec[0])
                        for name, spec in (_FIELDS | _SCRATCH).items()}
        self.n = 0
        self.capacity = 0
        self._grow(max(int(capacity), 1))

    def _grow(self, capacity: int) -> None:
        for name, (_, dtype, init) in _FIELDS.items():
            new = np.full((capacity, *self._shapes[name]), init, dtype=dtype)
            if self.capacity:
                new[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, new)
        for name, (_, dtype) in _SCRATCH.items():
            setattr(self, name, np.zeros((capacity, *self._shapes[name]), dtype=dtype))
        self.capacity = capacity

    def add(self) -> int:
        if self.n == self.capacity:
            self._grow(2 * self.capacity)
        slot = self.n
        self.n += 1
        self.reset(np.array([slot]))
        return slot

    def remove(self, slot: int) -> int:
        """Free ``slot``; returns the slot whose session now lives in ``slot`` (the old last
        one), which is ``slot`` itself when it was the last."""
        last = self.n - 1
        if slot != last:
            for name in _FIELDS:
                arr = getattr(self, name)
                arr[slot] = arr[last]
        self.n -= 1
        return last

    def reset(self, rows: np.ndarray) -> None:
        for name, (_, _, init) in _FIELDS.items():
            getattr(self, name)[rows] = init

    # -- one step of many sessions ------------------------------------------------------

    def step(self, rows: np.ndarray, q: np.ndarray, ok: np.ndarray,
             t: np.ndarray, x: np.ndarray | None = None) -> EstimateBatch:
        """Step sessions ``rows`` (B,) (distinct slots) with unit embeddings ``q`` (B, d)
        float32 (zero rows where not ``ok``) at times ``t`` (B,); ``x`` (B, D) are the
        frames' model inputs, for the references' phase decoders.

        With decoders of lookahead L, the decoders read this frame and the aligner steps
        the frame L steps back: the estimates describe that frame (``Estimate.t`` is its
        time), and are ``waiting`` for a session's first L steps.
        """
        n = self.n
        read = heard = ok  # the frames the decoders read; where their output is used
        if self.model.lookahead:
            q, ok, t = self._delay(rows, q, ok, t)
            # A decoder's output names the frame L *read* frames back: that is the frame
            # leaving the line only if the L frames since were all read.
            heard = read & self.dl_ok[rows].all(axis=1)
        if len(rows) < n:
            self._step(rows, rows, q, ok, t, x, read, heard)
        else:
            # Every session steps: go in slot order, so that the big rows are updated in
            # place (no gather/scatter of the (B, P) rows).
            if n > 1:
                order = np.empty(n, dtype=np.int64)
                order[rows] = np.arange(n)
                q, ok, t, read, heard = q[order], ok[order], t[order], read[order], heard[order]
                x = None if x is None else x[order]
            self._step(slice(0, n), np.arange(n), q, ok, t, x, read, heard)
        return self.estimates(rows)

    def _delay(self, rows: np.ndarray, q: np.ndarray, ok: np.ndarray,
               t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Push this step's frames into sessions ``rows``' delay lines; returns the frames
        that leave them, L steps old (not ``ok`` while a line fills after a reset). A ring:
        one (B, d) read and write per step, not a shift of the whole (B, L, d) line."""
        head = self.dl_head[rows]
        out = self.dl_q[rows, head], self.dl_ok[rows, head], self.dl_t[rows, head]  # copies
        self.dl_q[rows, head], self.dl_ok[rows, head], self.dl_t[rows, head] = q, ok, t
        self.dl_head[rows] = (head + 1) % self.model.lookahead
        return out

    def _step(self, sel: slice | np.ndarray, rows: np.ndarray, q: np.ndarray,
              ok: np.ndarray, t: np.ndarray, x: np.ndarray | None = None,
              read: np.ndarray | None = None, heard: np.ndarray | None = None) -> None:
        """The math of one frame. ``rows`` (B,) are the slots; ``sel`` selects the same rows
        (a slice when they are all of 0 .. n-1 in order). All (B,)-shaped unless noted.
        ``read``: which sessions' decoders read a frame ``x``; ``heard``: where their output
        describes the frame stepped (both default ``ok``; they differ with lookahead, where
        ``q``, ``ok``, ``t`` are the frame L steps back)."""
        M, cfg = self.model, self.model.cfg
        b = len(rows)
        every = np.arange(b)
        seen = self.seen[rows]

        # Costs: one matmul against every reference frame. Pads get cos -inf, cost +inf.
        sims = np.matmul(q, M.embeddings.T, out=self.sims[:b])  # (B, P) float32
        sims[:, M.pad_cols] = -np.inf
        on_script = sims.max(axis=1) >= cfg.off_script_sim
        cost = np.subtract(1.0, sims, out=sims)  # (B, P) float32
        decoded = dec_best = dec_top = None
        if M.decoders:
            decoded, dec_best, dec_top = self._decode(
                rows, ok if read is None else read, ok if heard is None else heard, x, cost)

        active = self.active[rows]
        paused, still = self._pause(sel, rows, q, ok, t, active)
        off = self.off[rows]
        off = np.where(ok, np.where(on_script, 0, off + 1), off)

        reloc, best, activity_cost = self._relocalise(sel, rows, cost, ok, seen)

        # Activity: switch to the reference with the lowest recent cost, with hysteresis.
        switch_streak = self.switch_streak[rows]
        switched = np.zeros(b, dtype=bool)
        if M.n_refs > 1:
            top = activity_cost.argmin(axis=1)
            active = np.where(ok & ~seen, top, active)  # first frame: just take the best
            better = (activity_cost[every, top]
                      < activity_cost[every, active] - cfg.activity_margin)
            going = ok & seen
            switch_streak = np.where(going, np.where(better, switch_streak + 1, 0),
                                     switch_streak)
            switched = going & (switch_streak >= cfg.activity_patience)
            active = np.where(switched, top, active)
            switch_streak[switched] = 0

        # Tracker of the active reference: seed on a switch, start on the first frame,
        # track when the frame says something about progress, else hold.
        tr = _Tracker(self, rows, active, reloc, cost)
        target = best[every, active] - tr.offset  # relocaliser's best, local frame
        tr.jump(np.flatnonzero(switched), target)
        tr.start(np.flatnonzero(ok & ~seen))
        # An unrelated or a still frame says nothing about progress: hold, do not drift.
        tr.track(np.flatnonzero(ok & seen & ~switched & on_script & ~paused))
        gap = tr.gap(np.flatnonzero(ok), target)
        # Jump to the relocaliser's choice once it has been clearly better for a while
        # (also while paused: the user may have moved while lost).
        asks = ok & on_script & ~switched
        far = np.abs(target - tr.pos) > cfg.relocalise_margin
        tr.streak = np.where(
            asks, np.where(far & (gap > cfg.relocalise_cost_margin), tr.streak + 1, 0),
            tr.streak)
        jumps = np.flatnonzero(asks & (tr.streak >= cfg.relocalise_patience))
        if jumps.size:
            tr.jump(jumps, target)
            gap[jumps] = tr.gap(jumps, target)[jumps]

        # Similarity at the tracked frame (EMA), state and confidence.
        here = 1.0 - tr.take(cost, every, tr.offset + tr.pos).astype(np.float64)
        if decoded is not None:  # the similarity is the embedding's alone
            here += tr.take(decoded, every, tr.offset + tr.pos)
        sim = self.sim[rows]
        sim = np.where(ok, np.where(seen, 0.5 * (sim + here), here), sim)
        state = np.where(paused, _PAUSED, _TRACKING)
        state[tr.pos >= tr.length - 1 - cfg.finish_tolerance] = _FINISHED
        state[off >= cfg.off_script_frames] = _OFF_SCRIPT
        state[~ok] = np.where(seen, _LOST, _WAITING)[~ok]
        floor = cfg.off_script_sim
        sim_term = np.clip((sim - floor) / (1.0 - floor), 0.0, 1.0)
        doubt = np.clip(gap / cfg.relocalise_cost_margin, 0.0, 1.0)
        conf = np.where(ok, sim_term * (1.0 - 0.5 * doubt), 0.0)

        # Write back (the reads above were copies).
        self.seen[sel] = seen | ok
        self.active[sel], self.switch_streak[sel] = active, switch_streak
        self.still[sel], self.off[sel], self.sim[sel] = still, off, sim
        tr.store(sel)
        self.report[sel] = self._report(rows, every, ok, active, tr.shown, dec_best, dec_top)
        self.activity_cost[sel] = activity_cost
        self.last_state[sel], self.last_conf[sel], self.last_t[sel] = state, conf, t

    def _decode(self, rows: np.ndarray, read: np.ndarray, heard: np.ndarray,
                x: np.ndarray | None,
                cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step every reference's phase decoder on the frames of ``read`` sessions (a lost
        frame holds its state); where ``heard``, add ``decoder_weight * -log(p(phase) /
        max p)`` to each column of ``cost`` in place. Returns that added term (B, P), and
        per reference (B, K) the decoder's best phase (-1: no decoder, or not heard) and
        its log-probability."""
        M = self.model  # x was checked by _decoder_inputs (public entry points)
        b = len(rows)
        added = self.dec_added[:b]
        added.fill(0.0)
        best, top = self.dec_best[:b], self.dec_top[:b]
        best.fill(-1)
        top.fill(-np.inf)
        state = self.dec[rows]  # (B, S) copy
        live = np.flatnonzero(read)
        if not live.size:
            return added, best, top
        n = len(live)
        used = heard[live]  # of the live rows
        out = live[used]
        for stack, slots, targets, refs, starts in zip(M.decoders, M.dec_slots,
                                                       M.dec_targets, M.dec_refs,
                                                       M.dec_starts, strict=True):
            old = state[live, slots].reshape(n, stack.k, stack.layers, stack.hidden)
            logp, new = stack.step(x[live], old)
            state[live, slots] = new.reshape(n, -1)
            logp = logp[used]
            if starts is not None:  # ensembles: one row of log-probabilities per reference
                logp = mean_log_probs(logp, starts)
            raw = logp
            if M.cfg.decoder_stickiness > 0:
                logp = self._stick(rows[out], refs, logp)
            named = logp.argmax(axis=2)
            best[out[:, None], refs] = named
            # The named phase's own log-probability, without the stickiness bonus.
            top[out[:, None], refs] = np.take_along_axis(raw, named[..., None], axis=2)[..., 0]
            # Relative to the decoder's own best phase, -log(p / max p): the term shapes
            # the costs within a reference but adds no level of its own, so a decoder
            # that is confident on the wrong activity's stream cannot pull the activity
            # choice (which compares references' costs) towards it. The stickiness is in
            # the term (inertia for the tracker too, which the report follows: applied
            # to the named phase alone it gained under half as much, docs/changelog.md), so
            # the other phases of a reference cost at most decoder_weight x it more.
            rel = logp - logp.max(axis=2, keepdims=True)
            for i, (cols, phases) in enumerate(targets):
                added[out, cols] = -M.cfg.decoder_weight * rel[:, i, phases]
        self.dec[rows] = state
        if M.cfg.decoder_stickiness > 0:
            self.dec_last[rows[out]] = np.where(best[out] >= 0, best[out],
                                                self.dec_last[rows[out]])
        cost += added
        return added, best, top

    def _stick(self, rows: np.ndarray, refs: np.ndarray, logp: np.ndarray) -> np.ndarray:
        """``logp`` (B, K, P) of references ``refs`` for sessions ``rows``, with
        ``decoder_stickiness`` added to the phase each decoder named on its last frame."""
        last = self.dec_last[rows[:, None], refs]  # (B, K), -1: none yet
        b, k = np.nonzero(last >= 0)
        logp = logp.copy()
        logp[b, k, last[b, k]] += self.model.cfg.decoder_stickiness
        return logp

    def _report(self, rows: np.ndarray, every: np.ndarray, ok: np.ndarray,
                active: np.ndarray, shown: np.ndarray, best: np.ndarray | None,
                top: np.ndarray | None) -> np.ndarray:
        """The reported position (B,): the tracker's (held on lost frames), moved to the
        nearest frame of the active reference's decoder's phase where that decoder is
        surer than ``decoder_phase_confidence`` of the phase next to the position's (a
        boundary the tracker has not caught up with; a phase further away is the
        relocaliser's to judge)."""
        M = self.model
        report = np.where(ok, shown, self.report[rows])
        if best is None or M.cfg.decoder_phase_confidence >= 1.0:
            return report
        phase = best[every, active]
        at = np.maximum(phase, 0)
        lo, hi = M.phase_lo[active, at], M.phase_hi[active, at]
        frame = np.rint(np.clip(report, 0, M.lengths[active] - 1)).astype(np.int64)
        next_to = np.abs(phase - M.phases[M.offsets[active] + frame]) == 1
        use = (ok & next_to & (top[every, active] > M.log_confidence) & (lo >= 0))
        report[use] = np.clip(report[use], lo[use], hi[use])
        return report

    def _pause(self, sel: slice | np.ndarray, rows: np.ndarray, q: np.ndarray,
               ok: np.ndarray, t: np.ndarray,
               active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paused = slower than ``pause_speed_ratio`` x the reference for ``pause_frames``.

        Speed is the distance between the mean of the last ``lag`` frames and the mean of
        the ``lag`` before them, over the time between those means: averaging cuts
        frame-to-frame jitter by ~sqrt(lag) while steady motion shows in full, which is
        what tells a still user from a slow one. The difference of the two sums is kept
        running: the new frame enters the recent half, the one ``lag`` frames back moves
        to the older half, the one ``2 lag`` back (whose ring slot the new one takes)
        leaves. Slots not yet written are zero, so the first frames need no special case.
        """
        M, cfg = self.model, self.model.cfg
        lag, size = cfg.pause_lag, 2 * cfg.pause_lag
        count = self.m_count[rows]
        t0 = np.where(count == 0, t, self.m_t0[rows])
        slot = count % size
        ring = self.m_ring.reshape(-1, M.dim)  # (capacity * 2lag, d)
        at = rows * size + slot  # (B,) ring row of the new frame (and of the leaving one)
        b = len(rows)
        new = self.m_new[:b]  # (B, d) each
        new[:] = q
        middle = np.take(ring, rows * size + (slot + lag) % size, axis=0,
                         out=self.m_middle[:b])
        leaving = np.take(ring, at, axis=0, out=self.m_leaving[:b])
        diff = self.m_diff[sel]  # (B, d): a view when sel is a slice
        diff += new
        diff -= middle
        diff -= middle
        diff += leaving
        ring[at] = new
        times = self.m_times[rows]  # (B, 2lag)
        times[np.arange(b), slot] = t - t0
        count = count + 1
        dt = (M.meter_weights[slot] * times).sum(axis=1)
        dt = np.where(dt > 0, dt, lag * M.frame_dt[active])  # times not increasing: the rate
        speed = np.sqrt(np.einsum("ij,ij->i", diff, diff)) / lag / dt
        slow = ok & (count >= size) & (speed < cfg.pause_speed_ratio * M.ref_speed[active])
        still = np.where(slow, self.still[rows] + 1, 0)  # a lost frame also ends a pause
        lost = np.flatnonzero(~ok)
        if lost.size:  # restart the meter: the speed across a gap is meaningless
            count[lost], t0[lost], diff[lost] = 0, 0.0, 0.0
            self.m_ring[rows[lost]] = 0.0
        if not isinstance(sel, slice):
            self.m_diff[sel] = diff
        self.m_count[sel], self.m_t0[sel], self.m_times[sel] = count, t0, times
        return still >= cfg.pause_frames, still

    def _relocalise(self, sel: slice | np.ndarray, rows: np.ndarray, cost: np.ndarray,
                    ok: np.ndarray, seen: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Streaming subsequence DTW with forgetting over every reference at once.

        Returns the new rows (B, P), each reference's best end column (B, K) and the
        activity costs (B, K): EMA of each reference's best mean cost."""
        M, cfg = self.model, self.model.cfg
        b, full = len(rows), isinstance(sel, slice)
        # (B, P) rows before and after; after a full step the two buffers swap roles.
        src = self.reloc[sel] if full else np.take(self.reloc, rows, axis=0,
                                                   out=self.reloc_src[:b])
        dst = self.reloc_spare[:b]
        # Work on the rows laid end to end, (B * P,): a row's leading pad separates it
        # from the previous row's tail as it separates references, and 1-d shifted
        # operands are several times faster than 2-d ones.
        s, d, m = src.reshape(-1), dst.reshape(-1), cfg.max_step
        np.add(s, M.reloc_stay, out=d)  # R(j) + stay
        if m == 1:
            np.minimum(d[1:], s[:-1], out=d[1:])
        else:
            # min(R(j-1), ..., R(j-m)) from pairs p(j) = min(R(j), R(j-1)): p(j-1),
            # p(j-3), ... and R(j-m) alone when m is odd.
            p = self.reloc_pairs[:b].reshape(-1)
            np.minimum(s[1:], s[:-1], out=p[1:])
            for k in range(1, m, 2):
                np.minimum(d[k + 1:], p[1:-k], out=d[k + 1:])
            if m % 2:
                np.minimum(d[m:], s[:-m], out=d[m:])
        d *= M.lam
        d += cost.reshape(-1)
        fresh = np.flatnonzero(ok & ~seen)
        if fresh.size:  # first frame: as if it had lasted forever
            dst[fresh] = cost[fresh] / (1.0 - M.lam)
        lost = np.flatnonzero(~ok)
        if lost.size:
            dst[lost] = src[lost]
        if full:
            self.reloc, self.reloc_spare = self.reloc_spare, self.reloc
            new = self.reloc[sel]
        else:
            self.reloc[rows] = new = dst

        best = np.empty((b, M.n_refs), dtype=np.int64)  # (B, K) columns
        for k, cols in enumerate(M.ref_cols):
            best[:, k] = new[:, cols].argmin(axis=1) + cols.start
        mean_best = np.take_along_axis(new, best, axis=1).astype(np.float64) * (1.0 - M.lam)
        a = 1.0 / cfg.activity_memory
        old = self.activity_cost[rows]  # (B, K)
        ema = np.where(np.isinf(old), mean_best, (1.0 - a) * old + a * mean_best)
        return new, best, np.where(ok[:, None], ema, old)

    # -- estimates ------------------------------------------------------------------------

    def estimates(self, rows: np.ndarray) -> EstimateBatch:
        """The latest estimates of sessions ``rows``, as arrays."""
        M = self.model
        active = self.active[rows]
        state = self.last_state[rows]
        n = M.lengths[active]
        x = np.clip(self.report[rows], 0.0, n - 1.0)
        col = M.offsets[active] + np.rint(x).astype(np.int64)
        s, e = M.run_start[col], M.run_end[col]
        phase_progress = np.clip((x - s) / np.maximum(e - s, 1), 0.0, 1.0)
        waiting = state == _WAITING
        return EstimateBatch(
            M, phase_id=np.where(waiting, -1, M.phases[col]),
            phase_progress=np.where(waiting, 0.0, phase_progress),
            progress=np.where(waiting, 0.0, x / (n - 1)), ref_index=np.where(waiting, 0.0, x),
            confidence=self.last_conf[rows], state=state, ref=active, t=self.last_t[rows])


class _Tracker:
    """The tracker's fields of a batch of sessions, and its three moves. Local frame
    indices throughout; ``offset`` (B,) turns them into columns."""

    def __init__(self, sessions: _Sessions, rows: np.ndarray, active: np.ndarray,
                 reloc: np.ndarray, cost: np.ndarray) -> None:
        M = sessions.model
        self.cfg, self.penalty, self.width, self.lam = M.cfg, M.penalty, M.width, M.lam
        self.reloc, self.cost = reloc, cost  # (B, P) this frame's relocaliser rows, costs
        self.offset = M.offsets[active]  # (B,)
        self.length = M.lengths[active]  # (B,)
        self.pos, self.shown = sessions.pos[rows], sessions.shown[rows]
        self.lo, self.band = sessions.lo[rows], sessions.band[rows]  # band (B, W)
        self.streak = sessions.streak[rows]
        self._sessions = sessions
        self._cells = np.arange(self.width)  # (W,)

    def store(self, sel: slice | np.ndarray) -> None:
        s = self._sessions
        s.pos[sel], s.shown[sel], s.lo[sel], s.band[sel] = (
            self.pos, self.shown, self.lo, self.band)
        s.streak[sel] = self.streak

    @staticmethod
    def take(a: np.ndarray, ix: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``a[ix[i], cols[i, ...]]`` for a C-contiguous 2-d ``a`` (a flat take: faster
        than 2-d fancy indexing)."""
        flat = ix * a.shape[1]
        return np.take(a.reshape(-1), flat.reshape(flat.shape + (1,) * (cols.ndim - 1)) + cols)

    def _window(self, ix: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First frame of the window around ``pos`` and a (len(ix), W) mask of its cells
        that lie past the window's last frame (clipped at the reference's end)."""
        lo = np.maximum(pos - self.cfg.back, 0)
        hi = np.minimum(pos + self.cfg.band, self.length[ix] - 1)
        return lo, self._cells >= (hi - lo + 1)[:, None]

    def _set_rows(self, ix: np.ndarray, lo: np.ndarray, row: np.ndarray) -> None:
        """Store band rows (len(ix), W), shifted so that each minimum is 0."""
        self.band[ix] = row - row.min(axis=1, keepdims=True)  # keep values bounded
        self.lo[ix] = lo

    def _columns(self, ix: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return (self.offset[ix] + lo)[:, None] + self._cells  # (len(ix), W)

    def jump(self, ix: np.ndarray, target: np.ndarray) -> None:
        """Restart at ``target[ix]``, seeding the band from the relocaliser's sums."""
        if not ix.size:
            return
        pos = target[ix]
        lo, past = self._window(ix, pos)
        row = self.take(self.reloc, ix, self._columns(ix, lo)).astype(np.float64)
        row[past] = np.inf
        self._set_rows(ix, lo, row)
        self.pos[ix], self.shown[ix], self.streak[ix] = pos, pos, 0

    def start(self, ix: np.ndarray) -> None:
        """First frame: assume the user starts at the beginning (the relocaliser corrects)."""
        if not ix.size:
            return
        lo, past = self._window(ix, np.zeros(ix.size, dtype=np.int64))
        row = (self.take(self.cost, ix, self._columns(ix, lo))
               + self.cfg.skip_penalty * self._cells)
        row[past] = np.inf
        self._set_rows(ix, lo, row)
        self.pos[ix] = lo + row.argmin(axis=1)
        self.shown[ix] = self.pos[ix]

    def track(self, ix: np.ndarray) -> None:
        """One online-DTW step: best predecessor (with move penalties) plus this cost."""
        if not ix.size:
            return
        cfg, w = self.cfg, self.width
        lo, past = self._window(ix, self.pos[ix])
        # Predecessors of new cell c are old cells (lo + c - k) - lo_old, k = max_step ..
        # -back: place the old band (inf around it) shifted by lo - lo_old, then each k is
        # a slice.
        n_pred = len(self.penalty)
        left = cfg.max_step + cfg.back  # lo - lo_old >= -back
        old = np.full((ix.size, left + 2 * w + cfg.back), np.inf)
        old[:, left:left + w] = self.band[ix]
        first = left - cfg.max_step + lo - self.lo[ix]  # (n,) where cell 0's k=max_step is
        shifted = self.take(old, np.arange(ix.size), first[:, None]
                            + np.arange(w + n_pred - 1))  # (n, W + n_pred - 1)
        row = shifted[:, :w] + self.penalty[0]  # (n, W)
        for j in range(1, n_pred):
            np.minimum(row, shifted[:, j:j + w] + self.penalty[j], out=row)
        row += self.take(self.cost, ix, self._columns(ix, lo))
        row[past] = np.inf
        self._set_rows(ix, lo, row)
        self.pos[ix] = lo + row.argmin(axis=1)
        s = cfg.smoothing
        self.shown[ix] = s * self.shown[ix] + (1.0 - s) * self.pos[ix]

    def gap(self, ix: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(B,) how much cheaper (mean cost per frame) the relocaliser's best is than the
        best within ``back`` frames of the tracked position; 0 outside ``ix``."""
        back = self.cfg.back
        at = (self.offset + self.pos)[ix]
        near = self.take(self.reloc, ix, at[:, None] + np.arange(-back, back + 1)).min(axis=1)
        best = self.take(self.reloc, ix, (self.offset + target)[ix])
        gap = np.zeros(len(self.pos))
        gap[ix] = (near.astype(np.float64) - best.astype(np.float64)) * (1.0 - self.lam)
        return gap


class EstimateBatch(Sequence[Estimate]):
    """The estimates of one step of many sessions, as (B,) arrays in the order of the
    sessions given. It is a sequence of :class:`Estimate` built on access; consumers that
    want arrays read the fields (``state`` holds indices into :data:`STATES`, ``ref``
    indices into the references)."""

    __slots__ = ("_model", "_list", "phase_id", "phase_progress", "progress", "ref_index",
                 "confidence", "state", "ref", "t")

    def __init__(self, model: _Model, *, phase_id: np.ndarray, phase_progress: np.ndarray,
                 progress: np.ndarray, ref_index: np.ndarray, confidence: np.ndarray,
                 state: np.ndarray, ref: np.ndarray, t: np.ndarray) -> None:
        self._model, self._list = model, None
        self.phase_id, self.phase_progress, self.progress = phase_id, phase_progress, progress
        self.ref_index, self.confidence, self.state = ref_index, confidence, state
        self.ref, self.t = ref, t

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, i):  # type: ignore[override]  # int -> Estimate, slice -> list
        return self.to_list()[i]

    def __iter__(self):
        return iter(self.to_list())

    @property
    def states(self) -> list[str]:
        return [STATES[s] for s in self.state.tolist()]

    def to_list(self) -> list[Estimate]:
        """Every estimate, as :class:`Estimate` objects (built once, then cached)."""
        if self._list is None:
            names, activities = self._model.phase_names, self._model.activities
            self._list = [
                Estimate(p, names[r][p] if p >= 0 else "", pp, pr, x, c, STATES[s],
                         activities[r], t)
                for p, pp, pr, x, c, s, r, t in zip(
                    self.phase_id.tolist(), self.phase_progress.tolist(),
                    self.progress.tolist(), self.ref_index.tolist(),
                    self.confidence.tolist(), self.state.tolist(), self.ref.tolist(),
                    self.t.tolist(), strict=True)]
        return self._list


def _unit_rows_or_zero(embeddings: np.ndarray, valid: np.ndarray | None, dim: int,
                       who: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, d) float32 unit rows, zero where invalid, and the (B,) validity: a row is invalid
    when flagged so, or with any NaN or inf, or (near) zero."""
    q = np.asarray(embeddings, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"{who}: expected embeddings of size {dim}, found shape {q.shape}")
    norms = np.sqrt((q * q).sum(axis=1))  # NaN or inf anywhere makes the norm non-finite
    ok = np.isfinite(norms) & (norms > _EPS)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    return np.where(ok[:, None], q / np.where(ok, norms, 1.0)[:, None], 0.0), ok


def _decoder_inputs(model: _Model, inputs: np.ndarray | None, b: int,
                    who: str) -> np.ndarray | None:
    """(B, D) float32 model inputs for the phase decoders (NaN -> 0, as
    ``preprocess.assemble``), or None when no reference has a decoder."""
    if not model.decoders:
        return None
    if inputs is None:
        raise ValueError(f"{who}: the references carry phase decoders, which need each "
                         f"frame's model input (inputs=...)")
    x = np.asarray(inputs, dtype=np.float32).reshape(b, -1)
    if x.shape[1] != model.input_dim:
        raise ValueError(f"{who}: expected model inputs of size {model.input_dim}, found "
                         f"{x.shape[1]}")
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------------------------------
# Public steppers
# ---------------------------------------------------------------------------------------

class Aligner:
    """Online aligner of one stream against one or more references (see module docstring).

    Several references: every reference's relocaliser runs each frame (it gives each
    activity's recent best cost); only the chosen reference's tracker runs. The choice
    switches with hysteresis (``activity_margin`` for ``activity_patience`` frames).
    It is a batch of one session: the same code as :class:`AlignerBank`.
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None) -> None:
        refs = _checked_references(references)
        self._init(_Model(refs, config or AlignerConfig.for_references(refs)))

    def _init(self, model: _Model) -> None:
        self._model = model
        self._sessions = _Sessions(model, capacity=1)
        self._row = np.array([self._sessions.add()])
        self._last = self._sessions.estimates(self._row)[0]

    @property
    def references(self) -> list[Reference]:
        return self._model.refs

    @property
    def config(self) -> AlignerConfig:
        return self._model.cfg

    @property
    def dim(self) -> int:
        return self._model.dim

    @property
    def lookahead(self) -> int:
        """Steps each estimate lags the newest frame: the phase decoders' lookahead (0:
        every estimate describes the frame just given)."""
        return self._model.lookahead

    def fresh(self) -> Aligner:
        """A new aligner over the same references and config, sharing their read-only
        arrays (cheap)."""
        new = Aligner.__new__(Aligner)
        new._init(self._model)
        return new

    @property
    def last(self) -> Estimate:
        """The latest estimate (``waiting`` before the first frame)."""
        return self._last

    def reset(self) -> None:
        self._sessions.reset(self._row)
        self._last = self._sessions.estimates(self._row)[0]

    def step(self, embedding: np.ndarray | None, t: float, valid: bool = True,
             inputs: np.ndarray | None = None) -> Estimate:
        """Consume one frame's embedding (d,) at time ``t`` (seconds). ``None``, any NaN or
        ``valid=False`` mean "no pose this frame": the position is held. ``inputs`` (D,):
        the frame's model input, required when a reference carries a phase decoder.
        With :attr:`lookahead` L > 0, the estimate describes the frame given L steps
        before (its ``t``; ``waiting`` for the first L)."""
        if embedding is None:
            q, ok = np.zeros((1, self.dim), dtype=np.float32), np.zeros(1, dtype=bool)
        else:
            q, ok = _unit_rows_or_zero(np.reshape(embedding, (1, -1)), np.array([valid]),
                                       self.dim, "Aligner.step")
        x = _decoder_inputs(self._model, inputs, 1, "Aligner.step")
        self._last = self._sessions.step(self._row, q, ok, np.array([float(t)]), x)[0]
        return self._last

    def run(self, embeddings: np.ndarray, times: np.ndarray | None = None,
            valid: np.ndarray | None = None) -> list[Estimate]:
        """Step through a whole (T, d) sequence; ``times`` default to the first
        reference's frame rate."""
        n = len(embeddings)
        if times is None:
            times = np.arange(n) / self.references[0].fps
        ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return [self.step(embeddings[i], float(times[i]), bool(ok[i])) for i in range(n)]


class AlignerBank:
    """Many sessions over the same references and config, stepped together.

    A session is created on first sight (or by :meth:`add`) and runs the same math as its
    own :class:`Aligner` would. ``step_many`` is one matmul and a fixed number of numpy
    operations over all the sessions given, whatever their number. The float32 products
    can differ in the last bits with the number of sessions stepped together (the BLAS
    kernel's blocking), which now and then flips a near-tie: the activity of 53 frames of
    the harness's 24 NaN-joint streams changed between stepping them alone and with all
    scenarios' streams at once (docs/changelog.md).
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None, capacity: int = 16) -> None:
        refs = _checked_references(references)
        self._model = _Model(refs, config or AlignerConfig.for_references(refs))
        self._sessions = _Sessions(self._model, capacity)
        self._slot: dict[Hashable, int] = {}
        self._ids: list[Hashable] = []  # session of each slot

    @property
    def references(self) -> list[Reference]:
        return self._model.refs

    @property
    def config(self) -> AlignerConfig:
        return self._model.cfg

    @property
    def lookahead(self) -> int:
        """Steps each estimate lags the newest frame: the phase decoders' lookahead (0:
        every estimate describes the frame just given)."""
        return self._model.lookahead

    @property
    def needs_inputs(self) -> bool:
        """True when a reference's phase decoder is used: ``step_many`` then needs
        ``inputs``; otherwise callers need not build them."""
        return bool(self._model.decoders)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, session: Hashable) -> bool:
        return session in self._slot

    @property
    def sessions(self) -> list[Hashable]:
        return list(self._ids)

    def add(self, session: Hashable) -> None:
        """Start a session (``waiting``); nothing happens if it exists."""
        if session not in self._slot:
            self._slot[session] = self._sessions.add()
            self._ids.append(session)

    def remove(self, session: Hashable) -> None:
        slot = self._slot.pop(session, None)
        if slot is None:
            return
        moved = self._sessions.remove(slot)
        last_session = self._ids.pop()
        if moved != slot:
            self._ids[slot] = last_session
            self._slot[last_session] = slot

    def reset(self, session: Hashable) -> None:
        """Restart a session (creating it if needed), as :meth:`Aligner.reset`."""
        self.add(session)
        self._sessions.reset(np.array([self._slot[session]]))

    def last(self, session: Hashable) -> Estimate:
        """A session's latest estimate (``waiting`` for an unknown one)."""
        if session not in self._slot:
            return Estimate(-1, "", 0.0, 0.0, 0.0, 0.0, "waiting", self._model.activities[0],
                            math.nan)
        return self._sessions.estimates(np.array([self._slot[session]]))[0]

    def step_many(self, ids: Sequence[Hashable], embeddings: np.ndarray,
                  times: Sequence[float] | np.ndarray,
                  valid: Sequence[bool] | np.ndarray | None = None,
                  inputs: np.ndarray | None = None) -> EstimateBatch:
        """Step each session ``ids[b]`` (distinct) with ``embeddings[b]`` (B, d) at
        ``times[b]``; ``valid[b] = False`` or a NaN means no pose (as
        :meth:`Aligner.step`); ``inputs`` (B, D): the frames' model inputs, required when
        a reference carries a phase decoder. Returns the estimates in the order of
        ``ids``; with :attr:`lookahead` L > 0, each describes that session's frame of L
        steps before (its ``t``)."""
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] != len(ids):
            raise ValueError(f"step_many: expected ({len(ids)}, d) embeddings, found {q.shape}")
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        if t.shape != (len(ids),):
            raise ValueError(f"step_many: expected {len(ids)} times, found {t.shape}")
        q, ok = _unit_rows_or_zero(q, valid, self._model.dim, "step_many")
        x = _decoder_inputs(self._model, inputs, len(ids), "step_many")
        for session in ids:
            if session not in self._slot:
                self.add(session)
        rows = np.fromiter((self._slot[s] for s in ids), dtype=np.int64, count=len(ids))
        if len(set(rows.tolist())) != len(rows):
            raise ValueError("step_many: a session appears more than once in one step")
        return self._sessions.step(rows, q, ok, t, x)

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
and only the chosen reference's tracker does. States and tuning: ``docs/aligner.md``.

``offline_dtw`` and ``subsequence_dtw`` are the exact batch counterparts (the upper bound
in the streaming evaluation, offline checks).
"""

from __future__ import annotations

import copy
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

__all__ = [
    "REFERENCE_FORMAT_VERSION",
    "STATES",
    "Aligner",
    "AlignerBank",
    "AlignerConfig",
    "Estimate",
    "Reference",
    "ReferenceFormatError",
    "offline_dtw",
    "path_to_index",
    "subsequence_dtw",
]

REFERENCE_FORMAT_VERSION = 1
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
            "format_version": np.int64(REFERENCE_FORMAT_VERSION),
            "name": np.str_(self.name),
            "activity": np.str_(self.activity),
            "embeddings": self.embeddings,
            "phases": self.phases,
            "phase_names": np.array(self.phase_names, dtype=np.str_),
            "times": self.times,
            "fps": np.float64(self.fps),
            "model_fingerprint": np.str_(self.model_fingerprint),
            "meta": np.str_(json.dumps(self.meta)),
        }
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)

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
            )
        except (ValueError, TypeError) as e:  # includes ReferenceFormatError, JSON errors
            raise ReferenceFormatError(f"{path}: {e}") from None


_REQUIRED = ("format_version", "name", "activity", "embeddings", "phases", "phase_names",
             "times", "fps", "model_fingerprint", "meta")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All required members of a reference archive, or one-line errors naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ReferenceFormatError(f"{path}: expected a .npz archive, found one array")
            missing = [k for k in _REQUIRED if k not in npz.files]
            if missing:
                raise ReferenceFormatError(f"{path}: missing fields {', '.join(missing)}")
            return {k: npz[k] for k in _REQUIRED}
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
    band: int = 12  # look-ahead of the tracker window, reference frames
    back: int = 2  # tolerated backward motion (jitter, overshoot), reference frames
    max_step: int = 4  # most reference frames advanced per query frame (user up to 4x faster)
    stay_penalty: float = 0.005  # cost of not advancing: a tie should move forward
    skip_penalty: float = 0.005  # per extra frame skipped beyond the first
    back_penalty: float = 0.02  # per frame moved backwards
    smoothing: float = 0.3  # EMA factor of the reported index (0 = raw argmin)
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
    relocalise_memory: float = 8.0  # time constant of forgetting, frames
    relocalise_margin: int = 8  # a jump must move at least this far, reference frames
    relocalise_cost_margin: float = 0.04  # ... and be this much cheaper (mean cost) ...
    relocalise_patience: int = 3  # ... for this many consecutive frames
    finish_tolerance: int = 2  # "finished" within this many frames of the end
    # Activity choice among several references: EMA of each one's best recent cost.
    activity_memory: float = 10.0  # frames
    activity_margin: float = 0.02
    activity_patience: int = 8

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
        for name in ("relocalise_memory", "activity_memory"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"AlignerConfig.{name}: expected >= 1 frame, "
                                 f"found {getattr(self, name)}")


@dataclass
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
# Online alignment to one reference
# ---------------------------------------------------------------------------------------

class _Track:
    """Tracker and relocaliser state for one reference (see the module docstring).

    Both DP rows live in persistent padded buffers with precomputed sliding-window views,
    so a step is a handful of numpy calls (per-call overhead, not arithmetic, dominates
    at these sizes).
    """

    def __init__(self, ref: Reference, cfg: AlignerConfig) -> None:
        self.ref, self.cfg = ref, cfg
        self.n = len(ref)
        self._pad = max(cfg.max_step, cfg.back)
        # Tracker predecessors of cell i: i - k for k = max_step .. -back, in window order.
        ks = np.arange(cfg.max_step, -cfg.back - 1, -1)
        self._penalty = np.select(
            [ks < 0, ks == 0, ks >= 2],
            [cfg.back_penalty * -ks, np.full(ks.shape, cfg.stay_penalty),
             cfg.skip_penalty * (ks - 1)], 0.0)
        # Relocaliser: R(j) = c(j) + lam * min(R(j) + stay, R(j-1), ..., R(j-max_step)), a
        # sum over an exponential window (~relocalise_memory frames). The stay penalty is
        # divided by lam so it weighs like a cost; skips are free: it is a detector.
        self._lam = 1.0 - 1.0 / cfg.relocalise_memory
        self._reloc_stay = cfg.stay_penalty / self._lam
        self.speed = _window_speed(ref.embeddings, ref.fps, cfg.pause_lag)
        self._phases = ref.phases.tolist()  # python lists: scalar lookups on the hot path
        self._run = list(zip(ref.run_start.tolist(), ref.run_end.tolist(), strict=True))
        self.reset()

    def fresh(self) -> _Track:
        """A new track sharing this one's read-only parts (penalties, lookups, speed)."""
        new = copy.copy(self)
        new.reset()  # allocates all mutable state anew
        return new

    def reset(self) -> None:
        cfg = self.cfg
        self.started = False
        self.pos = 0
        self.shown = 0.0  # smoothed position: what is reported
        self._acc = np.full(self.n + 2 * self._pad, np.inf)  # tracker row, inf off-window
        self._acc_win = np.lib.stride_tricks.sliding_window_view(
            self._acc, cfg.max_step + cfg.back + 1)
        self._lo = self._hi = 0
        self._reloc_buf = np.full(cfg.max_step + self.n, np.inf)  # inf pad, then the row
        self.reloc = self._reloc_buf[cfg.max_step:]
        # Views of R(j - k), k = 1..max_step (np.minimum over shifted views beats a strided
        # sliding-window reduction by ~4x here).
        m = cfg.max_step
        self._reloc_shifted = [self._reloc_buf[m - k:m - k + self.n] for k in range(1, m + 1)]
        self._reloc_started = False
        self.best = 0  # relocaliser's best end frame, refreshed every frame
        self.gap = 0.0  # how much cheaper (mean cost per frame) best is than the tracked one
        self._streak = 0
        self.activity_cost = math.inf

    # -- relocaliser (whole reference, every frame) -----------------------------------

    def update_relocaliser(self, cost: np.ndarray) -> None:
        row = self.reloc
        if self._reloc_started:
            best = row + self._reloc_stay
            for prev in self._reloc_shifted:
                np.minimum(best, prev, out=best)
            best *= self._lam
            best += cost
            row[:] = best
        else:
            row[:] = cost / (1.0 - self._lam)  # as if this frame had lasted forever
            self._reloc_started = True
        self.best = int(row.argmin())
        mean_best = float(row[self.best]) * (1.0 - self._lam)
        a = 1.0 / self.cfg.activity_memory
        self.activity_cost = mean_best if math.isinf(self.activity_cost) else (
            (1.0 - a) * self.activity_cost + a * mean_best)

    def refresh_gap(self) -> None:
        """Call after the position and the relocaliser row have both been updated."""
        back = self.cfg.back
        near = float(self.reloc[max(self.pos - back, 0):self.pos + back + 1].min())
        self.gap = (near - float(self.reloc[self.best])) * (1.0 - self._lam)

    def maybe_jump(self) -> bool:
        """Jump to the relocaliser's choice once it has been clearly better for a while."""
        cfg = self.cfg
        far = abs(self.best - self.pos) > cfg.relocalise_margin
        self._streak = self._streak + 1 if far and self.gap > cfg.relocalise_cost_margin else 0
        if self._streak < cfg.relocalise_patience:
            return False
        self.jump_to(self.best)
        return True

    # -- tracker (band around the position) ---------------------------------------------

    def _window(self, pos: int) -> tuple[int, int]:
        return max(pos - self.cfg.back, 0), min(pos + self.cfg.band, self.n - 1)

    def _set_row(self, lo: int, hi: int, row: np.ndarray) -> None:
        p = self._pad
        self._acc[self._lo + p:self._hi + p + 1] = np.inf
        self._acc[lo + p:hi + p + 1] = row
        self._acc[lo + p:hi + p + 1] -= row.min()  # keep values bounded
        self._lo, self._hi = lo, hi

    def jump_to(self, pos: int) -> None:
        """Restart the tracker at ``pos``, seeding its row from the relocaliser's sums."""
        lo, hi = self._window(pos)
        self._set_row(lo, hi, self.reloc[lo:hi + 1])
        self.pos, self.shown, self._streak = pos, float(pos), 0
        self.started = True
        self.refresh_gap()  # pos may not be the relocaliser's best (a switch jumps too)

    def start(self, cost: np.ndarray) -> None:
        """First frame: assume the user starts at the beginning (the relocaliser corrects)."""
        lo, hi = self._window(0)
        row = cost[lo:hi + 1] + self.cfg.skip_penalty * np.arange(hi - lo + 1)
        self._set_row(lo, hi, row)
        self.pos = lo + int(row.argmin())
        self.shown = float(self.pos)
        self.started = True

    def track(self, cost: np.ndarray) -> None:
        """One online-DTW step: best predecessor (with move penalties) plus this cost."""
        lo, hi = self._window(self.pos)
        a = lo + self._pad - self.cfg.max_step  # window of cell lo starts at buffer index a
        row = (self._acc_win[a:a + hi - lo + 1] + self._penalty).min(axis=1)
        row += cost[lo:hi + 1]
        self._set_row(lo, hi, row)
        self.pos = lo + int(row.argmin())
        s = self.cfg.smoothing
        self.shown = s * self.shown + (1.0 - s) * self.pos

    # -- reporting ------------------------------------------------------------------------

    def where(self) -> tuple[float, int, float]:
        """Reported (fractional index, phase id, phase progress), in python scalars."""
        x = min(max(self.shown, 0.0), self.n - 1.0)
        i = int(round(x))
        s, e = self._run[i]
        return x, self._phases[i], min(max((x - s) / max(e - s, 1), 0.0), 1.0)


def _window_speed(embeddings: np.ndarray, fps: float, lag: int) -> float:
    """Median speed (per second) of a sequence, measured as :class:`_SpeedMeter` does."""
    lag = max(min(lag, len(embeddings) // 2), 1)
    csum = np.concatenate([np.zeros((1, embeddings.shape[1])), np.cumsum(embeddings, axis=0)])
    means = (csum[lag:] - csum[:-lag]) / lag  # mean of frames i .. i+lag-1
    steps = np.linalg.norm(means[lag:] - means[:-lag], axis=1)
    return float(np.median(steps)) * fps / lag


class _SpeedMeter:
    """Speed of a stream of embeddings: distance between the mean of the last ``lag`` frames
    and the mean of the ``lag`` frames before them, over the time between those means.
    Averaging cuts frame-to-frame jitter by ~sqrt(lag) while steady motion shows in full,
    which is what tells a still user from a slow one."""

    def __init__(self, lag: int, dim: int) -> None:
        self.lag = lag
        n = 2 * lag
        # Frames go round a ring of n slots. With the newest frame in slot s, the slots from
        # oldest to newest are s+1, ..., s+n (mod n); row s weighs them -1/lag (older half)
        # and +1/lag (recent half), so one product gives the difference of the two means.
        halves = np.concatenate([np.full(lag, -1.0 / lag), np.full(lag, 1.0 / lag)])
        self._weights = np.stack([np.roll(halves, s + 1) for s in range(n)])  # (n, n)
        self._ring = np.zeros((n, dim))
        self._times = np.zeros(n)
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self._t0 = 0.0  # times are kept relative to the first frame, for precision

    def push(self, q: np.ndarray, t: float, frame_dt: float) -> float | None:
        """Add a frame; the speed per second once ``2 * lag`` frames are in, else None."""
        if self._count == 0:
            self._t0 = t
        slot = self._count % len(self._times)
        self._ring[slot] = q
        self._times[slot] = t - self._t0
        self._count += 1
        if self._count < len(self._times):
            return None
        w = self._weights[slot]
        diff = w @ self._ring
        dt = float(w @ self._times)
        dt = dt if dt > 0 else self.lag * frame_dt  # timestamps not increasing: trust the rate
        return math.sqrt(float(diff @ diff)) / dt


# ---------------------------------------------------------------------------------------
# The aligner
# ---------------------------------------------------------------------------------------

class Aligner:
    """Online aligner of one stream against one or more references (see module docstring).

    Several references: every reference's relocaliser runs each frame (it gives each
    activity's recent best cost); only the chosen reference's tracker runs. The choice
    switches with hysteresis (``activity_margin`` for ``activity_patience`` frames).
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None) -> None:
        refs = [references] if isinstance(references, Reference) else list(references)
        if not refs:
            raise ValueError("Aligner: expected at least one reference, found none")
        if len({r.dim for r in refs}) > 1:
            raise ValueError("Aligner: references have different embedding sizes "
                             f"{sorted({r.dim for r in refs})}")
        prints = {r.model_fingerprint for r in refs if r.model_fingerprint}
        if len(prints) > 1:
            raise ValueError(f"Aligner: references come from different models {sorted(prints)}")
        self.references = refs
        self.config = config or AlignerConfig()
        self._tracks = [_Track(r, self.config) for r in refs]
        # Row offsets into the stacked embeddings, for one matmul over all references.
        self._stacked = np.concatenate([r.embeddings for r in refs])
        ends = np.cumsum([len(r) for r in refs]).tolist()
        self._spans = list(zip([0] + ends[:-1], ends, strict=True))
        self.reset()

    @property
    def dim(self) -> int:
        return self.references[0].dim

    def fresh(self) -> Aligner:
        """A new aligner over the same references and config, sharing their read-only arrays
        (cheap: for many sessions, build one aligner and ``fresh()`` it per session)."""
        new = copy.copy(self)
        new._tracks = [tr.fresh() for tr in self._tracks]
        new.reset()
        return new

    @property
    def last(self) -> Estimate:
        """The latest estimate (``waiting`` before the first frame)."""
        return self._last

    def reset(self) -> None:
        for tr in self._tracks:
            tr.reset()
        self._active = 0
        self._switch_streak = 0
        self._meter = _SpeedMeter(self.config.pause_lag, self.dim)
        self._still = 0
        self._off = 0
        self._sim = 0.0  # EMA of the similarity at the tracked position
        self._seen = False
        self._last = self._waiting(math.nan)

    # -- public stepping ------------------------------------------------------------------

    def step(self, embedding: np.ndarray | None, t: float, valid: bool = True) -> Estimate:
        """Consume one frame's embedding (d,) at time ``t`` (seconds). ``None``, any NaN or
        ``valid=False`` mean "no pose this frame": the position is held."""
        q = _unit_or_none(embedding, valid, self.dim)
        if q is None:
            return self._lost(t)
        return self._advance(q, self._stacked @ q, t)

    def run(self, embeddings: np.ndarray, times: np.ndarray | None = None,
            valid: np.ndarray | None = None) -> list[Estimate]:
        """Step through a whole (T, d) sequence; ``times`` default to the first
        reference's frame rate."""
        n = len(embeddings)
        if times is None:
            times = np.arange(n) / self.references[0].fps
        ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return [self.step(embeddings[i], float(times[i]), bool(ok[i])) for i in range(n)]

    # -- one frame ------------------------------------------------------------------------

    def _lost(self, t: float) -> Estimate:
        self._meter.reset()  # the speed across a gap is meaningless
        self._still = 0
        if not self._seen:
            self._last = self._waiting(t)
        else:
            self._last = self._estimate(t, "tracking_lost", confidence=0.0)
        return self._last

    def _advance(self, q: np.ndarray, sims: np.ndarray, t: float) -> Estimate:
        """One valid frame: ``sims`` (sum of T_ref,) are its cosines to every reference."""
        cfg = self.config
        paused = self._update_pause(q, t)
        on_script = float(sims.max()) >= cfg.off_script_sim
        self._off = 0 if on_script else self._off + 1
        cost_all = 1.0 - sims
        costs = [cost_all[a:b] for a, b in self._spans]
        for tr, cost in zip(self._tracks, costs, strict=True):
            tr.update_relocaliser(cost)
        switched = self._choose_activity()
        tr, cost = self._tracks[self._active], costs[self._active]
        if switched:
            tr.jump_to(tr.best)
        elif not tr.started:
            tr.start(cost)
        elif on_script and not paused:
            # An unrelated or a still frame says nothing about progress: hold, do not drift.
            tr.track(cost)
        tr.refresh_gap()
        if on_script and not switched:
            tr.maybe_jump()  # also while paused: the user may have moved while lost
        self._seen = True
        sim = 1.0 - float(cost[tr.pos])
        self._sim = sim if self._last.state == "waiting" else 0.5 * (self._sim + sim)
        self._last = self._estimate(t, self._state(paused), self._confidence(tr))
        return self._last

    def _update_pause(self, q: np.ndarray, t: float) -> bool:
        """Paused = slower than ``pause_speed_ratio`` x the reference for ``pause_frames``."""
        cfg = self.config
        ref = self._tracks[self._active]
        speed = self._meter.push(q, t, frame_dt=1.0 / ref.ref.fps)
        slow = speed is not None and speed < cfg.pause_speed_ratio * ref.speed
        self._still = self._still + 1 if slow else 0
        return self._still >= cfg.pause_frames

    def _choose_activity(self) -> bool:
        """Switch to the reference with the lowest recent cost, with hysteresis."""
        if len(self._tracks) == 1:
            return False
        scores = [tr.activity_cost for tr in self._tracks]
        best = int(np.argmin(scores))
        if not self._seen:
            self._active = best
            return False
        better = scores[best] < scores[self._active] - self.config.activity_margin
        self._switch_streak = self._switch_streak + 1 if better else 0
        if self._switch_streak < self.config.activity_patience:
            return False
        self._active, self._switch_streak = best, 0
        return True

    def _state(self, paused: bool) -> str:
        tr = self._tracks[self._active]
        if self._off >= self.config.off_script_frames:
            return "off_script"
        if tr.pos >= tr.n - 1 - self.config.finish_tolerance:
            return "finished"
        return "paused" if paused else "tracking"

    def _confidence(self, tr: _Track) -> float:
        """Similarity of the current match, scaled from the off-script threshold (0) to 1,
        halved as the relocaliser's best alternative becomes a jump candidate."""
        floor = self.config.off_script_sim
        sim_term = min(max((self._sim - floor) / (1.0 - floor), 0.0), 1.0)
        doubt = min(max(tr.gap / self.config.relocalise_cost_margin, 0.0), 1.0)
        return sim_term * (1.0 - 0.5 * doubt)

    # -- estimates ------------------------------------------------------------------------

    def _waiting(self, t: float) -> Estimate:
        ref = self.references[self._active]
        return Estimate(-1, "", 0.0, 0.0, 0.0, 0.0, "waiting", ref.activity, float(t))

    def _estimate(self, t: float, state: str, confidence: float) -> Estimate:
        tr = self._tracks[self._active]
        ref = tr.ref
        x, phase, phase_progress = tr.where()
        return Estimate(
            phase_id=phase, phase_name=ref.phase_names[phase],
            phase_progress=phase_progress, progress=x / (tr.n - 1),
            ref_index=x, confidence=float(confidence), state=state,
            activity=ref.activity, t=float(t),
        )


def _unit_or_none(embedding: np.ndarray | None, valid: bool, dim: int) -> np.ndarray | None:
    if embedding is None or not valid:
        return None
    q = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if q.shape[0] != dim:
        raise ValueError(f"Aligner.step: expected an embedding of size {dim}, found {q.shape}")
    norm = math.sqrt(float(q @ q))  # NaN or inf anywhere makes this non-finite
    if not math.isfinite(norm) or norm < _EPS:
        return None
    return q / norm


# ---------------------------------------------------------------------------------------
# Many streams
# ---------------------------------------------------------------------------------------

class AlignerBank:
    """One aligner per session, created on first sight, sharing references and config.

    ``step_many`` computes every stream's similarities to every reference in one matmul;
    the per-stream DP updates are then a Python loop (each is O(band + T_ref)).
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None) -> None:
        self._template = Aligner(references, config)
        self._aligners: dict[Hashable, Aligner] = {}

    def __len__(self) -> int:
        return len(self._aligners)

    def __contains__(self, session: Hashable) -> bool:
        return session in self._aligners

    def get(self, session: Hashable) -> Aligner:
        if session not in self._aligners:
            self._aligners[session] = self._template.fresh()
        return self._aligners[session]

    def remove(self, session: Hashable) -> None:
        self._aligners.pop(session, None)

    def step_many(self, ids: Sequence[Hashable], embeddings: np.ndarray,
                  times: Sequence[float] | np.ndarray,
                  valid: Sequence[bool] | np.ndarray | None = None) -> list[Estimate]:
        """Step each session ``ids[b]`` with ``embeddings[b]`` (B, d) at ``times[b]``."""
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] != len(ids):
            raise ValueError(f"step_many: expected ({len(ids)}, d) embeddings, found {q.shape}")
        norms = np.linalg.norm(q, axis=1)
        ok = np.isfinite(norms) & (norms > _EPS)
        if valid is not None:
            ok &= np.asarray(valid, dtype=bool)
        q = np.where(ok[:, None], q / np.where(ok, norms, 1.0)[:, None], 0.0)
        sims = q @ self._template._stacked.T  # (B, sum T_ref)
        out = []
        for b, session in enumerate(ids):
            al = self.get(session)
            t = float(times[b])
            out.append(al._advance(q[b], sims[b], t) if ok[b] else al._lost(t))
        return out

"""Per-stream state and the bank of streams that share one batched encoder backend.

A headset sends joints at its own rate (30-120 Hz) with capture timestamps; the model was
trained at ``InputSpec.fps`` (METHOD.md §3, "Frame rate"). Each stream is resampled onto
its own model-rate grid ``t0 + k / fps``, anchored at its first frame: whenever a capture
frame reaches or passes the next grid time, one model frame is made by linear interpolation
between the two capture frames around it; after a silence over ``max_gap_s``, or a capture
frame that would make more than ``max_frames_per_push`` model frames, the grid re-anchors
at the new frame instead (one model frame, nothing invented across the gap), so one
capture frame never costs more than a few encoder steps. A joint missing (NaN) in one
neighbour is taken from the other; missing in both stays NaN, and ``frame_features`` turns
it into 0.

The encoder state of a stream (its key/value window) lives in the backend, in a slot the
bank allocates on ``open``. A stream therefore costs the same per frame at minute 60 as at
second 1: the state is a fixed-size window, nothing grows with the stream's length.

No torch here: this module is on the serving path.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.backends.base import Backend, BackendError
from masa_rt.preprocess import InputSpec, frame_features

__all__ = ["ModelFrame", "PushedBatch", "Resampler", "StreamBank", "StreamConfig",
           "StreamError", "StreamState", "nearest_index"]

_TIME_EPS = 1e-6  # seconds; a capture stamp this close to a grid time *is* that grid time


class StreamError(KeyError):
    """An unknown session, or one opened twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelFrame:
    """One frame at the model's rate; ``StreamBank.features`` featurises a batch of them."""

    t: float  # its time on the stream's model-rate grid, seconds (capture clock)
    joints: np.ndarray  # (J, C) float32 resampled raw joints, NaN = missing
    extra: np.ndarray | None  # (F,) resampled per-frame features, for models that take them
    lost: bool  # every joint was missing: tracking lost, nothing to encode


def nearest_index(t: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of the stamp in sorted ``t`` nearest to each ``query`` time (ties: earlier)."""
    if len(t) == 1:
        return np.zeros(len(query), dtype=np.int64)
    right = np.clip(np.searchsorted(t, query), 1, len(t) - 1)
    return np.where(query - t[right - 1] <= t[right] - query, right - 1, right)


def interpolate(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """``(1 - w) a + w b`` elementwise, where a NaN on one side takes the other side."""
    if w <= 0.0:
        return a.copy()
    if w >= 1.0:
        return b.copy()
    return blend_rows(a[None], b[None], np.array([w]))[0]


def blend_rows(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """:func:`interpolate` of row pairs ``a``, ``b`` (B, ...) float32 at weights ``w`` (B,)
    in (0, 1), in float32 arithmetic (the weight rounded to float32 first, as numpy does
    with a Python float times a float32 array): the one definition both the per-session
    and the batched resampling use."""
    w32 = w.astype(np.float32).reshape((-1,) + (1,) * (a.ndim - 1))
    out = a + w32 * (b - a)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    out = np.where(nan_b & ~nan_a, a, out)
    return np.where(nan_a & ~nan_b, b, out)


@dataclass(frozen=True)
class StreamConfig:
    """How live streams are resampled onto the model's grid (the serving path's limits)."""

    # After a longer silence (tracking lost, network stall) the grid is re-anchored at the
    # next frame instead of inventing interpolated frames across the gap.
    max_gap_s: float = 0.5
    # Model frames one capture frame may make. Each costs an encoder step, so without a cap
    # a client spacing its stamps just under max_gap_s apart made ~15 per frame (at 30 fps)
    # within its rate limit. A capture frame that would make more re-anchors the grid, as
    # after a gap. 6: a 5 Hz stream on a 30 Hz model still interpolates.
    max_frames_per_push: int | None = 6


class Resampler:
    """Capture-rate samples (any shape) -> samples on a model-rate grid, in order.

    ``max_gap_s``: after a longer silence (tracking lost, network stall) the grid is
    re-anchored at the next frame instead of inventing interpolated frames across the gap.
    ``max_frames``: a capture frame that would complete more model frames than this also
    re-anchors the grid (one model frame, no interpolation), so one capture frame never
    costs more than ``max_frames`` encoder steps; None: no cap (offline recordings).
    Frames whose stamp does not increase are dropped (``stale`` counts them); ``gaps``
    counts re-anchors after the first frame, ``capped`` those of them due to ``max_frames``.
    """

    def __init__(self, fps: float, max_gap_s: float = 0.5, max_frames: int | None = None):
        if not fps > 0:
            raise ValueError(f"fps: expected > 0, found {fps}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames: expected >= 1 or None, found {max_frames}")
        self.period = 1.0 / fps
        self.max_gap_s = max_gap_s
        self.max_frames = max_frames
        self.stale = 0
        self.gaps = 0
        self.capped = 0
        self.reset()

    def reset(self) -> None:
        self._t0: float | None = None  # grid anchor
        self._k = 0  # index of the next grid time
        self._prev: tuple[float, np.ndarray] | None = None

    def _next_time(self) -> float:
        assert self._t0 is not None
        return self._t0 + self._k * self.period  # from the anchor: no drift from summing

    def push(self, sample: np.ndarray, t: float) -> list[tuple[float, np.ndarray]]:
        """Feed one capture sample; returns the model-rate ``(t, sample)`` it completes."""
        x = np.asarray(sample, dtype=np.float32)
        if self._prev is not None and not t > self._prev[0]:
            self.stale += 1
            return []
        if self._prev is None:
            self._t0, self._k = t, 0
        elif t - self._prev[0] > self.max_gap_s:
            self._reanchor(t)
        elif self.max_frames is not None and self._makes_more_than(self.max_frames, t):
            self._reanchor(t)
            self.capped += 1
        out = []
        while (tk := self._next_time()) <= t + _TIME_EPS:
            if out and not tk > out[-1][0]:
                # Float precision exhausted: from |t| ~ 1e17 s on, t0 + k / fps no longer
                # moves with k, and a hostile stamp (t = 1e300) looped here for ever, growing
                # ``out`` until the server ran out of memory (tests/test_hostile.py). Such a
                # stream gets one model frame per capture frame; a real clock never gets here.
                break
            if self._prev is None or tk >= t - _TIME_EPS:
                out.append((tk, x.copy()))
            else:
                t_prev, x_prev = self._prev
                out.append((tk, interpolate(x_prev, x, (tk - t_prev) / (t - t_prev))))
            self._k += 1
        self._prev = (t, x)
        return out

    def _reanchor(self, t: float) -> None:
        """A discontinuity: the grid starts again at ``t``, nothing is made across the gap."""
        self._t0, self._k = t, 0
        self.gaps += 1

    def _makes_more_than(self, n: int, t: float) -> bool:
        """Would ``t`` complete more than ``n`` model frames? Decided before making any (the
        point is to refuse the work), with the loop's own test for its (n+1)-th grid time."""
        assert self._t0 is not None
        return self._t0 + (self._k + n) * self.period <= t + _TIME_EPS


@dataclass
class PushedBatch:
    """What :meth:`StreamBank.push_many` made of one capture frame per listed session.

    ``made[i]``: row of ``times``/``samples``/``lost`` holding the one model frame that
    row i's capture frame completed on the vectorised path, -1 when it completed none or
    went the scalar way; ``scalar[i]``: the model frames of a row that went through
    :meth:`StreamBank.push` (a first frame, a stale stamp, a gap, a cap, several frames).
    """

    made: list[int]
    times: np.ndarray  # (M,) float64 model-frame times
    samples: np.ndarray  # (M, J*C) float32 resampled joints, NaN = missing
    lost: np.ndarray  # (M,) bool, every joint missing
    shape: tuple[int, ...]  # one frame's joints shape (J, C)
    scalar: dict[int, list[ModelFrame]]

    def frame(self, row: int) -> ModelFrame:
        """Row ``row`` as the :class:`ModelFrame` :meth:`StreamBank.push` would have made."""
        return ModelFrame(t=float(self.times[row]),
                          joints=self.samples[row].reshape(self.shape), extra=None,
                          lost=bool(self.lost[row]))


@dataclass
class StreamState:
    """What the bank keeps per session (the encoder window lives in the backend slot)."""

    session: Hashable
    slot: int
    resampler: Resampler
    last_seq: int = -1
    last_t: float = -math.inf
    frames_in: int = 0
    frames_out: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class StreamBank:
    """All open streams over one backend: resample, featurise, and step them in batches.

    ``push`` turns a capture frame into the model frames it completes; ``features`` makes
    the model input of a batch of them; ``step`` runs ONE backend call for a batch of
    ``(session, features)`` pairs (one frame per session).

    ``counters`` totals the resampling discontinuities of all streams, open or closed:
    ``gap_reset`` (silence over ``max_gap_s``) and ``interp_capped`` (a capture frame
    that would have made over ``max_frames_per_push`` model frames); the server reports
    them as ``streams.<name>`` in its stats.
    """

    def __init__(self, backend: Backend, spec: InputSpec, config: StreamConfig | None = None):
        if backend.input_dim != spec.input_dim:
            raise ValueError(f"backend takes {backend.input_dim} inputs per frame, the input "
                             f"spec makes {spec.input_dim}: model and spec do not match")
        self.backend, self.spec = backend, spec
        self.config = config or StreamConfig()
        self.counters: Counter[str] = Counter()
        self._streams: dict[Hashable, StreamState] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, session: Hashable) -> bool:
        return session in self._streams

    def state(self, session: Hashable) -> StreamState:
        try:
            return self._streams[session]
        except KeyError:
            raise StreamError(f"unknown session {session!r}") from None

    def open(self, session: Hashable) -> int:
        """Start a stream; returns its backend slot. ``CapacityError`` when all are taken."""
        if session in self._streams:
            raise StreamError(f"session {session!r} is already open")
        slot = self.backend.allocate()
        cfg = self.config
        rs = Resampler(self.spec.fps, cfg.max_gap_s, cfg.max_frames_per_push)
        self._streams[session] = StreamState(session, slot, rs)
        return slot

    def close(self, session: Hashable) -> None:
        self.backend.release(self.state(session).slot)
        del self._streams[session]

    def reset(self, session: Hashable) -> None:
        """Forget the stream's history: empty encoder window, new resampling grid."""
        st = self.state(session)
        self.backend.reset(np.array([st.slot]))
        st.resampler.reset()

    def push(self, session: Hashable, joints: np.ndarray, t: float,
             seq: int | None = None, features: np.ndarray | None = None) -> list[ModelFrame]:
        """One capture frame ``joints (J, C)`` at capture time ``t`` (seconds).

        Returns the model frames it completes, oldest first (none, one, or several when
        the capture rate is below the model's). ``features (F,)`` only for models that
        take per-frame features; they are resampled with the joints.
        """
        st = self.state(session)
        st.frames_in += 1
        st.last_t = float(t)
        if seq is not None:
            st.last_seq = int(seq)
        j = np.asarray(joints, dtype=np.float32)
        rs = st.resampler
        gaps, capped = rs.gaps, rs.capped
        out = [self._model_frame(tk, x, j.shape) for tk, x in rs.push(_pack(j, features), t)]
        if rs.gaps != gaps:  # a discontinuity: counted per stream and for the whole bank
            name = "interp_capped" if rs.capped != capped else "gap_reset"
            st.counters[name] = st.counters.get(name, 0) + 1
            self.counters[name] += 1
        st.frames_out += len(out)
        return out

    def push_many(self, sessions: Sequence[Hashable], joints: Sequence[np.ndarray],
                  times: Sequence[float], seqs: Sequence[int]) -> PushedBatch | None:
        """:meth:`push` for one capture frame ``joints[i] (J, C)`` at ``times[i]`` (Python
        floats) of each of ``sessions`` (distinct), in a fixed number of numpy calls for the
        common case: a stream past its first frame whose frame completes zero or one model
        frame with no gap, cap or stale stamp. Those rows are computed together with the
        very operations of :meth:`Resampler.push` and :func:`interpolate` (float64 grid
        times, float32 blend), so the frames and counters are bit for bit the same; the
        other rows go through :meth:`push` one by one. None (nothing changed) when the
        frames do not stack into one array (shapes differ): push them one by one then.
        No per-frame ``features``: for models that read joints only."""
        n = len(sessions)
        try:  # each frame cast as np.asarray(j, float32) casts it; a ragged list refuses
            x = np.array(joints, dtype=np.float32)
        except (ValueError, TypeError):
            return None
        if x.ndim < 2 or len(x) != n:
            return None
        shape = x.shape[1:]
        flat = x.reshape(n, -1)
        states = [self._streams[s] for s in sessions]
        rss = [st.resampler for st in states]
        prev = [rs._prev for rs in rss]
        has = [p is not None for p in prev]  # first frames take the scalar way
        rows = range(n) if all(has) else [i for i in range(n) if has[i]]
        idx = np.arange(n) if len(rows) == n else np.array(rows, dtype=np.int64)
        tr = np.array([times[i] for i in rows], dtype=np.float64)
        t_prev = np.array([prev[i][0] for i in rows], dtype=np.float64)
        t0 = np.array([rss[i]._t0 for i in rows], dtype=np.float64)
        k = np.array([rss[i]._k for i in rows], dtype=np.int64)
        max_gap_s, period = self.config.max_gap_s, 1.0 / self.spec.fps  # as Resampler's
        t_eps = tr + _TIME_EPS
        ok = (tr > t_prev) & ~(tr - t_prev > max_gap_s)  # not stale, no gap
        tk = t0 + k * period  # Resampler._next_time
        makes = tk <= t_eps
        # Two or more model frames: the scalar way. This also sends every capped frame
        # there (Resampler._makes_more_than, max_frames >= 1: a later grid time at or
        # before t means this one is too; float rounding keeps the order).
        ok &= ~(makes & (t0 + (k + 1) * period <= t_eps))
        if not ok.all():
            idx, tr, t_prev, tk, makes = idx[ok], tr[ok], t_prev[ok], tk[ok], makes[ok]
        # The vectorised rows: one model frame where ``makes``, by Resampler.push's rule:
        # the capture sample itself at or past the grid time, else ``interpolate`` with the
        # previous sample (read only for those rows: at the model's rate, none).
        m_idx = idx[makes]
        samples = flat[m_idx]
        tkm, trm, tpm = tk[makes], tr[makes], t_prev[makes]
        w = (tkm - tpm) / (trm - tpm)
        blends = np.flatnonzero(~((tkm >= trm - _TIME_EPS) | (w >= 1.0)))
        if len(blends):
            try:
                a = np.array([prev[i][1] for i in m_idx[blends].tolist()])
            except ValueError:
                return None
            if a.shape[1:] != flat.shape[1:] or a.dtype != np.float32:
                return None
            b, wb = samples[blends], w[blends]
            samples[blends] = np.where((wb <= 0.0)[:, None], a, blend_rows(a, b, wb))
        lost = np.isnan(samples).all(axis=1)
        made = [-1] * n
        rows_x = list(flat)  # views: each row is its stream's previous sample from now on
        j = 0
        for i, mk in zip(idx.tolist(), makes.tolist(), strict=True):
            st, rs = states[i], rss[i]
            st.frames_in += 1
            ti = times[i]
            st.last_t = float(ti)
            st.last_seq = int(seqs[i])
            rs._prev = (ti, rows_x[i])
            if mk:
                rs._k += 1
                st.frames_out += 1
                made[i] = j
                j += 1
        scalar = {}
        if len(idx) < n:
            vectorised = set(idx.tolist())
            for i in range(n):
                if i not in vectorised:
                    scalar[i] = self.push(sessions[i], joints[i], times[i], seq=seqs[i])
        return PushedBatch(made, tkm, samples, lost, shape, scalar)

    @staticmethod
    def _model_frame(t: float, sample: np.ndarray, shape: tuple[int, ...]) -> ModelFrame:
        n = math.prod(shape)  # not np.prod: a Python call per frame per stream
        joints = sample[:n].reshape(shape)
        extra = sample[n:] if len(sample) > n else None
        return ModelFrame(t=t, joints=joints, extra=extra, lost=bool(np.isnan(joints).all()))

    def features(self, frames: Sequence[ModelFrame]) -> np.ndarray:
        """Model input (B, D_in) of a batch of model frames, in one vectorised call (the
        per-frame normalisation is a dozen numpy calls: per frame they would cost more
        than the encoder)."""
        if not frames:
            return np.empty((0, self.spec.input_dim), dtype=np.float32)
        joints = np.stack([f.joints for f in frames]) if self.spec.uses_joints else None
        extra = np.stack([f.extra for f in frames]) if self.spec.feature_dim else None
        return frame_features(joints, self.spec, extra).reshape(len(frames), -1)

    def features_of(self, joints: np.ndarray) -> np.ndarray:
        """:meth:`features` of model frames given as one array ``(B, J, C)`` of joints (a
        spec that reads joints and no per-frame features)."""
        if not len(joints):
            return np.empty((0, self.spec.input_dim), dtype=np.float32)
        return frame_features(joints, self.spec, None).reshape(len(joints), -1)

    def step_rows(self, sessions: Sequence[Hashable], x: np.ndarray) -> np.ndarray:
        """:meth:`step` for sessions and their model inputs given as one array ``x``."""
        if not len(sessions):
            return np.empty((0, self.backend.embed_dim), dtype=np.float32)
        slots = np.fromiter((self._streams[s].slot for s in sessions), np.int64, len(sessions))
        if len(np.unique(slots)) != len(slots):
            raise BackendError("a session appears twice in one step; step its frames in order")
        return self.backend.step(slots, np.array(x, dtype=np.float32))  # a copy, as step's

    def step(self, batch: Sequence[tuple[Hashable, np.ndarray]]) -> np.ndarray:
        """Encode one frame for each listed session in ONE backend call -> (B, d)."""
        if not batch:
            return np.empty((0, self.backend.embed_dim), dtype=np.float32)
        slots = np.fromiter((self.state(s).slot for s, _ in batch), np.int64, len(batch))
        if len(np.unique(slots)) != len(slots):
            raise BackendError("a session appears twice in one step; step its frames in order")
        frames = np.stack([np.asarray(f, dtype=np.float32) for _, f in batch])
        return self.backend.step(slots, frames)


def _pack(joints: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """Joints and optional features as one flat sample, so they are resampled together."""
    flat = joints.reshape(-1)
    if features is None:
        return flat
    return np.concatenate([flat, np.asarray(features, dtype=np.float32).reshape(-1)])

"""The aligner's two dynamic programs compiled with numba: one loop over the cells instead
of a dozen numpy passes (each a Python call, a temporary and a trip through memory).

Same arithmetic as the numpy code they replace (``relocaliser.relocalise``,
``tracker.Tracker.track``), operation for operation and in the same precision: every
``+`` and ``*`` rounds as the numpy ufunc did (no fast-math, so no fused multiply-add),
and a minimum is exact whatever the order. The answers are therefore bit for bit those of
the numpy path (tests/test_align.py checks both).

``load()`` compiles them, with the signatures below, when the first aligner is built
(numba's on-disk cache, ``cache=True``, makes that about a second instead of several), so
neither an import of ``masa_rt.align`` nor a live session's first frame pays for it.
Without numba, or with ``MASA_RT_NUMBA=0``, ``load()`` returns None and the aligner runs
its numpy code.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

# name -> numba signature (C-contiguous arrays: what the aligner passes).
SIGNATURES = {
    "relocalise_rows": "void(float32[::1], float32[::1], float32[::1], int8[::1], int64, "
                       "int64, float32, float32, float32)",
    "best_columns": "void(float32[:, ::1], int64[::1], int64[::1], int64[:, ::1])",
    "track_rows": "void(int64[::1], float64[:, ::1], int64[::1], int64[::1], float64[::1], "
                  "int64[::1], int64[::1], float32[:, ::1], float64[::1], int64, int64, "
                  "int64, float64)",
}
_loaded: SimpleNamespace | None = None


def load() -> SimpleNamespace | None:
    """The compiled functions (attributes named as below), or None without numba or with
    ``MASA_RT_NUMBA=0``. Compiled (or read from the cache) on the first call only."""
    global _loaded
    if os.environ.get("MASA_RT_NUMBA", "1") == "0":
        return None
    if _loaded is None:
        try:
            from numba import njit
        except ImportError:  # numba is optional: the numpy path computes the same numbers
            return None
        _loaded = SimpleNamespace(**{
            name: njit(sig, cache=True, nogil=True)(globals()[name])
            for name, sig in SIGNATURES.items()})
    return _loaded


# The functions, in plain Python (numba compiles them in load()).

def relocalise_rows(src, dst, cost, mode, cols, max_step, stay, lam, one_minus_lam):
    """One relocaliser step of B rows laid end to end (``src``, ``dst``, ``cost``:
    (B * cols,) float32): ``dst(j) = lam * min(src(j) + stay, src(j-1), ...,
    src(j-max_step)) + cost(j)``, each operation rounded to float32 as numpy's.
    ``mode`` (B,): 0 a normal frame, 1 a session's first (``cost / (1 - lam)``: as
    if it had lasted forever), 2 a lost frame (the row is kept). A row's leading pad
    columns (+inf) keep the shifted minima from reaching into the previous row."""
    for b in range(mode.size):
        first = b * cols
        for j in range(first, first + cols):
            if mode[b] == 2:
                dst[j] = src[j]
            elif mode[b] == 1:
                dst[j] = cost[j] / one_minus_lam
            else:
                v = src[j] + stay
                for k in range(1, min(max_step, j) + 1):
                    if src[j - k] < v or src[j - k] != src[j - k]:  # NaN wins
                        v = src[j - k]
                v = v * lam
                dst[j] = v + cost[j]


def best_columns(rows, starts, lengths, out):
    """``out[b, k]``: the column of the minimum of row ``b`` within reference ``k``'s
    columns ``starts[k] ..`` (the first on ties, as ``argmin``)."""
    for b in range(rows.shape[0]):
        for k in range(starts.size):
            best = starts[k]
            value = rows[b, best]
            for c in range(best + 1, best + lengths[k]):
                if value == value and not rows[b, c] >= value:  # the first NaN wins
                    value = rows[b, c]
                    best = c
            out[b, k] = best


def track_rows(ix, band, lo, pos, shown, offset, length, cost, penalty, back,
               ahead, max_step, smoothing):
    """One online-DTW step of the tracker rows ``ix`` (in place on ``band`` (B, W),
    ``lo``, ``pos``, ``shown``): the window moves to ``[pos - back, pos + ahead]``
    (clipped to the reference), each new cell ``c`` takes the best predecessor
    ``old(lo + c - k) + penalty`` for ``k = max_step .. -back`` (``penalty`` in that
    order; +inf outside the old window) plus this frame's cost, cells past the
    window's end are +inf, and the row is shifted so that its minimum is 0."""
    w = band.shape[1]
    row = np.empty(w)
    for i in ix:
        new_lo = max(pos[i] - back, 0)
        hi = min(pos[i] + ahead, length[i] - 1)
        for c in range(w):
            v = np.inf
            for j in range(penalty.size):
                u = new_lo + c - (max_step - j) - lo[i]  # old cell of k = max_step - j
                old = band[i, u] if 0 <= u < w else np.inf
                cand = old + penalty[j]
                if j == 0 or cand < v or cand != cand:  # np.minimum: NaN wins
                    v = cand
            row[c] = v + np.float64(cost[i, offset[i] + new_lo + c])
        for c in range(hi - new_lo + 1, w):
            row[c] = np.inf
        low, arg = row[0], 0
        for c in range(1, w):
            if low == low and not row[c] >= low:  # argmin: the first NaN wins
                low, arg = row[c], c
        for c in range(w):
            band[i, c] = row[c] - low
        lo[i] = new_lo
        pos[i] = new_lo + arg
        a = smoothing * shown[i]
        shown[i] = a + (1.0 - smoothing) * np.float64(pos[i])

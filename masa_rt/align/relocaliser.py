"""The relocaliser: a streaming subsequence DTW with exponential forgetting over every
reference at once (SPRING, Sakurai et al. 2007, with a time constant for a window).

``R'(j) = c(j) + lam * min(R(j) + stay, R(j-1), ..., R(j-max_step))``, ``lam = 1 -
1/relocalise_memory``: ``R(j) * (1 - lam)`` is the recent mean cost of the best path
that ends at reference frame ``j``. Its best column per reference tells the tracker where
to jump (``tracker.Tracker.gap``) and its best cost scores each activity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from masa_rt.align.sessions import Sessions

_NORMAL, _FRESH, _LOST = 0, 1, 2  # kernels.relocalise_rows's row modes


def relocalise(sessions: Sessions, sel: slice | np.ndarray, rows: np.ndarray,
               cost: np.ndarray, ok: np.ndarray, seen: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streaming subsequence DTW with forgetting over every reference at once.

    Returns the new rows (B, P), each reference's best end column (B, K) and the
    activity costs (B, K): EMA of each reference's best mean cost."""
    M, cfg = sessions.model, sessions.model.cfg
    b, full = len(rows), isinstance(sel, slice)
    # (B, P) rows before and after; after a full step the two buffers swap roles.
    src = sessions.reloc[sel] if full else np.take(sessions.reloc, rows, axis=0,
                                                   out=sessions.reloc_src[:b])
    dst = sessions.reloc_spare[:b]
    if M.kernels is not None:  # the same numbers in one compiled pass
        mode = np.where(ok, np.where(seen, _NORMAL, _FRESH), _LOST).astype(np.int8)
        M.kernels.relocalise_rows(src.reshape(-1), dst.reshape(-1), cost.reshape(-1), mode,
                                M.cols, cfg.max_step, np.float32(M.reloc_stay),
                                np.float32(M.lam), np.float32(1.0 - M.lam))
    else:
        _relocalise_numpy(sessions, src, dst, cost, ok, seen)
    if full:
        sessions.reloc, sessions.reloc_spare = sessions.reloc_spare, sessions.reloc
        new = sessions.reloc[sel]
    else:
        sessions.reloc[rows] = new = dst

    best = np.empty((b, M.n_refs), dtype=np.int64)  # (B, K) columns
    if M.kernels is not None:
        M.kernels.best_columns(new, M.offsets, M.lengths, best)
    else:
        for k, cols in enumerate(M.ref_cols):
            best[:, k] = new[:, cols].argmin(axis=1) + cols.start
    mean_best = np.take_along_axis(new, best, axis=1).astype(np.float64) * (1.0 - M.lam)
    a = 1.0 / cfg.activity_memory
    old = sessions.activity_cost[rows]  # (B, K)
    ema = np.where(np.isinf(old), mean_best, (1.0 - a) * old + a * mean_best)
    return new, best, np.where(ok[:, None], ema, old)


def _relocalise_numpy(sessions: Sessions, src: np.ndarray, dst: np.ndarray,
                      cost: np.ndarray, ok: np.ndarray, seen: np.ndarray) -> None:
    """``kernels.relocalise_rows`` in numpy passes (without numba): ``dst`` from ``src``."""
    M, b = sessions.model, len(src)
    # Work on the rows laid end to end, (B * P,): a row's leading pad separates it
    # from the previous row's tail as it separates references, and 1-d shifted
    # operands are several times faster than 2-d ones.
    s, d, m = src.reshape(-1), dst.reshape(-1), M.cfg.max_step
    np.add(s, M.reloc_stay, out=d)  # R(j) + stay
    if m == 1:
        np.minimum(d[1:], s[:-1], out=d[1:])
    else:
        # min(R(j-1), ..., R(j-m)) from pairs p(j) = min(R(j), R(j-1)): p(j-1),
        # p(j-3), ... and R(j-m) alone when m is odd.
        p = sessions.reloc_pairs[:b].reshape(-1)
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

"""The tracker: online time warping (Dixon 2005, "Live tracking of musical performances
using on-line time warping"; Arzt & Widmer's score followers) over a band of the active
reference.

It keeps an accumulated-cost row over ``[pos - back, pos + band]``:
``D'(i) = c(i) + min_k (D(i - k) + penalty(k))`` for ``k`` in ``-back .. max_step``,
shifted so that its minimum is 0; ``pos = argmin D'``. O(band) per frame; the accumulated
(undecayed) cost is what makes it steady under noise. It does not follow large jumps: the
relocaliser tells it where to ``jump``, and its band is then seeded from the
relocaliser's sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from masa_rt.align.sessions import Sessions


class Tracker:
    """The tracker's fields of a batch of sessions, and its three moves. Local frame
    indices throughout; ``offset`` (B,) turns them into columns."""

    def __init__(self, sessions: Sessions, rows: np.ndarray, active: np.ndarray,
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
        self.kernels = M.kernels  # compiled track step, or None: the numpy one below

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
        if self.kernels is not None:  # the same numbers in one compiled loop
            self.kernels.track_rows(ix, self.band, self.lo, self.pos, self.shown,
                                    self.offset, self.length, self.cost, self.penalty,
                                    cfg.back, cfg.band, cfg.max_step, cfg.smoothing)
            return
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

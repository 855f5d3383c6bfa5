"""Pause detection: the stream's embedding speed against its reference's.

A speed meter per session (a ring of the last ``2 pause_lag`` frames and the running
difference of its two halves) gives the distance between the mean of the recent
``pause_lag`` frames and the mean of the ``pause_lag`` before them, per second; the
reference's median speed is measured the same way (``window_speed``). Slower than
``pause_speed_ratio`` x the reference for ``pause_frames`` frames is ``paused``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from masa_rt.align.sessions import Sessions


def window_speed(embeddings: np.ndarray, fps: float, lag: int) -> float:
    """Median speed (per second) of a sequence, measured as the aligner measures a stream's
    (distance between the means of consecutive blocks of ``lag`` frames)."""
    lag = max(min(lag, len(embeddings) // 2), 1)
    csum = np.concatenate([np.zeros((1, embeddings.shape[1])), np.cumsum(embeddings, axis=0)])
    means = (csum[lag:] - csum[:-lag]) / lag  # mean of frames i .. i+lag-1
    steps = np.linalg.norm(means[lag:] - means[:-lag], axis=1)
    return float(np.median(steps)) * fps / lag


def pause(sessions: Sessions, sel: slice | np.ndarray, rows: np.ndarray, q: np.ndarray,
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
    M, cfg = sessions.model, sessions.model.cfg
    lag, size = cfg.pause_lag, 2 * cfg.pause_lag
    count = sessions.m_count[rows]
    t0 = np.where(count == 0, t, sessions.m_t0[rows])
    slot = count % size
    ring = sessions.m_ring.reshape(-1, M.dim)  # (capacity * 2lag, d)
    at = rows * size + slot  # (B,) ring row of the new frame (and of the leaving one)
    b = len(rows)
    new = sessions.m_new[:b]  # (B, d) each
    new[:] = q
    middle = np.take(ring, rows * size + (slot + lag) % size, axis=0,
                     out=sessions.m_middle[:b])
    leaving = np.take(ring, at, axis=0, out=sessions.m_leaving[:b])
    diff = sessions.m_diff[sel]  # (B, d): a view when sel is a slice
    diff += new
    diff -= middle
    diff -= middle
    diff += leaving
    ring[at] = new
    times = sessions.m_times[rows]  # (B, 2lag)
    times[np.arange(b), slot] = t - t0
    count = count + 1
    dt = (M.meter_weights[slot] * times).sum(axis=1)
    dt = np.where(dt > 0, dt, lag * M.frame_dt[active])  # times not increasing: the rate
    speed = np.sqrt(np.einsum("ij,ij->i", diff, diff)) / lag / dt
    slow = ok & (count >= size) & (speed < cfg.pause_speed_ratio * M.ref_speed[active])
    still = np.where(slow, sessions.still[rows] + 1, 0)  # a lost frame also ends a pause
    lost = np.flatnonzero(~ok)
    if lost.size:  # restart the meter: the speed across a gap is meaningless
        count[lost], t0[lost], diff[lost] = 0, 0.0, 0.0
        sessions.m_ring[rows[lost]] = 0.0
    if not isinstance(sel, slice):
        sessions.m_diff[sel] = diff
    sessions.m_count[sel], sessions.m_t0[sel], sessions.m_times[sel] = count, t0, times
    return still >= cfg.pause_frames, still

"""The activity choice among several references: every reference's relocaliser runs each
frame, the EMA of its best recent cost scores that activity, and the session switches to
another reference only when it is better by ``activity_margin`` for
``activity_patience`` frames in a row (hysteresis)."""

from __future__ import annotations

import numpy as np

from masa_rt.align.config import AlignerConfig


def choose_activity(cfg: AlignerConfig, activity_cost: np.ndarray, active: np.ndarray,
                    switch_streak: np.ndarray, ok: np.ndarray,
                    seen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the activity costs (B, K): the active reference (B,), the streak of frames
    another has been better, and which sessions switched this frame (their tracker is
    re-seeded)."""
    b, n_refs = activity_cost.shape
    switched = np.zeros(b, dtype=bool)
    if n_refs == 1:
        return active, switch_streak, switched
    every = np.arange(b)
    top = activity_cost.argmin(axis=1)
    active = np.where(ok & ~seen, top, active)  # first frame: just take the best
    better = (activity_cost[every, top]
              < activity_cost[every, active] - cfg.activity_margin)
    going = ok & seen
    switch_streak = np.where(going, np.where(better, switch_streak + 1, 0), switch_streak)
    switched = going & (switch_streak >= cfg.activity_patience)
    active = np.where(switched, top, active)
    switch_streak[switched] = 0
    return active, switch_streak, switched

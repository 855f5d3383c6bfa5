"""The state of every session of an aligner or bank, in rows of stacked arrays: one row per
session (its tracker band, relocaliser row, speed meter, decoder states, counters, last
estimate), plus scratch rows allocated once. Adding a session takes the next row;
removing one moves the last row into its place."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from masa_rt.align.compiled import CompiledReferences
from masa_rt.align.state import WAITING

# The relocaliser rows are the bulk of the work and memory, (B, P) per step: float32 halves
# both. Its values are recent sums of costs (< 2 * relocalise_memory), so float32 keeps
# ~1e-6 absolute, far below any margin. The tracker band rows stay float64.
RELOC_DTYPE = np.float32


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
    "reloc": (("P",), RELOC_DTYPE, math.inf),
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
    "last_state": ((), np.int8, WAITING),
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
    "reloc_spare": (("P",), RELOC_DTYPE),  # the relocaliser's new rows
    "reloc_src": (("P",), RELOC_DTYPE),  # its old rows, gathered (some sessions step)
    "reloc_pairs": (("P",), RELOC_DTYPE),  # min of neighbouring old cells
    "m_new": (("d",), np.float64),  # the speed meter's frames: arriving,
    "m_middle": (("d",), np.float64),  # moving from the recent to the older half,
    "m_leaving": (("d",), np.float64),  # leaving
    "dec_added": (("P",), np.float32),  # the phase decoders' cost term
    "dec_best": (("K",), np.int64),  # each reference's decoder: its best phase
    "dec_top": (("K",), np.float32),  # ... and that phase's log-probability
}


class Sessions:
    """The state of ``n`` sessions in rows ``0 .. n-1`` of arrays with spare capacity.

    Removing a session moves the last row into its slot (arrays stay compact), adding one
    takes row ``n`` (doubling the capacity when full).
    """

    def __init__(self, model: CompiledReferences, capacity: int = 1) -> None:
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


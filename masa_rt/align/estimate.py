"""What the aligner says each frame: one ``Estimate`` per session, or an ``EstimateBatch``
of (B,) arrays for a step of many, read from the sessions' stored fields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from masa_rt.align.state import STATES, WAITING

if TYPE_CHECKING:
    from masa_rt.align.compiled import CompiledReferences
    from masa_rt.align.sessions import Sessions


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



class EstimateBatch(Sequence[Estimate]):
    """The estimates of one step of many sessions, as (B,) arrays in the order of the
    sessions given. It is a sequence of :class:`Estimate` built on access; consumers that
    want arrays read the fields (``state`` holds indices into :data:`STATES`, ``ref``
    indices into the references)."""

    __slots__ = ("_model", "_list", "phase_id", "phase_progress", "progress", "ref_index",
                 "confidence", "state", "ref", "t")

    def __init__(self, model: CompiledReferences, *, phase_id: np.ndarray,
                 phase_progress: np.ndarray, progress: np.ndarray, ref_index: np.ndarray,
                 confidence: np.ndarray, state: np.ndarray, ref: np.ndarray,
                 t: np.ndarray) -> None:
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


def read_estimates(sessions: Sessions, rows: np.ndarray) -> EstimateBatch:
    """The latest estimates of sessions ``rows``, as arrays."""
    M = sessions.model
    active = sessions.active[rows]
    state = sessions.last_state[rows]
    n = M.lengths[active]
    x = np.clip(sessions.report[rows], 0.0, n - 1.0)
    col = M.offsets[active] + np.rint(x).astype(np.int64)
    s, e = M.run_start[col], M.run_end[col]
    phase_progress = np.clip((x - s) / np.maximum(e - s, 1), 0.0, 1.0)
    waiting = state == WAITING
    return EstimateBatch(
        M, phase_id=np.where(waiting, -1, M.phases[col]),
        phase_progress=np.where(waiting, 0.0, phase_progress),
        progress=np.where(waiting, 0.0, x / (n - 1)), ref_index=np.where(waiting, 0.0, x),
        confidence=sessions.last_conf[rows], state=state, ref=active, t=sessions.last_t[rows])

"""Each activity's phases on its progress axis, learnt from the estimates themselves.

The dashboard draws a progress bar split into the reference's phases, but the protocol
carries no phase table, and the gateway reads the wire only. It does not need one: within
a phase run the server reports ``progress = start + phase_progress * (end - start)``
(``masa_rt.align``: both are linear in the reference frame), so two estimates of a phase
with different ``phase_progress`` give its ``start`` and ``end`` exactly. A phase shows up
in the bar once a session has been seen in it twice; estimates at the clipped ends
(``phase_progress`` 0 or 1) are left out of the fit, since the line does not hold there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Phase:
    name: str
    low: tuple[float, float] | None = None  # (phase_progress, progress), smallest pp seen
    high: tuple[float, float] | None = None  # largest pp seen

    def add(self, pp: float, progress: float) -> None:
        if self.low is None or pp < self.low[0]:
            self.low = (pp, progress)
        if self.high is None or pp > self.high[0]:
            self.high = (pp, progress)

    def extent(self) -> tuple[float, float] | None:
        """(start, end) on the progress axis, or None until two points are apart."""
        if self.low is None or self.high is None or self.high[0] - self.low[0] < 1e-3:
            return None
        (p0, y0), (p1, y1) = self.low, self.high
        length = (y1 - y0) / (p1 - p0)
        start = y0 - p0 * length
        return max(0.0, start), min(1.0, start + length)


class PhaseMap:
    """``observe(estimate fields)`` per estimate; ``segments(activity)`` for the bar."""

    def __init__(self) -> None:
        self._phases: dict[str, dict[int, _Phase]] = {}

    def observe(self, activity: str | None, phase_id: int, name: str | None,
                phase_progress: float, progress: float) -> None:
        if activity is None or phase_id < 0 or not 0.0 < phase_progress < 1.0:
            return
        if not math.isfinite(progress):
            return
        phases = self._phases.setdefault(activity, {})
        phase = phases.setdefault(phase_id, _Phase(name or str(phase_id)))
        phase.add(phase_progress, progress)

    def segments(self, activity: str) -> list[dict]:
        """[{id, name, start, end}] sorted by start: the phases located so far."""
        found = []
        for pid, phase in self._phases.get(activity, {}).items():
            extent = phase.extent()
            if extent is not None:
                found.append({"id": pid, "name": phase.name, "start": extent[0],
                              "end": extent[1]})
        return sorted(found, key=lambda s: s["start"])

    def activities(self) -> list[str]:
        return sorted(self._phases)

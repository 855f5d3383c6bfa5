"""Client clock and clock-offset estimation (in the manner of LSL's ``time_correction``).

Capture stamps are taken with :func:`local_clock` (the monotonic high-resolution clock;
CLOCK_MONOTONIC on Linux, the same clock C++ ``std::chrono::steady_clock`` reads), so
latency (estimate received - frame captured) is measured in one clock on one machine.

To relate the server's clock, the client sends ``ping`` {client_time=t0}; the server answers
``pong`` {client_time=t0, server_time=ts}; the client notes its receive time t1. Assuming the
two legs take equally long, the server read its clock at client time (t0 + t1) / 2, so

    offset = ts - (t0 + t1) / 2          (server_time ~= client_time + offset)

with an error of at most half the round trip t1 - t0. Like LSL we keep the last N probes
and trust the one with the smallest round trip: queueing delay only ever adds to the round
trip, so the fastest probe is the least disturbed one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

local_clock = time.perf_counter


@dataclass(frozen=True, slots=True)
class ClockProbe:
    """One ping/pong exchange: client send and receive times, server time (seconds)."""

    t_send: float
    server_time: float
    t_recv: float

    @property
    def rtt(self) -> float:
        return self.t_recv - self.t_send

    @property
    def offset(self) -> float:
        return self.server_time - (self.t_send + self.t_recv) / 2.0


class ClockOffset:
    """Server-minus-client clock offset from the best of the last ``window`` probes."""

    def __init__(self, window: int = 32) -> None:
        self._probes: deque[ClockProbe] = deque(maxlen=window)

    def add(self, t_send: float, server_time: float, t_recv: float) -> None:
        """Record one exchange; a negative round trip (clock misuse) is ignored."""
        probe = ClockProbe(t_send, server_time, t_recv)
        if probe.rtt >= 0.0:
            self._probes.append(probe)

    def __len__(self) -> int:
        return len(self._probes)

    def best(self) -> ClockProbe | None:
        return min(self._probes, key=lambda p: p.rtt, default=None)

    @property
    def offset(self) -> float | None:
        """Seconds to add to a client time to get server time; None before any probe."""
        best = self.best()
        return None if best is None else best.offset

    @property
    def uncertainty(self) -> float | None:
        """Half the best round trip: the bound on the offset's error."""
        best = self.best()
        return None if best is None else best.rtt / 2.0

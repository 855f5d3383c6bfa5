"""The dashboard's state: the latest estimate of every live session, the phases located so
far, and the server's and gateway's counters; ``snapshot()`` is what the page draws.

Pure state, fed by :mod:`clients.web.feeds`, so it is tested without sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack

from clients.web.phases import PhaseMap

# Fields of an estimate the page shows, as the server sent them.
_SHOWN = ("session", "seq", "activity", "phase_id", "phase_name", "phase_progress",
          "progress", "confidence", "state")


class Board:
    def __init__(self, forget_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.forget_s, self._clock = forget_s, clock
        self.phases = PhaseMap()
        self.server_stats: dict | None = None  # the last stats_reply (counters, latency)
        self.server_note = "waiting for the server's first stats reply"
        self._latest: dict[str, dict] = {}
        self._seen: dict[str, float] = {}

    def update(self, est: dict) -> None:
        """A decoded, validated ``estimate`` message."""
        row = {k: est[k] for k in _SHOWN}
        # Receive -> send in the server clock: needs no clock offset (as `masa-rt watch`).
        row["server_ms"] = (est["t_server_send"] - est["t_server_recv"]) * 1e3
        self._latest[est["session"]] = row
        self._seen[est["session"]] = self._clock()
        self.phases.observe(est["activity"], est["phase_id"], est["phase_name"],
                            est["phase_progress"], est["progress"])

    def snapshot(self, gateway_counters: dict[str, int]) -> dict:
        now = self._clock()
        for session in [s for s, t in self._seen.items() if now - t > self.forget_s]:
            del self._seen[session], self._latest[session]
        sessions = [dict(self._latest[s], age_s=now - self._seen[s]) for s in sorted(self._latest)]
        activities = sorted({r["activity"] for r in sessions if r["activity"]}
                            | set(self.phases.activities()))
        return {"v": 1, "type": "dashboard", "sessions": sessions,
                "phases": {a: self.phases.segments(a) for a in activities},
                "server": self.server_stats, "server_note": self.server_note,
                "gateway": gateway_counters}

    def encoded(self, gateway_counters: dict[str, int]) -> bytes:
        return msgpack.packb(self.snapshot(gateway_counters), use_bin_type=True)

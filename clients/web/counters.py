"""The gateway's own counters: every refusal and drop by reason, as the server counts."""

from __future__ import annotations

from collections import Counter


class GatewayCounters:
    """``count("rejected.session_owner")``; ``snapshot()`` for the dashboard and stats."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def count(self, key: str, n: int = 1) -> None:
        self._c[key] += n

    def __getitem__(self, key: str) -> int:
        return self._c[key]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))

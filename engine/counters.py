"""Server counters and a latency histogram: what the engine did, by reason, in O(1) memory.

Every message the server receives ends in exactly one bucket: accepted (``frames_in`` and
later ``estimates_out`` or ``dropped[reason]``) or ``rejected[reason]``. That invariant is
what lets a load test say "zero frames unaccounted". Latency is kept as a histogram with
log-spaced buckets rather than a list of samples, so a server that runs for days has
constant memory and percentiles are still available on request (``stats`` message).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Counters", "LatencyHistogram", "LogLimiter", "RejectionSummary", "format_table"]


class LatencyHistogram:
    """Latencies in microseconds, log-spaced buckets (``per_decade`` per factor of 10).

    With 20 buckets per decade a bucket spans a factor of 10**(1/20) ~ 1.12, so a
    percentile read from the histogram is within 12 % of the exact sample percentile,
    plenty for p99 monitoring. Values below ``low_us`` land in the first bucket, values
    above ``high_us`` in the last; the exact minimum and maximum are kept on the side.
    """

    def __init__(self, low_us: float = 1.0, high_us: float = 1e7, per_decade: int = 20) -> None:
        if not 0 < low_us < high_us or per_decade < 1:
            raise ValueError(f"histogram: need 0 < low_us < high_us and per_decade >= 1, "
                             f"found {low_us}, {high_us}, {per_decade}")
        self.low_us, self.per_decade = float(low_us), int(per_decade)
        self._log_low = math.log10(low_us)
        n = math.ceil((math.log10(high_us) - self._log_low) * per_decade)
        self.edges = low_us * 10.0 ** (np.arange(n + 1) / per_decade)  # (n + 1,) upper edges
        self.counts = np.zeros(n + 1, dtype=np.int64)  # bucket i: (edges[i-1], edges[i]]
        self.count = 0
        self.total_us = 0.0
        self.min_us = math.inf
        self.max_us = 0.0

    def record(self, us: float) -> None:
        """Add one latency sample (microseconds); negative or NaN clock noise counts as 0."""
        us = us if us > 0.0 else 0.0  # also maps NaN to 0
        i = 0 if us <= self.low_us else math.ceil((math.log10(us) - self._log_low)
                                                   * self.per_decade - 1e-9)
        self.counts[min(i, len(self.counts) - 1)] += 1
        self.count += 1
        self.total_us += us
        self.min_us = min(self.min_us, us)
        self.max_us = max(self.max_us, us)

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram with the same buckets (per-thread or per-run totals)."""
        if len(other.counts) != len(self.counts) or other.low_us != self.low_us:
            raise ValueError("histogram: cannot merge histograms with different buckets")
        self.counts += other.counts
        self.count += other.count
        self.total_us += other.total_us
        self.min_us = min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, q: float) -> float:
        """Upper edge of the bucket holding the ``q``-th percentile (``q`` in [0, 100]).

        The upper edge, not the middle: a reported p99 is never optimistic. Clamped to the
        exact maximum so a single-bucket histogram reports the real value.
        """
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(self.count * q / 100.0))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        return float(min(self.edges[i], self.max_us))

    def summary(self) -> dict[str, float]:
        """count, mean, min, p50, p90, p99, p99.9, max in microseconds (NaN when empty)."""
        empty = self.count == 0
        return {
            "count": self.count,
            "mean_us": math.nan if empty else self.total_us / self.count,
            "min_us": math.nan if empty else self.min_us,
            "p50_us": self.percentile(50), "p90_us": self.percentile(90),
            "p99_us": self.percentile(99), "p99.9_us": self.percentile(99.9),
            "max_us": math.nan if empty else self.max_us,
        }

    def to_wire(self) -> dict:
        """Summary plus the non-empty buckets ``[upper_edge_us, count]``, for ``stats``.

        NaN would be rejected by the protocol (non_finite), so an empty histogram sends
        ``None`` for its statistics.
        """
        out: dict = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in self.summary().items()}
        nz = np.flatnonzero(self.counts)
        out["buckets"] = [[float(self.edges[i]), int(self.counts[i])] for i in nz]
        return out


@dataclass
class Counters:
    """Totals of one server (or one session): frames, estimates, rejections, drops."""

    frames_in: int = 0
    estimates_out: int = 0
    sessions_opened: int = 0
    sessions_resumed: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0
    messages_in: int = 0
    frames_lost: int = 0  # seq gaps: frames the client numbered but that never arrived
    # Seq gaps wider than ServerConfig.max_seq_gap: a client that renumbered (or a hostile
    # seq), counted once each instead of as billions of lost frames.
    seq_jumps: int = 0
    published: int = 0
    loop_errors: int = 0  # server bugs caught by the loop's last line of defence
    # Of rejected['overloaded']: frames that arrived already older than the server's
    # max_queue_delay_s (they waited in libzmq's or the OS's queues), refused unread.
    queued_too_long: int = 0
    # Rejections whose error reply could not be sent (the peer's pipe full or the peer
    # gone): counted in rejected all the same, but the peer never heard why.
    replies_unsent: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def flat(self) -> dict[str, int]:
        """One level of ``name -> count`` (``rejected.<reason>``), the ``stats`` wire form."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        out["rejected"] = sum(self.rejected.values())
        out["dropped"] = sum(self.dropped.values())
        out.update({f"rejected.{k}": v for k, v in sorted(self.rejected.items())})
        out.update({f"dropped.{k}": v for k, v in sorted(self.dropped.items())})
        return out


def format_table(counters: dict[str, int], latency: dict[str, float] | None = None) -> str:
    """A two-column text table of flat counters and latency percentiles (exit report)."""
    rows = [(k, str(v)) for k, v in counters.items()]
    if latency:
        for k in ("count", "p50_us", "p99_us", "p99.9_us", "max_us"):
            v = latency.get(k)
            shown = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (
                f"{v:.0f}" if k == "count" else f"{v:.1f}")
            rows.append((f"latency.{k}", shown))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


class LogLimiter:
    """At most ``burst`` lines per event per ``period_s``; the rest are counted and the
    count is logged when the event's next window opens.

    A peer repeating one message (a hello flood, a key that is not the session's owner)
    must not flood the server's log, and nothing may vanish from it either. Events are
    names fixed in the code, so the map stays small."""

    def __init__(self, logger: logging.Logger, burst: int = 20, period_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.burst, self.period_s, self.clock = logger, burst, period_s, clock
        self._windows: dict[str, list] = {}  # event -> [window start, lines, suppressed]

    def log(self, level: int, event: str, fmt: str, *args: object) -> None:
        """Log ``fmt % args`` unless ``event`` already used its lines in this window."""
        now = self.clock()
        window = self._windows.get(event)
        if window is None or now - window[0] >= self.period_s:
            if window is not None and window[2]:
                self.logger.log(level, "event=%s suppressed=%d over=%.0fs", event, window[2],
                                now - window[0])
            window = self._windows[event] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            self.logger.log(level, fmt, *args)
        else:
            window[2] += 1


class RejectionSummary:
    """One INFO line per ``period_s`` with the rejections by reason since the last line.

    Each rejection is logged at DEBUG (a hostile peer can cause thousands a second); this
    keeps them visible at the default level without one line each."""

    def __init__(self, logger: logging.Logger, period_s: float, now: float) -> None:
        self.logger, self.period_s = logger, period_s
        self._since, self._seen = now, Counter()

    def maybe_log(self, rejected: Counter[str], now: float) -> None:
        if now - self._since < self.period_s:
            return
        new = {k: v - self._seen[k] for k, v in sorted(rejected.items()) if v > self._seen[k]}
        if new:
            self.logger.info("event=rejected_summary over=%.0fs total=%d %s", now - self._since,
                             sum(new.values()), " ".join(f"{k}={v}" for k, v in new.items()))
        self._since, self._seen = now, Counter(rejected)

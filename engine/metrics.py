"""``masa-rt serve --metrics HOST:PORT``: the server's counters for Prometheus.

The server's ``stats`` (docs/serving.md, "Counters") are what an operator watches; a room
of headsets is watched by a monitoring system, which scrapes HTTP. This exposes the same
numbers at ``http://HOST:PORT/metrics`` in Prometheus' text format (prometheus_client's
own HTTP server, a daemon thread):

* every counter as ``masa_rt_<name>_total`` (``rejected.malformed`` ->
  ``masa_rt_rejected_malformed_total``), the live-state numbers as gauges;
* the receive -> send latency as the histogram ``masa_rt_latency_seconds``, with buckets
  at the half-decades of the server's own histogram (10 us .. 10 s), whose edges they are:
  the cumulative counts are exact, not interpolated.

The server loop publishes a snapshot at each sweep (``ServerConfig.sweep_s``, 0.25 s); a
scrape reads the latest snapshot and never touches the loop's state, so a scrape cannot
race it. Only whole-server totals are exposed: no session ids, keys or poses (one tenant
learns nothing of another from it), but it is plain HTTP with no authentication, so the
default is not to serve it and a loopback address is the one to give.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["GAUGES", "LATENCY_BUCKETS_S", "MetricsEndpoint", "parse_address"]

# Counters that are a state, not a running total.
GAUGES = frozenset({"sessions_active", "workers.connected", "workers.registered"})
# Half-decades, 10 us .. 10 s: edges of the server's histogram (20 per decade from 1 us).
LATENCY_BUCKETS_S = tuple(10.0 ** (k / 2) * 1e-6 for k in range(2, 15))
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` means 127.0.0.1; port 0: any free one) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics {text}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "127.0.0.1", int(port)


def metric_name(counter: str) -> str:
    return "masa_rt_" + _NAME.sub("_", counter)


class _Collector:
    """prometheus_client collector over the latest published snapshot."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self._endpoint = endpoint

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = self._endpoint.snapshot()
        if stats is None:  # not published yet: nothing rather than zeros
            return
        for name, value in sorted(stats["counters"].items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            help_text = f"masa-rt server stats counter '{name}' (docs/serving.md)"
            if name in GAUGES:
                yield GaugeMetricFamily(metric_name(name), help_text, value=value)
            else:
                yield CounterMetricFamily(metric_name(name), help_text, value=value)
        latency = stats.get("latency")
        if latency and latency.get("count"):
            yield HistogramMetricFamily(
                "masa_rt_latency_seconds", "server receive -> estimate sent",
                buckets=histogram_buckets(latency),
                sum_value=latency["mean_us"] * latency["count"] * 1e-6)


def histogram_buckets(latency: dict) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of a ``stats`` latency histogram (its non-empty
    ``[upper_edge_us, count]`` buckets), at :data:`LATENCY_BUCKETS_S` and ``+Inf``."""
    pairs = latency["buckets"]
    out = []
    for le in LATENCY_BUCKETS_S:
        edge_us = le * 1e6 * (1 + 1e-9)  # the edges are these values, rounded
        out.append((f"{le:.6g}", float(sum(c for e, c in pairs if e <= edge_us))))
    out.append(("+Inf", float(latency["count"])))
    return out


class MetricsEndpoint:
    """The HTTP endpoint and the snapshot it serves; :meth:`publish` from the server loop."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._lock = threading.Lock()
        self._stats: dict | None = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        try:
            self._http, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise OSError(f"--metrics {host}:{port}: cannot listen there ({exc.strerror})"
                          ) from None
        self.port = self._http.server_port  # the one bound (port 0: any free one)

    def publish(self, stats: dict) -> None:
        with self._lock:
            self._stats = stats

    def snapshot(self) -> dict | None:
        with self._lock:
            return self._stats

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)

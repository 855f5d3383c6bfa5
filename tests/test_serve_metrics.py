"""``serve --metrics``: the server's stats for Prometheus (engine/metrics.py), scraped over
real HTTP from a real server answering a real client."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from clients import PoseOutlet
from engine.metrics import LATENCY_BUCKETS_S, MetricsEndpoint, histogram_buckets, parse_address
from engine.server import Server, ServerConfig

prometheus_parser = pytest.importorskip("prometheus_client.parser")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demos" / "pour_milk.npz"


def scrape(port: int) -> dict[str, dict]:
    """name -> {sample name + labels: value} of http://127.0.0.1:PORT/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, dict] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out.setdefault(family.name, {})[key] = s.value
    return out


def test_parse_address():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("9464", "host:", "host:port", "h:70000"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_address(bad)


def test_buckets_are_cumulative_at_the_histograms_own_edges():
    # the server's buckets: 20 per decade from 1 us, upper edges 10 ** (k / 20)
    latency = {"count": 6, "buckets": [[10 ** (39 / 20), 2], [10 ** (40 / 20), 1],
                                       [10 ** (41 / 20), 3]]}
    got = dict(histogram_buckets(latency))
    assert got["0.0001"] == 3.0  # <= 100 us: the first two buckets, edge included
    assert got["0.000316228"] == 6.0 and got["+Inf"] == 6.0
    assert got["1e-05"] == 0.0
    assert len(got) == len(LATENCY_BUCKETS_S) + 1


def test_a_scrape_shows_what_the_server_counted(tiny_model):
    from engine.pipeline import Pipeline

    with np.load(EXAMPLE) as f:
        joints = f["joints"]
    endpoint = MetricsEndpoint("127.0.0.1", 0)
    try:
        pipeline = Pipeline.from_files(tiny_model[0], [tiny_model[1]], capacity=4)
        server = Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                               pub_bind="tcp://127.0.0.1:0"),
                        metrics=endpoint).start_in_thread()
        try:
            with PoseOutlet(server.address, session="m1", fps=30.0) as out:
                for k in range(30):
                    out.push(joints[k])
                    assert out.pull(timeout=2.0) is not None
                hostile = zmq.Context.instance().socket(zmq.DEALER)
                hostile.connect(server.address)
                hostile.send(b"\x00 not msgpack")  # refused, counted
                time.sleep(0.6)  # two sweeps: the snapshot is published
                m = scrape(endpoint.port)
                stats = server.stats()["counters"]
                hostile.close(linger=0)
                out.push(joints[30])  # after the scrape: only the final snapshot has it
                assert out.pull(timeout=2.0) is not None
        finally:
            final = server.stop()["counters"]
        assert m["masa_rt_frames_in"]["masa_rt_frames_in_total"] == stats["frames_in"] == 30
        assert m["masa_rt_estimates_out"]["masa_rt_estimates_out_total"] == 30
        assert m["masa_rt_sessions_active"]["masa_rt_sessions_active"] == 1  # a gauge
        refused = {k: v for k, v in stats.items() if k.startswith("rejected.") and v}
        assert refused and all(
            m[f"masa_rt_{k.replace('.', '_')}"][f"masa_rt_{k.replace('.', '_')}_total"] == v
            for k, v in refused.items())
        hist = m["masa_rt_latency_seconds"]
        assert hist["masa_rt_latency_seconds_count"] == 30
        counts = [v for k, v in hist.items() if k.startswith("masa_rt_latency_seconds_bucket")]
        assert counts == sorted(counts) and max(counts) == 30  # cumulative, up to +Inf
        assert 0 < hist["masa_rt_latency_seconds_sum"] < 30 * 2.0
        # after the server stopped: its final counters, still served
        last = scrape(endpoint.port)
        assert last["masa_rt_frames_in"]["masa_rt_frames_in_total"] == final["frames_in"] == 31
    finally:
        endpoint.close()


def test_a_port_in_use_is_one_line(tmp_path):
    first = MetricsEndpoint("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"--metrics 127.0.0.1:{first.port}: cannot listen"):
            MetricsEndpoint("127.0.0.1", first.port)
    finally:
        first.close()


def test_masa_rt_serve_metrics_flag():
    """``masa-rt serve --metrics``: the shipped model and reference in their own process,
    scraped while a headset streams."""
    import socket

    from serve_process import serving

    with socket.socket() as s:  # a free port (released just before serve takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with np.load(EXAMPLE) as f:
        joints = f["joints"]
    reference = Path(__file__).resolve().parents[1] / "examples" / "pour_milk.npz"
    with serving("--reference", str(reference), "--metrics", f"127.0.0.1:{port}") as address:
        with PoseOutlet(address, session="m2", fps=30.0) as out:
            for k in range(5):
                out.push(joints[k])
                assert out.pull(timeout=10.0) is not None
            time.sleep(0.6)
            m = scrape(port)
    assert m["masa_rt_frames_in"]["masa_rt_frames_in_total"] == 5
    assert m["masa_rt_sessions_active"]["masa_rt_sessions_active"] == 1

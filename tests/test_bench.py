"""engine.bench: a tiny run (fake engine, 1 stream, few iterations) writes the full JSON."""

from __future__ import annotations

import json
import re

import pytest
from fake_pipeline import FakePipeline

from engine.bench import BenchConfig, percentiles_us, run_bench

EXAMPLE = "examples/demos/pour_milk.npz"


def test_percentiles_in_microseconds():
    p = percentiles_us([0.001] * 99 + [0.002])
    assert p["p50_us"] == pytest.approx(1000.0) and p["max_us"] == pytest.approx(2000.0)


def test_tiny_bench_writes_json_and_plot(tmp_path, capsys):
    cfg = BenchConfig(streams=(1, 2), iters=5, warmup=1, recording=EXAMPLE, e2e_clients=1,
                      rate_hz=90.0, seconds=0.3, zmq_round_trips=20, casa=True, casa_frames=3,
                      out=str(tmp_path / "bench.json"), plot=str(tmp_path / "bench.png"))
    assert run_bench(cfg, factory=lambda backend, capacity: FakePipeline()) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert set(r) >= {"machine", "config", "engine", "e2e", "floors", "verdict"}
    assert {"platform", "processor", "cpu_count", "onnxruntime", "blas_threads"} <= set(
        r["machine"])
    for when in ("load_average_start", "load_average_end"):  # Linux has them
        assert len(r["machine"][when]) == 3 and min(r["machine"][when]) >= 0
    rows = r["engine"]["onnxruntime"]
    assert [e["streams"] for e in rows] == [1, 2]
    for e in rows:
        assert e["iters"] == 5 and 0 < e["p50_us"] <= e["p99_us"] <= e["p99.9_us"]
        assert e["frames_per_s"] > 0
    e2e = r["e2e"]
    assert e2e["sent"] > 0 and e2e["answered"] + e2e["unanswered"] >= e2e["sent"] - sum(
        e2e["rejected"].values())
    assert e2e["server"]["counters"]["frames_in"] == e2e["answered"]
    assert r["floors"]["zmq_round_trip"]["round_trips"] == 20
    assert r["floors"]["casa"]["frames_per_s"] > 0
    assert r["verdict"]["speedup_vs_casa_1_stream"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "zmq round trip floor" in out
    assert re.search(r"load average \d+\.\d\d -> \d+\.\d\d \(start -> end\)", out)
    last = out.strip().splitlines()[-1]  # the headline: one line, the run's own numbers
    served = r["verdict"]["streams_at_90hz_p99_5ms"]
    assert served in (0, 1, 2) and last.startswith(f"headline: {served} streams at 90 Hz")
    assert "(of 1, 2 measured)" in last and "x the CASA-style baseline" in last


def test_headline_counts_only_streams_served_within_the_budget():
    from engine.bench import headline, verdict

    def row(n, p99, fps):
        return {"streams": n, "p99_us": p99, "frames_per_s": fps}

    r = {"engine": {"onnxruntime": [row(1, 200, 5000), row(64, 4000, 9000),
                                    row(256, 9000, 30000)]},
         "floors": {"zmq_round_trip": {"p99_us": 300}}}
    v = verdict(r)  # 64 streams: p99 4 ms, 9000 frames/s >= 64 x 90; 256: p99 over 5 ms
    assert v["streams_at_90hz_p99_5ms"] == 64 and v["e2e_p99_minus_zmq_p99_us"] is None
    assert headline(r).startswith("headline: 64 streams at 90 Hz")

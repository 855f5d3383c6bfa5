"""Load test: N simulated headsets at R Hz for T seconds against `masa-rt serve` on loopback.

    python benchmarks/load_test.py                       # the full run: 64 x 90 Hz x 300 s
    python benchmarks/load_test.py --clients 16 --duration 45 --plot load.png --json load.json

The server runs in its own process (``python -m masa_rt.cli serve``, the shipped model when
present, else a random model of its size; see ``benchmarks/fuzz_server.py``), and the
headsets in ``--procs`` load-generator processes (``clients.replay``: absolute schedule,
one zmq poller per process), so neither shares a GIL with the other.

Reported:

* **accounting**: every frame sent is answered, rejected by the server (with a reason), or
  dropped by the server (with a reason, from its ``stats``): ``unaccounted`` must be 0.
  Frames a client could not send (link down, queue full) are counted on the client;
* **latency over time**: capture -> estimate received, p50/p99 per ``--window`` seconds;
* **server memory**: RSS from ``/proc/PID/status`` every second (it must not grow).

Exit 1 if a frame is unaccounted for or the server died.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_server import DEMO, ServerProcess, prepare_model, rss_kib  # noqa: E402

from engine.counters import LatencyHistogram  # noqa: E402


def generator(address: str, index: int, clients: int, rate: float, duration: float,
              t0: float, window: float, out: mp.Queue) -> None:
    """One load-generator process: ``clients`` replay headsets; per-window histograms."""
    from clients.replay import replay

    windows: dict[int, LatencyHistogram] = {}

    def on_estimate(_i: int, est) -> None:
        w = int((est.t_received - t0) // window)
        windows.setdefault(w, LatencyHistogram()).record(est.latency * 1e6)

    while time.perf_counter() < t0:  # all processes start on the same clock tick
        time.sleep(0.001)
    report = replay(DEMO, address, rate_hz=rate, clients=clients, loop=True,
                    duration=duration, on_estimate=on_estimate, reference="pour_milk",
                    session_prefix=f"load{index}", drain_s=30.0, open_timeout=30.0)
    out.put({"index": index, "report": report.to_dict(),
             "windows": {w: (h.counts.tolist(), h.count, h.total_us, h.min_us, h.max_us)
                         for w, h in windows.items()}})


def merge_windows(results: list[dict]) -> dict[int, LatencyHistogram]:
    merged: dict[int, LatencyHistogram] = {}
    for r in results:
        for w, (counts, count, total, lo, hi) in r["windows"].items():
            h = LatencyHistogram()
            h.counts[:] = counts
            h.count, h.total_us, h.min_us, h.max_us = count, total, lo, hi
            merged.setdefault(int(w), LatencyHistogram()).merge(h)
    return dict(sorted(merged.items()))


def plot(path: Path, windows: dict, window: float, rss: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [(w + 0.5) * window for w in windows]
    for q, style in ((50, "-o"), (99, "-s"), (99.9, ":^")):
        a.plot(t, [windows[w].percentile(q) / 1e3 for w in windows], style, label=f"p{q:g}")
    a.set_ylabel("capture -> estimate (ms)")
    a.set_yscale("log")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    a.set_title(title)
    if rss:
        b.plot([x for x, _ in rss], [y / 1024 for _, y in rss], "-")
    b.set_ylabel("server RSS (MiB)")
    b.set_xlabel("time since start (s)")
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=90.0, help="Hz per headset")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of streaming")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--window", type=float, default=10.0, help="s per latency window")
    ap.add_argument("--plot", type=Path, default=Path("load_test.png"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=None,
                    help="serve --workers N (default: serve's own, the cores available)")
    args = ap.parse_args(argv)

    onnx, ref, model = prepare_model()
    server = ServerProcess(onnx, ref, *(["--workers", str(args.workers)]
                                        if args.workers is not None else []))
    print(f"server pid {server.pid} at {server.address} ({model}); {args.clients} headsets "
          f"x {args.rate:g} Hz x {args.duration:g} s in {args.procs} processes", flush=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    per = [args.clients // args.procs + (i < args.clients % args.procs)
           for i in range(args.procs)]
    t0 = time.perf_counter() + 3.0 + 0.2 * args.clients  # time to spawn and open sessions
    procs = [ctx.Process(target=generator, args=(server.address, i, n, args.rate,
                                                 args.duration, t0, args.window, queue))
             for i, n in enumerate(per) if n]
    for p in procs:
        p.start()
    rss, results, next_sample = [], [], time.perf_counter()
    while len(results) < len(procs):
        now = time.perf_counter()
        if now >= next_sample:
            rss.append((round(now - t0, 2), rss_kib(server.pid)))
            next_sample += 1.0
        try:
            results.append(queue.get(timeout=0.2))
        except Exception:  # noqa: BLE001 - queue.Empty: keep sampling
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(10)
    alive = server.alive()
    counters = server.stats()["counters"]
    server_report = server.stop()

    sent = sum(r["report"]["sent"] for r in results)
    answered = sum(r["report"]["answered"] for r in results)
    rejected = sum((Counter(r["report"]["rejected"]) for r in results), Counter())
    client_dropped = sum((Counter(r["report"]["dropped"]) for r in results), Counter())
    server_dropped = {k.split(".", 1)[1]: v for k, v in counters.items()
                      if k.startswith("dropped.")}
    server_rejected = {k.split(".", 1)[1]: v for k, v in counters.items()
                       if k.startswith("rejected.")}
    unaccounted = sent - answered - rejected.total() - sum(server_dropped.values())
    windows = merge_windows(results)
    steady = [rss_v for t, rss_v in rss if t >= min(30.0, args.duration / 3)]
    out = {
        "model": model, "clients": args.clients, "rate_hz": args.rate,
        "duration_s": args.duration, "procs": len(procs), "server_alive": alive,
        "workers": args.workers,
        "frames_sent": sent, "answered": answered, "rejected": dict(rejected),
        "dropped_by_server": server_dropped, "not_sent_by_clients": dict(client_dropped),
        "unaccounted": unaccounted,
        "server": {k: counters[k] for k in ("frames_in", "estimates_out", "rejected",
                                            "dropped", "loop_errors", "sessions_opened")},
        "server_rejected": server_rejected,
        "latency_ms_per_window": {
            f"{w * args.window:g}-{(w + 1) * args.window:g}s": {
                "n": h.count, "p50": round(h.percentile(50) / 1e3, 2),
                "p99": round(h.percentile(99) / 1e3, 2),
                "p99.9": round(h.percentile(99.9) / 1e3, 2)} for w, h in windows.items()},
        "server_rss_mib": {"start": round(rss[0][1] / 1024, 1) if rss else None,
                           "steady_min": round(min(steady) / 1024, 1) if steady else None,
                           "steady_max": round(max(steady) / 1024, 1) if steady else None,
                           "end": round(rss[-1][1] / 1024, 1) if rss else None},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(out, indent=2))
    print("server exit report:\n" + server_report)
    title = (f"{args.clients} headsets x {args.rate:g} Hz, {args.duration:g} s, "
             f"{sent} frames, unaccounted {unaccounted}")
    plot(args.plot, windows, args.window, rss, title)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = alive and unaccounted == 0 and counters["loop_errors"] == 0
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

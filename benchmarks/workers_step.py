"""The engine in this process against N worker processes (``serve --workers N``),
interleaved in one run.

The shipped model and ``examples/pour_milk.npz``, S streams replaying the shipped demo
recording. Every round each stream gets a frame and the round is timed until every
stream's answer is back: one ``Pipeline.step()`` in this process, or the frames sent to
a ``WorkerPool`` of N local ``masa-rt worker`` processes and their answers received
(``engine.bench.step_all``). The two arms alternate round by round, so load from other
jobs on a shared machine falls on both alike.

    python benchmarks/workers_step.py [--streams 1 8 64 256] [--rounds 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def run(streams: int, rounds: int, workers: int, warmup: int = 20) -> dict:
    """Round time percentiles (µs) and frames/s of each arm at ``streams`` streams."""
    from engine.bench import BenchConfig, load_frames, percentiles_us, step_all
    from engine.pipeline import Pipeline
    from engine.serve_commands import prepare
    from engine.worker_commands import local_pool

    cfg = BenchConfig()
    model, refs = prepare(None, [cfg.reference])
    joints, layout, fps = load_frames(cfg.recording)
    arms = {"in_process": Pipeline.from_files(model, refs, capacity=max(streams, 1)),
            f"{workers}_workers": local_pool(workers, model, refs, capacity=streams)[0]}
    try:
        for pipe in arms.values():
            for i in range(streams):
                pipe.open_session(f"s{i}", layout, fps)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for k in range(warmup + rounds):
            for name, pipe in arms.items():
                t0 = time.perf_counter()
                for i in range(streams):
                    pipe.submit(f"s{i}", k, k / fps, joints[(k + 7 * i) % len(joints)])
                answered = step_all(pipe, streams)
                dt = time.perf_counter() - t0
                assert len(answered) == streams, f"{name}: {len(answered)} of {streams}"
                if k >= warmup:
                    times[name].append(dt)
    finally:
        for pipe in arms.values():
            pipe.close()
    return {name: {**percentiles_us(v), "frames_per_s": streams * len(v) / sum(v)}
            for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--rounds", type=int, default=200, help="timed rounds per arm")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)

    from engine.bench import machine_info
    from engine.threads import limit_blas_threads

    limit_blas_threads()  # as serve and its workers run
    results = {"machine": machine_info(), "load_average_before": os.getloadavg(),
               "workers": args.workers, "rounds": args.rounds, "streams": {}}
    print(f"{'streams':>7} {'arm':>12} {'p50 ms':>8} {'p99 ms':>8} {'frames/s':>9}")
    for n in args.streams:
        results["streams"][n] = run(n, args.rounds, args.workers)
        for name, r in results["streams"][n].items():
            print(f"{n:>7} {name:>12} {r['p50_us'] / 1e3:>8.2f} {r['p99_us'] / 1e3:>8.2f} "
                  f"{r['frames_per_s']:>9.0f}", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average before {results['load_average_before'][0]:.2f}, after "
          f"{results['load_average_after'][0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""numpy's BLAS pool at 1 thread against its default, interleaved in one process.

Why ``masa-rt serve`` caps the pool (``engine/threads.py``): the pipeline's aligner and
phase decoder run numpy matrix products between encoder calls. The shipped model and
``examples/pour_milk.npz`` (with its decoder), N streams replaying the shipped demo
recording. Every round each stream gets a frame, then one ``Pipeline.step()``, timed. The
pool size alternates round by round, so load from other jobs falls on both arms alike.

    python benchmarks/blas_threads.py [--streams 16 64 256] [--iters 200] [--out F.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from threadpoolctl import threadpool_limits


def run(streams: int, iters: int, arms: tuple[int, ...], warmup: int = 40) -> dict:
    """Round time percentiles (µs) of ``streams`` streams, BLAS pool size alternating
    over ``arms``."""
    from engine.bench import BenchConfig, default_factory, load_frames, percentiles_us

    cfg = BenchConfig()
    factory, _ = default_factory(cfg)
    joints, layout, fps = load_frames(cfg.recording)
    pipe = factory("onnxruntime", streams)
    for i in range(streams):
        pipe.open_session(f"s{i}", layout, fps)
    times: dict[int, list[float]] = {k: [] for k in arms}
    for it in range(warmup + iters * len(arms)):
        k = arms[it % len(arms)]
        with threadpool_limits(limits=k, user_api="blas"):
            for i in range(streams):
                pipe.submit(f"s{i}", it, it / fps, joints[it % len(joints)])
            t0 = time.perf_counter()
            pipe.step()
            dt = time.perf_counter() - t0
        if it >= warmup:
            times[k].append(dt)
    return {str(k): percentiles_us(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--iters", type=int, default=200, help="timed rounds per arm")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)

    from engine.bench import machine_info
    from engine.threads import BLAS_THREAD_VARIABLES, blas_threads

    set_vars = [v for v in BLAS_THREAD_VARIABLES if os.environ.get(v)]
    if set_vars:
        p.error(f"{set_vars[0]} is set: unset it, the benchmark sets the pool itself")
    default = blas_threads() or 1
    arms = (default, 1) if default > 1 else (1,)
    results = {"machine": machine_info() | {"blas_threads": f"{default} (default) and 1"},
               "runs": {n: run(n, args.iters, arms) for n in args.streams}}
    for n, r in results["runs"].items():
        for k, v in r.items():
            print(f"{n:4d} streams, BLAS {k} thread(s): p50 {v['p50_us'] / 1e3:7.2f} ms, "
                  f"p99 {v['p99_us'] / 1e3:7.2f} ms")
    if args.out:
        from masa_rt.atomic import atomic_write_json

        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

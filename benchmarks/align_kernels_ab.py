"""The compiled dynamic programs (masa_rt/align/kernels.py) against their numpy code, A/B in
one process: two pipelines, one built with ``MASA_RT_NUMBA=0``, step the same frames in
alternating blocks of rounds, so the other jobs on a shared machine load both arms alike.

Prints, per stream count, the round's wall and CPU time (p50, p99) for each arm. The first
block of each arm is a warm-up.

    OMP_NUM_THREADS=1 python benchmarks/align_kernels_ab.py --streams 1 256
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from engine.bench import BenchConfig, default_factory, load_frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 256])
    p.add_argument("--blocks", type=int, default=13, help="blocks per arm (the first: warm-up)")
    p.add_argument("--rounds", type=int, default=50, help="rounds per block")
    args = p.parse_args(argv)
    cfg = BenchConfig()
    factory, _ = default_factory(cfg)
    frames, layout, fps = load_frames(cfg.recording)
    pipes = {}
    for arm, flag in (("numpy", "0"), ("numba", "1")):
        os.environ["MASA_RT_NUMBA"] = flag  # read when the aligner banks are built
        pipes[arm] = factory("onnxruntime", max(args.streams))
    os.environ.pop("MASA_RT_NUMBA")
    for n in args.streams:
        ids = [f"s{i}" for i in range(n)]
        wall = {arm: [] for arm in pipes}
        cpu = {arm: [] for arm in pipes}
        step = dict.fromkeys(pipes, 0)
        for pipe in pipes.values():
            for sid in ids:
                pipe.open_session(sid, layout, fps)
        for block in range(args.blocks):
            for arm, pipe in pipes.items():
                for _ in range(args.rounds):
                    k = step[arm]
                    step[arm] += 1
                    c0, t0 = time.process_time(), time.perf_counter()
                    for i, sid in enumerate(ids):
                        pipe.submit(sid, k, k / fps, frames[(k + 7 * i) % len(frames)])
                    pipe.step()
                    if block:
                        wall[arm].append(time.perf_counter() - t0)
                        cpu[arm].append(time.process_time() - c0)
        for arm, pipe in pipes.items():
            w, c = np.array(wall[arm]) * 1e6, np.array(cpu[arm]) * 1e6
            print(f"{n:4d} streams, {arm}: wall p50 {np.percentile(w, 50):8.0f} p99 "
                  f"{np.percentile(w, 99):8.0f} us; cpu p50 {np.percentile(c, 50):8.0f} "
                  f"p99 {np.percentile(c, 99):8.0f} us")
            for sid in ids:
                pipe.close_session(sid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

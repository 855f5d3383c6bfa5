"""Where one ``Pipeline.step`` spends its time: cProfile of the engine bench's loop.

The same pipeline and frames as ``masa-rt bench`` (the shipped model and the pour_milk
reference, one new frame per stream, then one ``step``), for each stream count; prints
the functions with the most own time and the share of the step in the encoder call
(``StreamBank.step``), the aligner (``AlignerBank.step_many``, and within it the phase
decoders' term), the resampling (``StreamBank.push``) and the featurisation.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --streams 1 256 --iters 300
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --reference R.npz  # a user-built one
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from engine.bench import BenchConfig, default_factory, load_frames


def profile(pipeline, streams: int, iters: int, frames, layout: str, fps: float,
            top: int) -> None:
    ids = [f"p{i}" for i in range(streams)]
    for sid in ids:
        pipeline.open_session(sid, layout, fps, None)

    def rounds(first: int, n: int) -> None:
        for k in range(first, first + n):
            for i, sid in enumerate(ids):
                pipeline.submit(sid, k, k / fps, frames[(k + 7 * i) % len(frames)])
            pipeline.step()

    rounds(0, 50)  # warm-up: allocation, ORT arena, compiled kernels
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(rounds, 50, iters)
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    total = stats.total_tt
    cumulative = {f"{fn[0].split('/')[-1]}:{fn[2]}": v[3] for fn, v in stats.stats.items()}

    def share(name: str) -> str:  # the outermost function of that name (push calls push)
        t = max((v for k, v in cumulative.items() if k.endswith(name)), default=0.0)
        return f"{name} {1e6 * t / iters:.0f} us ({100 * t / total:.0f} %)"

    parts = ("streams.py:step", "bank.py:step_many", "decoder_term.py:decode",
             "streams.py:push", "streams.py:features")  # encoder, aligner, its decoders, ...
    print(f"\n== {streams} streams: {1e6 * wall / iters:.0f} us per round under the "
          f"profiler; " + ", ".join(share(n) for n in parts))
    stats.sort_stats("tottime").print_stats(top)
    for sid in ids:
        pipeline.close_session(sid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 256])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--reference", default=BenchConfig.reference,
                   help="reference .npz (default: the shipped pour_milk, three decoders)")
    args = p.parse_args(argv)
    cfg = BenchConfig(streams=tuple(args.streams), reference=args.reference)
    factory, _ = default_factory(cfg)
    frames, layout, fps = load_frames(cfg.recording)
    pipeline = factory("onnxruntime", max(args.streams))
    for n in args.streams:
        profile(pipeline, n, args.iters, frames, layout, fps, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

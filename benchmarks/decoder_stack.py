"""Phase decoders of several references per frame: one by one, one stacked pass, DecoderStack.

Every frame of every stream steps every loaded reference's phase decoder
(``masa_rt.phase_decoder``). This times, per batch of B streams, the three ways of doing
it, interleaved in one process so other jobs' load falls on all alike: K
``PhaseDecoder.step`` calls; one stacked pass over all K (``DecoderStack`` with no row
limit); and ``DecoderStack`` as the aligner runs it (stacked up to ``max_rows`` streams x
decoders, one by one beyond). The decoders are those of the shipped ``examples/*.npz``
(every member of an ensemble; ``--hidden H``: random ones of that width, same inputs and
phases). BLAS on one thread, as ``masa-rt serve`` runs it.

    python benchmarks/decoder_stack.py [--hidden 64] [--iters 200] [--out F.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]


def shipped_decoders(hidden: int | None) -> list:
    """The shipped references' decoders, or random ones of width ``hidden`` like them."""
    from masa_rt.align import Reference
    from masa_rt.phase_decoder import PhaseDecoder

    refs = [Reference.load(p) for p in sorted((ROOT / "examples").glob("*.npz"))]
    decs = [m for r in refs if r.decoder is not None for m in r.decoder.members]
    if not decs:
        raise SystemExit("no shipped reference with a phase decoder under examples/")
    if hidden is None or hidden == decs[0].hidden:
        return decs
    rng = np.random.default_rng(0)

    def like(d: PhaseDecoder) -> PhaseDecoder:
        h, a = hidden, {}
        shapes = {"w1": (h, d.input_dim), "b1": (h,), "w2": (h, h), "b2": (h,),
                  "wo": (d.num_phases, h), "bo": (d.num_phases,)}
        for i in range(d.layers):
            shapes |= {f"w_ih{i}": (3 * h, h), f"w_hh{i}": (3 * h, h), f"b_ih{i}": (3 * h,),
                       f"b_hh{i}": (3 * h,)}
        for name, shape in shapes.items():
            a[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        return PhaseDecoder(a)

    return [like(d) for d in decs]


def run(decs: list, batch: int, iters: int) -> dict[str, dict[str, float]]:
    from engine.bench import percentiles_us
    from masa_rt.phase_decoder import DecoderStack

    stacked, default = DecoderStack(decs), DecoderStack(decs)
    stacked.max_rows = 1 << 30
    x = np.random.default_rng(1).standard_normal((batch, decs[0].input_dim)).astype(np.float32)
    each = [d.initial_state(batch) for d in decs]
    states = {"stacked": stacked.initial_state(batch), "DecoderStack": default.initial_state(batch)}
    times: dict[str, list[float]] = {"one_by_one": [], "stacked": [], "DecoderStack": []}
    for _ in range(iters):
        t0 = time.perf_counter()
        for k, d in enumerate(decs):
            _, each[k] = d.step(x, each[k])
        times["one_by_one"].append(time.perf_counter() - t0)
        for name, stack in (("stacked", stacked), ("DecoderStack", default)):
            t0 = time.perf_counter()
            _, states[name] = stack.step(x, states[name])
            times[name].append(time.perf_counter() - t0)
    return {k: percentiles_us(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=None, help="random decoders of this width")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    args = p.parse_args(argv)

    from engine.bench import machine_info

    threadpool_limits(limits=1, user_api="blas")
    decs = shipped_decoders(args.hidden)
    results = {"machine": machine_info(), "decoders": len(decs), "hidden": decs[0].hidden,
               "runs": {n: run(decs, n, args.iters) for n in args.streams}}
    for n, r in results["runs"].items():
        print(f"{n:4d} streams, {len(decs)} decoders (H {decs[0].hidden}): " + ", ".join(
            f"{k} {v['p50_us'] / 1e3:.3f} / {v['p99_us'] / 1e3:.3f} ms" for k, v in r.items()))
    if args.out:
        from masa_rt.atomic import atomic_write_json

        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

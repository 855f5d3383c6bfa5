"""Per-step time of the online aligner bank (``masa_rt.align.AlignerBank.step_many``).

For 1 and 6 references (T_ref in 250..600, d = 128) and 1, 16, 64 and 256 sessions it
streams time-warped, noisy replays of the references (about 1% of frames NaN, as when a
hand is lost), times every ``step_many`` call and prints one JSON object to stdout: the
machine (platform, CPU count, numpy, BLAS threads) and, per case, the median and p99 of
the step alone and of the step plus building every returned ``Estimate``.

    OMP_NUM_THREADS=1 python benchmarks/align_step.py [--steps 300] [--quick]
    python benchmarks/align_step.py --module old_align.py   # A/B against another version

No thresholds here: the numbers depend on the machine and its load; compare runs of the
same command on the same machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from types import ModuleType

import numpy as np

DIM = 128
SESSIONS = (1, 16, 64, 256)
REF_LENGTHS = {1: (600,), 6: (250, 320, 390, 460, 530, 600)}


def load_align(path: str | None) -> ModuleType:
    if path is None:
        from masa_rt import align
        return align
    spec = importlib.util.spec_from_file_location("align_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def smooth_unit_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, DIM) smooth random curve on the unit sphere (moving-average filtered noise)."""
    width = 13
    x = rng.standard_normal((n + width, DIM))
    c = np.cumsum(x, axis=0)
    x = (c[width:] - c[:-width])[:n]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_refs(align: ModuleType, lengths: tuple[int, ...], rng: np.random.Generator) -> list:
    refs = []
    for k, n in enumerate(lengths):
        phases = np.minimum(np.arange(n) * 5 // n, 4)
        refs.append(align.Reference(
            name=f"ref{k}", activity=f"act{k}", embeddings=smooth_unit_curve(rng, n),
            phases=phases, phase_names=[f"p{i}" for i in range(5)],
            times=np.arange(n) / 30.0, fps=30.0))
    return refs


def make_streams(refs: list, sessions: int, steps: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(steps, sessions, DIM) replays: each session follows one reference at its own
    speed (0.5-2x), restarting at the end, with noise; ~1% NaN frames."""
    out = np.empty((steps, sessions, DIM), dtype=np.float32)
    for s in range(sessions):
        ref = refs[s % len(refs)].embeddings
        speed = rng.uniform(0.5, 2.0)
        idx = (rng.uniform(0, len(ref)) + speed * np.arange(steps)) % len(ref)
        q = ref[idx.astype(int)] + 0.05 * rng.standard_normal((steps, DIM))
        out[:, s] = q / np.linalg.norm(q, axis=1, keepdims=True)
    out[rng.random((steps, sessions)) < 0.01] = np.nan
    return out


def bench_case(align: ModuleType, n_refs: int, sessions: int, steps: int,
               warmup: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    refs = make_refs(align, REF_LENGTHS[n_refs], rng)
    frames = make_streams(refs, sessions, steps + warmup, rng)
    bank = align.AlignerBank(refs)
    ids = [f"s{i}" for i in range(sessions)]
    step_ns, total_ns = [], []
    for f in range(steps + warmup):
        times = np.full(sessions, f / 90.0)
        t0 = time.perf_counter_ns()
        out = bank.step_many(ids, frames[f], times)
        t1 = time.perf_counter_ns()
        ests = list(out)  # what a consumer does: one Estimate per session
        _ = [e.state for e in ests]
        t2 = time.perf_counter_ns()
        if f >= warmup:
            step_ns.append(t1 - t0)
            total_ns.append(t2 - t0)
    step_us, total_us = np.array(step_ns) / 1e3, np.array(total_ns) / 1e3
    return {
        "refs": n_refs, "ref_lengths": list(REF_LENGTHS[n_refs]), "sessions": sessions,
        "steps": steps,
        "step_median_us": round(float(np.median(step_us)), 1),
        "step_p99_us": round(float(np.percentile(step_us, 99)), 1),
        "with_estimates_median_us": round(float(np.median(total_us)), 1),
        "with_estimates_p99_us": round(float(np.percentile(total_us, 99)), 1),
        "per_session_median_us": round(float(np.median(total_us)) / sessions, 2),
    }


def machine() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or None,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="60 steps per case (smoke run)")
    p.add_argument("--module", default=None, help="path of another align.py to time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    steps = 60 if args.quick else args.steps
    align = load_align(args.module)
    cases = [bench_case(align, k, b, steps, args.warmup, args.seed)
             for k in REF_LENGTHS for b in SESSIONS]
    json.dump({"benchmark": "align_step", "d": DIM, "machine": machine(),
               "module": args.module or "masa_rt.align", "cases": cases},
              sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

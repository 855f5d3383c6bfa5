"""Per-frame engine step latency: one batched encoder call + every session's aligner.

For N concurrent streams (1, 16, 64, 256), every stream gets a new frame, then one
``Pipeline.step()``: that round's wall time is the latency a frame waits in the engine.
Reported per N: p50/p99/p99.9 of the round time (and its encoder/aligner split), frames/s
= N / mean round time, over ``--iters`` rounds after a warm-up of two windows.

``--encoder-only`` times the backend's ``step`` alone (no resampling, featurisation or
aligner): every stream steps once per iteration, slots in allocation order (the zero-copy
path) or, with ``--shuffle``, in a random order each iteration.

The model is a random one (default d=128, 4 layers, 4 heads, W=32, the size docs/engine.md
measured; two hands) unless ``--checkpoint`` is given: latency does not depend on the weights.

    OMP_NUM_THREADS=1 python benchmarks/engine_step.py --out bench_engine.json
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _random_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    import torch

    from masa_rt.checkpoint import save_checkpoint
    from masa_rt.model import MasaConfig, MasaModel
    from masa_rt.preprocess import InputSpec

    torch.manual_seed(0)
    cfg = MasaConfig(num_joints=42, joint_dims=3, d_model=args.d_model, n_heads=args.heads,
                     n_layers=args.layers, window=args.window, ffn_dim=args.ffn or 2 * args.d_model)
    save_checkpoint(path, MasaModel(cfg).eval(), cfg, InputSpec(layout="h2o_hands", fps=30.0))
    return path


def _backend(args: argparse.Namespace, onnx_path: Path, ckpt: Path, capacity: int):
    """ONNX Runtime (CPU, ``--threads``) or torch on ``--device`` (CUDA: CUDA graphs)."""
    from engine.backends import get_backend
    from engine.serve_commands import backend_options

    if args.backend == "torch":
        return get_backend("torch", onnx_path, capacity,
                           **{**backend_options("torch", args.device), "checkpoint": ckpt})
    return get_backend("onnxruntime", onnx_path, capacity, intra_op_threads=args.threads)


def _pipeline(backend):
    from engine.pipeline import Pipeline
    from masa_rt.align import Reference
    from masa_rt.preprocess import InputSpec

    spec = InputSpec.from_dict(backend.info.input_spec)
    rng = np.random.default_rng(0)
    ref = Reference(name="bench", activity="bench",
                    embeddings=rng.normal(size=(300, backend.embed_dim)),
                    phases=np.repeat(np.arange(5), 60), phase_names=list("abcde"),
                    times=np.arange(300) / spec.fps, fps=spec.fps,
                    model_fingerprint=backend.info.fingerprint)
    return Pipeline(backend, spec, [ref]), spec


class _Timed:
    """Wraps the backend's step to split a round into encoder and aligner time."""

    def __init__(self, backend):
        self.inner, self.last = backend.step, 0.0

    def __call__(self, slots, frames):
        t0 = time.perf_counter()
        out = self.inner(slots, frames)
        self.last = time.perf_counter() - t0
        return out


def bench_streams(backend, streams: int, iters: int) -> dict:
    pipe, spec = _pipeline(backend)
    timed = _Timed(pipe.backend)
    pipe.backend.step = timed
    from masa_rt.skeleton import get_layout

    lay = get_layout(spec.layout)
    rng = np.random.default_rng(1)
    poses = rng.normal(size=(64, lay.num_joints, lay.dims)).astype(np.float32)
    for s in range(streams):
        pipe.open_session(f"s{s}", spec.layout, spec.fps)
    window = int(pipe.backend.info.window)
    total, encoder = [], []
    for k in range(2 * window + iters):
        t = k / spec.fps
        for s in range(streams):
            pipe.submit(f"s{s}", k, t, poses[(k + 7 * s) % len(poses)])
        t0 = time.perf_counter()
        answered = pipe.step()
        dt = time.perf_counter() - t0
        assert len(answered) == streams
        if k >= 2 * window:
            total.append(dt)
            encoder.append(timed.last)
    total_us, enc_us = np.array(total) * 1e6, np.array(encoder) * 1e6

    return {"streams": streams, "iters": iters, "round_us": _pct(total_us),
            "encoder_us": _pct(enc_us), "aligner_us": _pct(total_us - enc_us),
            "frames_per_s": streams / (total_us.mean() * 1e-6),
            "state_bytes_per_stream": pipe.backend.info.slot_nbytes}


def bench_encoder(backend, streams: int, iters: int, threads: int,
                  shuffle: bool = False) -> dict:
    """The backend's batched step alone: every stream steps once per iteration."""
    slots = np.array([backend.allocate() for _ in range(streams)])
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((streams, backend.input_dim)).astype(np.float32)
    window = int(backend.info.window)
    times, cpu = [], []
    for k in range(2 * window + iters):
        order = rng.permutation(slots) if shuffle else slots
        c0, t0 = time.process_time(), time.perf_counter()
        backend.step(order, frames)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if k >= 2 * window:
            times.append(dt)
            cpu.append(dc)
    us, cpu_us = np.array(times) * 1e6, np.array(cpu) * 1e6
    # CPU time of the process (all threads): what the step costs without the other jobs
    # that share this machine's cores; wall time includes waiting for a core.
    return {"streams": streams, "iters": iters, "shuffle": shuffle, "threads": threads,
            "encoder_us": _pct(us), "encoder_cpu_us": _pct(cpu_us),
            "frames_per_s": streams / (us.mean() * 1e-6),
            "state_bytes_per_stream": backend.info.slot_nbytes}


def _pct(x: np.ndarray) -> dict:
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
            "p99.9": float(np.percentile(x, 99.9)), "mean": float(x.mean())}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="default: a random model of shipped size")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--ffn", type=int, default=0, help="FFN width (default 2 * d_model)")
    p.add_argument("--encoder-only", action="store_true",
                   help="time the backend step alone (no featurisation, no aligner)")
    p.add_argument("--shuffle", action="store_true",
                   help="with --encoder-only: slots in a random order every iteration")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("bench_engine.json"))
    args = p.parse_args(argv)

    from engine.export import export_cached

    cache = Path(os.environ.get("MASA_RT_CACHE", Path.home() / ".cache" / "masa-rt"))
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:  # the torch backend reads the checkpoint
        ckpt = args.checkpoint or _random_checkpoint(Path(tmp) / "random.pt", args)
        onnx_path = export_cached(ckpt, cache)
        if args.encoder_only:
            runs = [bench_encoder(_backend(args, onnx_path, ckpt, n), n, args.iters,
                                  args.threads, args.shuffle) for n in args.streams]
        else:
            runs = [bench_streams(_backend(args, onnx_path, ckpt, n), n, args.iters)
                    for n in args.streams]
    from engine.bench import gpu_info

    results = {"machine": machine() | gpu_info(), "backend": args.backend,
               "onnxruntime": onnxruntime.__version__, "model": str(onnx_path),
               "config": vars(args) | {"checkpoint": str(args.checkpoint),
                                       "out": str(args.out)},
               "runs": runs}
    from masa_rt.atomic import atomic_write_json

    atomic_write_json(args.out, results)
    if args.encoder_only:
        for r in runs:
            e = r["encoder_us"]
            c = r["encoder_cpu_us"]
            print(f"{r['streams']:4d} streams: encoder p50 {e['p50']:8.0f} us  "
                  f"p99 {e['p99']:8.0f} us  p99.9 {e['p99.9']:8.0f} us  "
                  f"(cpu p50 {c['p50']:7.0f} us)  {r['frames_per_s']:8.0f} frames/s")
        return 0
    for r in runs:
        print(f"{r['streams']:4d} streams: round p50 {r['round_us']['p50']:9.0f} us  "
              f"p99 {r['round_us']['p99']:9.0f} us  p99.9 {r['round_us']['p99.9']:9.0f} us  "
              f"(encoder p50 {r['encoder_us']['p50']:8.0f} us)  {r['frames_per_s']:8.0f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``masa-rt bench``: how fast is the engine, end to end, and compared with its floors?

Three measurements in one run, on one machine, written to one JSON file (machine named):

(a) **engine**: for 1, 8, 64, 256 concurrent streams and each backend, every stream gets a
    new frame, then one batched ``pipeline.step()`` (embedding + alignment). Reported per
    batch: submit+step latency p50/p99/p99.9 (every frame of the batch waits that long)
    and frames/s.
(b) **end to end**: ``N`` simulated headsets (``clients.replay``) at ``R`` Hz for ``T`` s
    against the real server on loopback; capture stamp -> estimate received, and frames
    sent / answered / rejected / dropped.
(c) **floors**: a bare ZeroMQ DEALER/ROUTER round trip with payloads of the same sizes
    (what (b) cannot beat), and a CASA-style baseline: torch eager, re-encoding the whole
    window of the last ``W`` frames with the offline encoder for every frame (what a
    non-streaming model would cost). torch is imported here only, lazily.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engine.threads import blas_threads
from masa_rt import protocol as P
from masa_rt.atomic import atomic_write
from masa_rt.extras import installed
from masa_rt.shipped import examples_dir

__all__ = ["BenchConfig", "machine_info", "run_bench"]

log = logging.getLogger("masa_rt.bench")

EXAMPLES = examples_dir()  # the clone's examples/, or the copy a wheel installs
PipelineFactory = Callable[[str, int], Any]  # (backend, capacity) -> pipeline


@dataclass(frozen=True)
class BenchConfig:
    """One bench run; the defaults finish in about a minute or two on 2 CPU cores."""

    streams: tuple[int, ...] = (1, 8, 64, 256)
    backends: tuple[str, ...] = ("onnxruntime",)
    device: str | None = None  # the torch backend's (default cpu; cuda: CUDA graphs)
    iters: int = 300  # timed engine steps per stream count
    warmup: int = 20  # untimed steps first (allocation, ORT arena, caches)
    model: str | None = None  # ONNX or checkpoint; None: the shipped model
    recording: str = str(EXAMPLES / "demos" / "pour_milk.npz")  # what the headsets stream
    reference: str | None = str(EXAMPLES / "pour_milk.npz")  # None: the recording, embedded
    e2e_clients: int = 8
    rate_hz: float = 90.0
    seconds: float = 10.0
    zmq_round_trips: int = 2000
    casa: bool = True
    casa_frames: int = 200
    out: str | None = "bench.json"
    plot: str | None = "bench.png"
    # Engine worker processes (serve --workers): 1 runs the engine in this process; N >= 2
    # runs (a) and (b) against a WorkerPool of N local workers.
    workers: int = 1


# ----------------------------------------------------------------------------- helpers


def percentiles_us(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p99/p99.9/mean/max of durations given in seconds, in microseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e6
    if a.size == 0:
        return {k: float("nan") for k in ("p50_us", "p99_us", "p99.9_us", "mean_us", "max_us")}
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"p50_us": float(p50), "p99_us": float(p99), "p99.9_us": float(p999),
            "mean_us": float(a.mean()), "max_us": float(a.max())}


def machine_info() -> dict[str, Any]:
    """Enough to tell whose numbers these are: CPU, cores, library versions, threads."""
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "processor": cpu, "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "blas_threads": blas_threads(), "load_average_start": load_average()}


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): on a shared machine
    the figures mean little without them (docs/results.md names them with each table)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def gpu_info() -> dict[str, Any]:
    """The GPU the torch backend ran on, if it did (torch is imported only by then)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def load_frames(path: str) -> tuple[np.ndarray, str, float]:
    """Joints (T, J, C), layout and fps of the recording the bench streams."""
    with np.load(path, allow_pickle=False) as f:
        return np.asarray(f["joints"], np.float32), str(f["layout"]), float(f["fps"])


def default_factory(cfg: BenchConfig) -> tuple[PipelineFactory, dict[str, Any]]:
    """Pipelines over the shipped (or given) model and the bench's reference, and the
    model's config (so the CASA baseline runs the same network size)."""
    from engine.backends import read_model_info
    from engine.pipeline import Pipeline
    from engine.serve_commands import backend_options, prepare
    from engine.threads import limit_blas_threads

    limit_blas_threads()  # as `masa-rt serve` runs
    model, refs = prepare(cfg.model, [cfg.reference or cfg.recording])

    def factory(backend: str, capacity: int) -> Any:
        if cfg.workers > 1:  # closing the pool stops its worker processes
            from engine.worker_commands import local_pool

            return local_pool(cfg.workers, model, refs, backend=backend, device=cfg.device,
                              checkpoint=cfg.model, capacity=capacity)[0]
        opts = backend_options(backend, cfg.device, cfg.model) if backend == "torch" else {}
        return Pipeline.from_files(model, refs, backend=backend, capacity=capacity, **opts)

    return factory, read_model_info(model).masa_config


# ----------------------------------------------------------------------------- (a) engine


def engine_bench(pipeline: Any, streams: int, frames: np.ndarray, layout: str, fps: float,
                 iters: int, warmup: int) -> dict[str, Any]:
    """Time ``iters`` batches of one new frame per stream: submit all, then one step."""
    ids = [f"bench-{streams}-{i}" for i in range(streams)]
    for sid in ids:
        pipeline.open_session(sid, layout, fps, None)
    total, step_only = [], []
    try:
        for k in range(warmup + iters):
            t = k / fps  # model-rate stamps: every submit makes exactly one model frame
            t0 = time.perf_counter()
            for i, sid in enumerate(ids):
                pipeline.submit(sid, k, t, frames[(k + 7 * i) % len(frames)])
            t1 = time.perf_counter()
            answered = step_all(pipeline, streams)
            t2 = time.perf_counter()
            if k >= warmup:
                total.append(t2 - t0)
                step_only.append(t2 - t1)
        assert len(answered) == streams, f"step answered {len(answered)} of {streams} streams"
    finally:
        for sid in ids:
            pipeline.close_session(sid)
    seconds = float(np.sum(total))
    return {"streams": streams, "iters": iters, **percentiles_us(total),
            "step_only": percentiles_us(step_only),
            "frames_per_s": streams * iters / seconds if seconds > 0 else float("nan")}


def step_all(pipeline: Any, expected: int, timeout: float = 30.0) -> list:
    """One ``step()``; for an engine in worker processes, whose step never waits, step
    again as answers arrive until ``expected`` frames are answered (one synchronous round,
    as the in-process pipeline's)."""
    answered = list(pipeline.step())
    answers = getattr(pipeline, "answers_socket", None)
    deadline = time.perf_counter() + timeout
    while answers is not None and len(answered) < expected and time.perf_counter() < deadline:
        if answers.poll(100):
            answered += pipeline.step()
    return answered


# ----------------------------------------------------------------------------- (b) e2e


def e2e_bench(pipeline: Any, cfg: BenchConfig) -> dict[str, Any]:
    """Real server on loopback, ``e2e_clients`` replay headsets at ``rate_hz``."""
    from clients.replay import replay
    from engine.server import Server, ServerConfig

    server = Server(pipeline, ServerConfig(bind="tcp://127.0.0.1:0",
                                           pub_bind="tcp://127.0.0.1:0"))
    with server:
        report = replay(cfg.recording, server.address, rate_hz=cfg.rate_hz,
                        clients=cfg.e2e_clients, loop=True, duration=cfg.seconds,
                        session_prefix="bench")
    final = server.stop()
    out = report.to_dict()
    lat = np.asarray(report.latencies_s)
    out["latency_us"] = percentiles_us(lat)
    out["server"] = {"counters": final["counters"],
                     "latency_us": {k: final["latency"].get(k)
                                    for k in ("p50_us", "p99_us", "p99.9_us")}}
    return out


# ----------------------------------------------------------------------------- (c) floors


def zmq_floor(request: bytes, reply: bytes, round_trips: int) -> dict[str, Any]:
    """DEALER -> ROUTER -> DEALER over TCP loopback with the protocol's payload sizes.

    The echo side does no work at all, so this is the transport's share of (b): the part
    no engine optimisation can remove.
    """
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(50):
                ident, _ = router.recv_multipart()
                router.send_multipart([ident, reply])

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    samples = []
    try:
        for i in range(round_trips + 50):
            t0 = time.perf_counter()
            dealer.send(request)
            dealer.recv()
            if i >= 50:  # the first exchanges include the TCP connect
                samples.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join(5.0)
        router.close()
        dealer.close()
        ctx.term()
    return {"request_bytes": len(request), "reply_bytes": len(reply),
            "round_trips": round_trips, **percentiles_us(samples)}


def protocol_payloads(shape: tuple[int, int]) -> tuple[bytes, bytes]:
    """A real ``frame`` and ``estimate`` message as sent on the wire (for the floor)."""
    frame = P.encode(P.frame("bench-0", 123456, 1.0, np.zeros(shape, np.float32)))
    est = P.encode(P.estimate("bench-0", 123456, 1.0, 1.0, 1.0, phase_id=3,
                              phase_name="move_to_cup", phase_progress=0.5, progress=0.4,
                              confidence=0.9, state="tracking", activity="pour_milk"))
    return frame, est


CASA_NEEDS_TORCH = ("the CASA-style baseline runs in torch, not installed here (pip install "
                    "'masa-rt[train]'); skipped")


def casa_baseline(masa_config: dict[str, Any] | None, frames: int) -> dict[str, Any]:
    """Torch eager, one stream, re-encode the last ``W`` frames with the offline (full
    attention) encoder for every new frame: what streaming without a cache costs.

    Random weights: the cost of a forward pass does not depend on their values.
    """
    import torch

    from masa_rt.model import MasaConfig, MasaModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    cfg = MasaConfig.from_dict({**(masa_config or {}), "attention": "full", "dropout": 0.0})
    model = MasaModel(cfg).eval()
    w = cfg.window
    x = torch.randn(1, w, cfg.input_dim)
    samples = []
    with torch.inference_mode():
        for i in range(frames + 10):
            t0 = time.perf_counter()
            x = torch.roll(x, -1, dims=1)
            x[0, -1] = torch.randn(cfg.input_dim)
            model.encode(x)[:, -1]  # the newest frame's embedding is all CASA keeps
            if i >= 10:
                samples.append(time.perf_counter() - t0)
    mean = float(np.mean(samples))
    return {"window": w, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            **percentiles_us(samples), "frames_per_s": 1.0 / mean}


# ----------------------------------------------------------------------------- the run


def run_bench(cfg: BenchConfig, factory: PipelineFactory | None = None,
              masa_config: dict[str, Any] | None = None) -> int:
    """Run (a), (b), (c); write JSON (+ PNG); print a table. ``factory`` overrides the
    shipped engine (tests use a fake; ``masa_config`` then sizes the CASA model).
    Returns the exit status."""
    if factory is None:
        factory, masa_config = default_factory(cfg)
    frames, layout, fps = load_frames(cfg.recording)
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg),
                               "engine": {}, "floors": {}}
    capacity = max(max(cfg.streams), cfg.e2e_clients)
    for backend in cfg.backends:
        pipeline = factory(backend, capacity)
        results["engine"][backend] = [
            engine_bench(pipeline, n, frames, layout, fps, cfg.iters, cfg.warmup)
            for n in cfg.streams]
        _close(pipeline)
        log.info("event=engine_done backend=%s", backend)
    results["machine"].update(gpu_info())
    if cfg.e2e_clients > 0 and cfg.seconds > 0:
        pipeline = factory(cfg.backends[0], capacity)
        results["e2e"] = e2e_bench(pipeline, cfg)
        _close(pipeline)
    request, reply = protocol_payloads(frames.shape[1:])
    results["floors"]["zmq_round_trip"] = zmq_floor(request, reply, cfg.zmq_round_trips)
    if cfg.casa and not installed("torch"):  # a serving-only install
        results["floors"]["casa_skipped"] = CASA_NEEDS_TORCH
        log.warning("event=casa_skipped why=%r", CASA_NEEDS_TORCH)
    elif cfg.casa:
        results["floors"]["casa"] = casa_baseline(masa_config, cfg.casa_frames)
    results["machine"]["load_average_end"] = load_average()
    results["verdict"] = verdict(results)
    _write(results, cfg)
    print(format_results(results))
    return 0


def _close(pipeline: Any) -> None:
    """Free a pipeline's backend, or stop a worker pool's processes (test fakes: nothing)."""
    close = getattr(pipeline, "close", None)
    if callable(close):
        close()


# A frame's engine step may take this long at p99 for its stream count to count as served:
# at 90 Hz a frame lasts 11.1 ms, and the network and the headset need the rest.
STEP_P99_BUDGET_US = 5000.0


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's aims, checked against this run (None where not measured)."""
    first = next(iter(r["engine"].values()), [])
    by_n = {e["streams"]: e for e in first}
    one, many = by_n.get(1), by_n.get(max(by_n, default=0))
    e2e, zfloor = r.get("e2e"), r["floors"]["zmq_round_trip"]
    casa = r["floors"].get("casa")
    served = [e["streams"] for e in first
              if e["p99_us"] <= STEP_P99_BUDGET_US and e["frames_per_s"] >= 90.0 * e["streams"]]
    return {
        "streams_at_90hz_p99_5ms": max(served, default=0) if first else None,
        "step_p99_1_stream_us": one and one["p99_us"],
        "streams_max": many and many["streams"],
        "step_p99_max_streams_us": many and many["p99_us"],
        "max_streams_at_90hz": many and many["frames_per_s"] / 90.0,
        "e2e_p99_minus_zmq_p99_us": e2e and e2e["latency_us"]["p99_us"] - zfloor["p99_us"],
        "speedup_vs_casa_1_stream": (casa and one) and one["frames_per_s"] / casa["frames_per_s"],
        "speedup_vs_casa_best": (casa and first) and max(e["frames_per_s"] for e in first)
        / casa["frames_per_s"],
    }


def format_results(r: dict[str, Any]) -> str:
    """The terminal table (also what docs/results.md shows)."""
    m = r["machine"]
    load = " -> ".join(f"{x[0]:.2f}" for x in (m.get("load_average_start"),
                                               m.get("load_average_end")) if x)
    lines = [f"machine: {m['processor']}, {m['cpu_count']} cpus, onnxruntime "
             f"{m['onnxruntime']}" + (f", load average {load} (start -> end)" if load else ""),
             f"{'backend':<12} {'streams':>7} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9} "
             f"{'frames/s':>10}"]
    for backend, rows in r["engine"].items():
        for e in rows:
            lines.append(f"{backend:<12} {e['streams']:>7} {e['p50_us']:>9.1f} "
                         f"{e['p99_us']:>9.1f} {e['p99.9_us']:>9.1f} {e['frames_per_s']:>10.0f}")
    z = r["floors"]["zmq_round_trip"]
    lines.append(f"zmq round trip floor: p50 {z['p50_us']:.1f} us, p99 {z['p99_us']:.1f} us")
    if "e2e" in r:
        e, lat = r["e2e"], r["e2e"]["latency_us"]
        lines.append(f"end to end ({e['clients']} x {e['rate_hz']:g} Hz): p50 {lat['p50_us']:.0f}"
                     f" us, p99 {lat['p99_us']:.0f} us, p99.9 {lat['p99.9_us']:.0f} us; sent "
                     f"{e['sent']}, answered {e['answered']}, unanswered {e['unanswered']}")
    if "casa" in r["floors"]:
        c = r["floors"]["casa"]
        lines.append(f"CASA-style baseline (torch eager, W={c['window']}): p50 "
                     f"{c['p50_us']:.0f} us, {c['frames_per_s']:.0f} frames/s")
    elif "casa_skipped" in r["floors"]:
        lines.append(r["floors"]["casa_skipped"])
    return "\n".join([*lines, headline(r)])


def headline(r: dict[str, Any]) -> str:
    """The run in one line: what a deployment asks first (see :func:`verdict`)."""
    v = r.get("verdict") or verdict(r)
    counts = ", ".join(str(e["streams"]) for e in next(iter(r["engine"].values()), []))
    workers = (r.get("config") or {}).get("workers", 1)
    where = f", engine in {workers} worker processes" if workers > 1 else ""
    parts = [f"headline: {v['streams_at_90hz_p99_5ms']} streams at 90 Hz with step p99 <= "
             f"{STEP_P99_BUDGET_US / 1000:g} ms (of {counts} measured{where})"]
    if v["step_p99_1_stream_us"] is not None:
        parts.append(f"1 stream step p99 {v['step_p99_1_stream_us']:.0f} us")
    if v["e2e_p99_minus_zmq_p99_us"] is not None:
        parts.append(f"end to end p99 {v['e2e_p99_minus_zmq_p99_us'] / 1000:.2f} ms above the "
                     "ZeroMQ floor")
    if v["speedup_vs_casa_1_stream"] is not None:
        parts.append(f"{v['speedup_vs_casa_1_stream']:.2f}x the CASA-style baseline (1 stream)")
    return "; ".join(parts)


def _write(results: dict[str, Any], cfg: BenchConfig) -> None:
    if cfg.out:
        with atomic_write(cfg.out, "w") as f:
            json.dump(results, f, indent=2, default=float)
            f.write("\n")
        log.info("event=wrote path=%s", cfg.out)
    if cfg.plot:
        plot(results, cfg.plot)
        log.info("event=wrote path=%s", cfg.plot)


def plot(r: dict[str, Any], path: str) -> None:
    """Latency vs streams (with the floors) and frames/s vs streams (with CASA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, rows in r["engine"].items():
        n = [e["streams"] for e in rows]
        for key, style in (("p50_us", "o-"), ("p99_us", "s--"), ("p99.9_us", "^:")):
            ax_l.plot(n, [e[key] for e in rows], style, label=f"{backend} {key[:-3]}")
        ax_t.plot(n, [e["frames_per_s"] for e in rows], "o-", label=backend)
    z = r["floors"]["zmq_round_trip"]["p99_us"]
    ax_l.axhline(z, color="grey", lw=1, label="zmq round trip p99")
    if "e2e" in r:
        ax_l.axhline(r["e2e"]["latency_us"]["p99_us"], color="red", lw=1, label="e2e p99")
    if "casa" in r["floors"]:
        ax_t.axhline(r["floors"]["casa"]["frames_per_s"], color="grey", lw=1,
                     label="CASA-style baseline")
    ax_t.axhline(90.0 * max(e["streams"] for rows in r["engine"].values() for e in rows),
                 color="green", lw=1, ls="--", label="max streams x 90 Hz")
    for ax, ylabel in ((ax_l, "latency per batch (us)"), (ax_t, "frames / s")):
        ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"masa-rt bench - {r['machine']['processor']} "
                 f"({r['machine']['cpu_count']} cpus)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

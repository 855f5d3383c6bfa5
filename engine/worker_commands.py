"""``masa-rt worker`` and the engine side of ``masa-rt serve --workers N``.

``serve --workers N`` (default: the cores this process may use, but one) with N >= 2 runs the
engine in N local worker processes behind the server's one pair of public sockets
(engine.workers.WorkerPool); N = 1 keeps the engine in the server process, as before.
``--worker-bind tcp://HOST:PORT`` also admits workers from other hosts (``masa-rt worker
--connect tcp://SERVER:PORT ...``, CURVE with --secure); ``--workers 0`` then runs none
locally. Local workers connect over ``ipc://`` in a private temporary folder; serve restarts
one that exits (or hangs), with back-off (engine.workers.RestartPolicy), and stops them all
when it stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from masa_rt.cli_types import nonnegative_int, positive_int

__all__ = ["add_serve_options", "local_pool", "register", "serve_engine",
           "start_local_workers"]

log = logging.getLogger("masa_rt.serve")

READY_TIMEOUT_S = 120.0  # a worker loads the model and references (seconds; more on a GPU)


def default_workers(backend: str = "onnxruntime", device: str | None = None) -> int:
    """For an engine on the CPU, one worker per core this process may run on (its
    affinity, not the machine's count) but one: the server process needs a core of its
    own (on the 2-core VM 2 workers were slower than the engine in the server process,
    1 stream p50 1.30 -> 2.54 ms, docs/engine.md), so 1 - the engine in process - up to 2
    cores. 1 for an engine on a GPU (TensorRT, torch on CUDA): there each worker would
    hold its own CUDA context and engine, and the one device serialises their steps."""
    if backend == "tensorrt" or (backend == "torch" and device == "cuda"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--worker-bind`` on ``masa-rt serve``."""
    p.add_argument("--workers", type=nonnegative_int, default=None, metavar="N",
                   help="engine worker processes (default: the cores available but one, here "
                        f"{default_workers()}, on the CPU; 1 with a GPU backend); 1: the "
                        "engine runs in the server process; 0: only workers from other "
                        "hosts (--worker-bind)")
    p.add_argument("--worker-bind", metavar="ENDPOINT",
                   help="also accept engine workers from other hosts here, e.g. "
                        "tcp://0.0.0.0:5557 (CURVE with --secure; docs/serving.md)")


def serve_engine(args: argparse.Namespace, model: Path, references: list[Path]
                 ) -> tuple[Any, Callable[[], None]]:
    """The server's pipeline for ``args`` and the function that stops it: a Pipeline in
    this process, or a WorkerPool with its local workers started and registered."""
    from engine.pipeline import Pipeline
    from engine.serve_commands import backend_options

    workers = (default_workers(args.backend, args.device) if args.workers is None
               else args.workers)
    if workers == 0 and args.worker_bind is None:
        raise ValueError("--workers 0 runs no engine here: give --worker-bind ENDPOINT for "
                         "workers on other hosts, or --workers N >= 1")
    if workers == 1 and args.worker_bind is None:
        pipeline = Pipeline.from_files(model, references, backend=args.backend,
                                       **backend_options(args.backend, args.device, args.model))
        return pipeline, pipeline.close
    return local_pool(workers, model, references, backend=args.backend, device=args.device,
                      checkpoint=args.model, bind=args.worker_bind, keydir=args.secure)


def local_pool(n: int, model: Path, references: list[Path], *, backend: str = "onnxruntime",
               device: str | None = None, checkpoint: str | None = None,
               bind: str | None = None, keydir: str | None = None,
               capacity: int = 256, **pool_opts: Any) -> tuple[Any, Callable[[], None]]:
    """A WorkerPool with ``n`` local ``masa-rt worker`` processes, all registered and kept
    running (restarted when one exits, :meth:`WorkerPool.supervise`), and the function that
    stops them (``serve``, ``bench --workers``). ``bind``: also admit workers from other
    hosts there (default: a private ipc:// path). ``pool_opts``: WorkerPool's (``restart``
    a RestartPolicy, ``lost_after_s``, ...)."""
    from engine.pipeline import Pipeline
    from engine.workers import WorkerPool, stop_processes

    # The gate checks hellos (layouts, references) exactly as the workers' pipelines will;
    # one slot: it opens and at once closes each session, and never steps.
    gate = Pipeline.from_files(model, references, capacity=1)
    folder = Path(tempfile.mkdtemp(prefix="masa-rt-workers-"))  # 0700: this user only
    try:
        pool = WorkerPool(gate, bind or f"ipc://{folder}/engine", keydir=keydir, **pool_opts)
    except BaseException:  # e.g. --worker-bind in use, no KEYDIR/workers/
        gate.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    procs: list[subprocess.Popen] = []
    # pool.close() stops its supervised workers (restarting none), then runs these: the
    # workers not yet handed to it (start-up failed), the gate, the private folder.
    pool.on_close += [lambda: stop_processes(procs), gate.close,
                      lambda: shutil.rmtree(folder, ignore_errors=True)]

    def spawn() -> subprocess.Popen:
        return start_local_workers(1, pool.address, model, references, backend=backend,
                                   device=device, checkpoint=checkpoint, capacity=capacity)[0]

    try:
        procs += [spawn() for _ in range(n)]
        for proc in procs:
            pool.watch_process(proc.pid, lambda proc=proc: proc.poll() is None)
        # A worker failing at start-up fails serve at once (no restarts yet: it would fail
        # again), with the worker's error above.
        got = pool.wait_for_workers(n, READY_TIMEOUT_S,
                                    give_up=lambda: any(p.poll() is not None for p in procs))
        if got < n:
            exited = [p.returncode for p in procs if p.poll() is not None]
            why = (f"a worker exited with code {exited[0]}" if exited else
                   f"not within {READY_TIMEOUT_S:.0f} s")
            raise OSError(f"only {got} of {n} engine workers started: {why} (its "
                          "error is above)")
        pool.supervise(procs, spawn)
    except BaseException:
        pool.close()
        raise
    log.info("event=workers local=%d endpoint=%s", n, pool.address)
    return pool, pool.close


def start_local_workers(n: int, endpoint: str, model: Path, references: list[Path], *,
                        backend: str = "onnxruntime", device: str | None = None,
                        checkpoint: str | None = None, capacity: int = 256
                        ) -> list[subprocess.Popen]:
    """``masa-rt worker`` processes on this machine, each in its own session (a Ctrl-C
    meant for serve does not reach them: serve stops them after its final accounting)."""
    # torch runs a checkpoint (serve's --model), the other backends the prepared ONNX file
    served = checkpoint if backend == "torch" and checkpoint else str(model)
    cmd = [sys.executable, "-m", "masa_rt.cli", "worker", "--connect", endpoint,
           "--model", served, "--backend", backend, "--exit-with-server",
           "--capacity", str(capacity), *[a for r in references for a in ("--reference", str(r))]]
    if device is not None:
        cmd += ["--device", device]
    return [subprocess.Popen(cmd, start_new_session=True) for _ in range(n)]




def _worker(args: argparse.Namespace) -> int:
    from engine.pipeline import Pipeline
    from engine.serve_commands import backend_options, prepare
    from engine.threads import limit_blas_threads
    from engine.worker import Worker, WorkerConfig
    from engine.workers import engine_info

    curve = None
    if args.secure is not None:
        from engine.security import load_client_keys

        curve = load_client_keys(args.secure, args.key)
    model, references = prepare(args.model, args.reference)
    limit_blas_threads()
    pipeline = Pipeline.from_files(model, references, backend=args.backend,
                                   capacity=args.capacity,
                                   **backend_options(args.backend, args.device, args.model))
    worker = Worker(pipeline, WorkerConfig(connect=args.connect,
                                           exit_with_server=args.exit_with_server),
                    curve=curve, info=engine_info(pipeline))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.request_stop())
    try:
        return worker.run()
    finally:
        pipeline.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``worker`` to the masa-rt parser."""
    from engine.serve_commands import BACKENDS, DEVICES

    p = subparsers.add_parser("worker", help="an engine worker for a `serve --worker-bind` "
                                             "server (docs/serving.md)")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the server's --worker-bind endpoint, e.g. tcp://server:5557")
    p.add_argument("--reference", action="append", required=True, metavar="NPZ",
                   help="the server's references (the same files, or built the same way)")
    p.add_argument("--model", help="ONNX file or checkpoint (default: the shipped model); "
                                   "must be the server's")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", choices=DEVICES,
                   help="where the torch backend runs (default cpu; cuda: with CUDA graphs)")
    p.add_argument("--capacity", type=positive_int, default=256, metavar="N",
                   help="sessions this worker holds at most (default 256)")
    p.add_argument("--secure", metavar="KEYDIR",
                   help="the server runs --secure: connect with CURVE as worker key --key")
    p.add_argument("--key", default="worker", metavar="NAME",
                   help="with --secure: KEYDIR/private/NAME.key_secret (its public key in "
                        "the server's KEYDIR/workers/)")
    p.add_argument("--exit-with-server", action="store_true",
                   help="exit when the server is silent for 3 s (serve's local workers); "
                        "by default a worker registers again and waits")
    p.set_defaults(func=_worker)

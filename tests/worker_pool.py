"""Worker pools for tests: a WorkerPool with engine workers in threads (any pipeline, e.g.
the fake one) or in real ``masa-rt worker`` processes (the tiny ONNX model)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve_process import ENV

from engine.worker import Worker, WorkerConfig
from engine.workers import WorkerPool, engine_info, stop_processes


@contextmanager
def thread_workers(make_pipeline: Callable[[], Any], n: int = 2, **pool_opts: Any
                   ) -> Iterator[WorkerPool]:
    """A pool on a free loopback port whose ``n`` workers run ``make_pipeline()`` in threads
    of this process (the wire and the pool's rules, without processes)."""
    pool = WorkerPool(make_pipeline(), "tcp://127.0.0.1:0", **pool_opts)
    beat = WorkerConfig(pool.address, heartbeat_s=pool_opts.get("heartbeat_s", 0.5))
    workers = []
    try:
        for _ in range(n):
            pipe = make_pipeline()
            workers.append(Worker(pipe, beat, info=engine_info(pipe)))
            workers[-1].start_in_thread()
        assert pool.wait_for_workers(n, 10.0) == n
        pool.threads = workers  # tests reach the workers (and their pipelines) here
        yield pool
    finally:
        for w in workers:
            w.request_stop()
        pool.close()


def worker_cmd(endpoint: str, onnx: Path, ref: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "masa_rt.cli", "-q", "worker", "--connect", endpoint,
            "--model", str(onnx), "--reference", str(ref), *extra]


@contextmanager
def process_workers(onnx: Path, ref: Path, n: int = 2, **pool_opts: Any
                    ) -> Iterator[WorkerPool]:
    """A pool whose ``n`` workers are ``masa-rt worker`` processes on loopback TCP, watched
    as serve watches its own (``pool.procs``)."""
    from engine.pipeline import Pipeline

    pool = WorkerPool(Pipeline.from_files(onnx, [ref], capacity=1), "tcp://127.0.0.1:0",
                      **pool_opts)
    procs = [subprocess.Popen(worker_cmd(pool.address, onnx, ref, "--exit-with-server"),
                              env=ENV) for _ in range(n)]
    try:
        for proc in procs:
            pool.watch_process(proc.pid, lambda proc=proc: proc.poll() is None)
        assert pool.wait_for_workers(n, 60.0) == n
        pool.procs = procs
        yield pool
    finally:
        stop_processes(procs)
        pool.close()


@contextmanager
def standing_workers(onnx: Path, ref: Path, endpoint: str, n: int = 2
                     ) -> Iterator[list[subprocess.Popen]]:
    """``n`` ``masa-rt worker`` processes that outlive servers (as on other hosts): each
    server bound at ``endpoint`` gets them registered within a heartbeat or two, so a
    module's tests do not each pay for starting them."""
    procs = [subprocess.Popen(worker_cmd(endpoint, onnx, ref), env=ENV) for _ in range(n)]
    try:
        yield procs
    finally:
        stop_processes(procs)


@contextmanager
def pool_at(endpoint: str, onnx: Path, ref: Path, n: int = 2) -> Iterator[WorkerPool]:
    """A WorkerPool bound at ``endpoint`` once ``n`` standing workers registered with it."""
    from engine.pipeline import Pipeline

    pool = WorkerPool(Pipeline.from_files(onnx, [ref], capacity=1), endpoint)
    try:
        assert pool.wait_for_workers(n, 60.0) == n
        yield pool
    finally:
        pool.close()

"""One CPU thread budget for a serving process: numpy's BLAS pool follows ONNX Runtime's.

Between two encoder calls the pipeline aligns every stream in numpy (cosine costs against
the references, the phase decoder's GRU), and numpy's BLAS starts one thread per core by
default. Those threads busy-wait between calls and fight the encoder's and any other
process's threads: measured with a second job on the 2-core development machine
(docs/engine.md, "Threads"), 256 streams stepped in 88 ms p50 with the default BLAS pool
against 30 ms with one thread. So the commands that serve (``serve``, ``bench``,
``demo``) give the BLAS pool as many threads as ONNX Runtime's intra-op pool
(``MASA_RT_ORT_THREADS``, default 1), unless the user has set a BLAS thread variable.
"""

from __future__ import annotations

import logging
import os

import numpy  # noqa: F401  (loads the BLAS that threadpoolctl finds among loaded libraries)
from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ["BLAS_THREAD_VARIABLES", "blas_threads", "limit_blas_threads"]

log = logging.getLogger(__name__)

# What OpenBLAS, MKL and BLIS read at start-up: a user who set one has chosen.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                         "OMP_NUM_THREADS")


def blas_threads() -> int | None:
    """The BLAS pool's thread count now (the largest, if several BLAS are loaded)."""
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def limit_blas_threads(threads: int | None = None) -> int | None:
    """Cap numpy's BLAS pool at ``threads`` (None: ONNX Runtime's default count) for the
    rest of the process; a BLAS thread variable set in the environment wins. Returns the
    pool's thread count afterwards."""
    chosen = [v for v in BLAS_THREAD_VARIABLES if os.environ.get(v)]
    if chosen:
        now = blas_threads()
        log.info("BLAS threads: %s set, left at %s", chosen[0], now)
        return now
    if threads is None:
        from engine.backends.onnxruntime_backend import default_threads

        threads = default_threads()
    threadpool_limits(limits=max(1, threads), user_api="blas")  # kept: process-wide
    return blas_threads()

"""engine.threads: the serving commands cap numpy's BLAS pool at ONNX Runtime's count."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from engine.threads import BLAS_THREAD_VARIABLES, blas_threads, limit_blas_threads

pytestmark = pytest.mark.skipif(blas_threads() is None, reason="numpy loaded no BLAS "
                                "threadpoolctl can see")


@pytest.fixture
def blas_pool(monkeypatch):
    """A BLAS pool of 2 threads and no BLAS variable set; restored afterwards."""
    for var in BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):  # restores the original on exit
        yield


def test_caps_the_pool_at_ort_threads(blas_pool, monkeypatch):
    monkeypatch.setenv("MASA_RT_ORT_THREADS", "1")
    assert limit_blas_threads() == 1 == blas_threads()


def test_explicit_count(blas_pool):
    assert limit_blas_threads(1) == 1
    assert limit_blas_threads(0) == 1  # never below one thread


def test_user_variable_wins(blas_pool, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    before = blas_threads()
    assert limit_blas_threads(1) == before == blas_threads()

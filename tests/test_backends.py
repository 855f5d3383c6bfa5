"""Backends own per-stream state: any mix of slots, resets and releases gives what the
torch step gives when each stream is run on its own."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backends import BackendError, BackendUnavailable, CapacityError, get_backend  # noqa: E402
from engine.backends.base import contiguous_range  # noqa: E402
from masa_rt.model import StreamingEncoder  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
W = 8
FPS = 30.0


class OneByOne:
    """Each stream stepped alone through the torch step: the ground truth."""

    def __init__(self, model, n: int):
        self.encoder = StreamingEncoder(model).eval()
        self.state = {s: self.encoder.initial_state(1) for s in range(n)}

    def reset(self, s: int) -> None:
        self.state[s] = self.encoder.initial_state(1)

    def step(self, s: int, frame: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u, self.state[s] = self.encoder.step(torch.from_numpy(frame[None]), self.state[s])
        return u[0].numpy()


def _drive(backend, truth: OneByOne, rng, rounds: int, n: int) -> float:
    """Random batches (contiguous and not), resets and a release/re-allocate."""
    worst = 0.0
    for r in range(rounds):
        if r % 4 == 0:
            slots = np.arange(n)  # everyone: the zero-copy path
        else:
            slots = rng.permutation(n)[: rng.integers(1, n + 1)]
        if r == rounds // 2:
            backend.reset(np.array([1]))
            truth.reset(1)
        if r == rounds // 3:
            backend.release(2)
            assert backend.allocate() == 2  # lowest free slot, handed back empty
            truth.reset(2)
        frames = rng.standard_normal((len(slots), backend.input_dim)).astype(np.float32)
        out = backend.step(slots, frames)
        for i, s in enumerate(slots):
            worst = max(worst, float(np.abs(out[i] - truth.step(int(s), frames[i])).max()))
    return worst


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_backend_matches_streams_run_alone(engine_model, name):
    model, _spec, onnx_path, ckpt = engine_model
    opts = {"checkpoint": ckpt} if name == "torch" else {}
    backend = get_backend(name, onnx_path, capacity=5, **opts)
    assert (backend.input_dim, backend.embed_dim, backend.capacity) == (63, 32, 5)
    slots = [backend.allocate() for _ in range(5)]
    assert slots == [0, 1, 2, 3, 4]
    worst = _drive(backend, OneByOne(model, 5), np.random.default_rng(0), 3 * W, 5)
    assert worst < 1e-4


def test_onnxruntime_contiguous_batches_copy_nothing(engine_model):
    _model, _spec, onnx_path, _ckpt = engine_model
    backend = get_backend("onnxruntime", onnx_path, capacity=4)
    for _ in range(4):
        backend.allocate()
    frames = np.zeros((4, backend.input_dim), np.float32)
    for _ in range(3):
        backend.step(np.arange(4), frames)
        backend.step(np.arange(1, 3), frames[:2])  # a sub-range: a view too
        backend.step(np.array([2, 1]), frames[:2])  # any order of a range: permuted frames
        backend.step(np.array([3, 0, 2, 1]), frames)
    assert backend.rows_copied == 0
    backend.step(np.array([3, 0]), frames[:2])
    assert backend.rows_copied == 2


def test_onnxruntime_step_writes_one_ring_slot_per_stream(engine_model):
    """Structural (step ABI 2): a step changes each stepping stream's caches only in the
    ring slot at its write pointer, and nothing of the other streams."""
    _model, _spec, onnx_path, _ckpt = engine_model
    backend = get_backend("onnxruntime", onnx_path, capacity=4)
    for _ in range(4):
        backend.allocate()
    rng = np.random.default_rng(3)
    for r in range(2 * W + 1):
        slots = np.array([3, 1]) if r % 3 else np.arange(4)
        k, v, ptr = backend._k.copy(), backend._v.copy(), backend._ptr.copy()
        backend.step(slots, rng.standard_normal((len(slots), backend.input_dim),
                                                dtype=np.float32))
        changed = np.zeros(k.shape, dtype=bool)
        changed[:, slots, :, ptr[slots]] = True
        assert np.array_equal(backend._k != k, changed) and np.array_equal(backend._v != v,
                                                                             changed)
        assert np.array_equal(backend._ptr[slots], (ptr[slots] + 1) % (W - 1))


def test_backend_errors(engine_model):
    _model, _spec, onnx_path, ckpt = engine_model
    backend = get_backend("onnxruntime", onnx_path, capacity=1)
    slot = backend.allocate()
    with pytest.raises(CapacityError):
        backend.allocate()
    with pytest.raises(BackendError, match="frames"):
        backend.step(np.array([slot]), np.zeros((1, 5), np.float32))
    with pytest.raises(BackendError, match="not allocated"):
        backend.release(slot) or backend.step(np.array([slot]), np.zeros((1, 63), np.float32))
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("tpu", onnx_path)


def test_tensorrt_missing_is_a_clear_error(engine_model):
    pytest.importorskip("engine.backends.tensorrt_backend")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match=r"pip install -e \.\[gpu\]"):
            get_backend("tensorrt", engine_model[2], capacity=2)
    else:
        pytest.skip("TensorRT is installed here; tests/test_tensorrt.py covers it")


def test_contiguous_range():
    assert contiguous_range(np.array([3, 4, 5])) == (3, 6)
    assert contiguous_range(np.array([7])) == (7, 8)
    assert contiguous_range(np.array([3, 5])) is None
    assert contiguous_range(np.array([5, 4])) is None
    assert contiguous_range(np.array([], dtype=np.int64)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_backend_matches_streams_run_alone(engine_model, graphs):
    """The GPU path of the torch backend, eager and replayed as CUDA graphs (padded
    buckets, resets, a release), against the CPU step run one stream at a time."""
    model, _spec, onnx_path, ckpt = engine_model
    backend = get_backend("torch", onnx_path, capacity=5, checkpoint=ckpt, device="cuda",
                          cuda_graphs=graphs)
    assert [backend.allocate() for _ in range(5)] == [0, 1, 2, 3, 4]
    worst = _drive(backend, OneByOne(model, 5), np.random.default_rng(0), 3 * W, 5)
    assert worst < 1e-3  # float32 on both; cuBLAS and MKL sum in other orders
    assert backend.cuda_graphs is graphs

"""The TensorRT backend's CUDA side, checked on a GPU without TensorRT.

TensorRT's libraries come only from NVIDIA's own package index, which the GPU machines this
project is tested on cannot reach, so ``test_tensorrt.py`` skips there too. Everything
around the engine is ours and can still be run for real with cuda-python: device rings,
pinned staging, the layer-major span addressing handed to ``set_tensor_address``, the
NVRTC-compiled ring-write kernel and its capture in a CUDA graph. Here the engine is a
stand-in that runs the same ONNX step with ONNX Runtime on the bytes at the addresses the
backend bound, so a wrong offset, shape, dtype or ring write shows up as a wrong embedding.

Skipped (with the reason) where cuda-python or an NVIDIA GPU is missing, as in CI.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from engine.backends import BackendUnavailable, get_backend

pytestmark = pytest.mark.gpu

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@pytest.fixture(scope="module")
def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        pytest.skip("cuda-python is not installed (pip install -e .[gpu])")
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess or not count:
        pytest.skip(f"no NVIDIA GPU visible to cuda-python ({err})")
    return runtime


class _FakeContext:
    """``IExecutionContext`` stand-in: ONNX Runtime over the bound device buffers."""

    def __init__(self, onnx_path: str, rt):
        import onnxruntime as ort

        self.rt = rt
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: _DTYPES[i.type] for i in self.session.get_inputs()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls = 0

    def set_input_shape(self, name: str, shape) -> bool:
        assert name in self.inputs, name
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def _copy(self, dst, src, nbytes: int, kind) -> None:
        err, = self.rt.cudaMemcpy(dst, src, nbytes, kind)
        assert err == self.rt.cudaError_t.cudaSuccess, err

    def execute_async_v3(self, stream) -> bool:
        rt = self.rt
        err, = rt.cudaStreamSynchronize(stream)  # the staged inputs have landed
        assert err == rt.cudaError_t.cudaSuccess, err
        feeds = {}
        for name, dtype in self.inputs.items():
            host = np.empty(self.shapes[name], dtype=dtype)
            self._copy(host.ctypes.data, self.addresses[name], host.nbytes,
                       rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
            feeds[name] = host
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names, self.session.run(names, feeds), strict=True):
            value = np.ascontiguousarray(value)
            self._copy(self.addresses[name], value.ctypes.data, value.nbytes,
                       rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        self.calls += 1
        return True


def _fake_tensorrt(onnx_path: str, rt) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, *_):
            pass

    class Engine:
        def create_execution_context(self):
            return _FakeContext(onnx_path, rt)

    class Runtime:
        def __init__(self, _logger):
            pass

        def deserialize_cuda_engine(self, blob):
            assert blob == b"fake-engine"
            return Engine()

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


def test_tensorrt_backend_cuda_side_matches_onnxruntime(cudart, engine_model, monkeypatch):
    """Dense and sparse slot sets, a reset and a release, eager enqueue (graph capture
    cannot hold the stand-in's host round trip; the graph path is checked below)."""
    from engine.backends import tensorrt_backend as tb

    _model, _spec, onnx_path, _ckpt = engine_model
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(str(onnx_path), cudart))
    monkeypatch.setattr(tb, "_load_or_build", lambda *a, **k: b"fake-engine")
    gpu = get_backend("tensorrt", onnx_path, capacity=6, cuda_graphs=False)
    cpu = get_backend("onnxruntime", onnx_path, capacity=6)
    for b in (gpu, cpu):
        assert [b.allocate() for _ in range(6)] == list(range(6))
    rng = np.random.default_rng(0)
    worst = 0.0
    for r in range(40):  # more rounds than the ring has slots: it wraps
        slots = np.arange(6) if r % 3 == 0 else np.sort(rng.choice(6, 3, replace=False))
        if r == 15:
            for b in (gpu, cpu):
                b.reset(np.array([2]))
        if r == 25:
            for b in (gpu, cpu):
                b.release(4)
                assert b.allocate() == 4
        frames = rng.standard_normal((len(slots), cpu.input_dim)).astype(np.float32)
        worst = max(worst, float(np.abs(gpu.step(slots, frames) - cpu.step(slots, frames)).max()))
    assert worst < 1e-5
    assert gpu._context.calls == 40


def test_ring_write_kernel_replays_in_a_cuda_graph(cudart):
    """The NVRTC ring write, captured once with its H2D table copy, writes whatever rows the
    table lists at each replay (the table's length is read on the device)."""
    from engine.backends import tensorrt_backend as tb

    cuda = tb._Cuda(cudart)
    L, H, S, dh, cap = 2, 3, 5, 4, 8
    ring = L * cap * H * S * dh * 4
    k, v = cuda("cudaMalloc", ring), cuda("cudaMalloc", ring)
    for p in (k, v):
        cuda("cudaMemset", p, 0, ring)
    new = cap * L * H * dh * 4
    nk, nv = cuda("cudaMalloc", new), cuda("cudaMalloc", new)
    host_table = tb._Pinned(cuda, (cap, 3), np.int64)
    host_count = tb._Pinned(cuda, (1,), np.int32)
    table, count = cuda("cudaMalloc", host_table.nbytes), cuda("cudaMalloc", 4)
    rng = np.random.default_rng(1)
    new_k = rng.standard_normal((cap, L, H, dh)).astype(np.float32)
    new_v = rng.standard_normal((cap, L, H, dh)).astype(np.float32)
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    cuda("cudaMemcpy", nk, new_k.ctypes.data, new, h2d)
    cuda("cudaMemcpy", nv, new_v.ctypes.data, new, h2d)
    writer = tb._RingWriter(cuda, {"k": int(k), "v": int(v), "nk": int(nk), "nv": int(nv),
                                   "table": int(table), "count": int(count)},
                            {"L": L, "H": H, "S": S, "dh": dh, "cap": cap})
    stream = cuda("cudaStreamCreateWithFlags", cudart.cudaStreamNonBlocking)
    cuda("cudaStreamBeginCapture", stream,
         cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    cuda.memcpy(table, host_table.ptr, host_table.nbytes, "h2d", stream)
    cuda.memcpy(count, host_count.ptr, 4, "h2d", stream)
    writer.launch(stream)
    graph = cuda("cudaStreamEndCapture", stream)
    exe = cuda("cudaGraphInstantiate", graph, 0)

    want_k = np.zeros((L, cap, H, S, dh), np.float32)
    want_v = np.zeros_like(want_k)
    for rows in ([(0, 3, 1), (1, 5, 4)], [(0, 0, 0), (1, 3, 2), (2, 7, 4)], []):
        host_table.array[:len(rows)] = rows if rows else 0
        host_count.array[0] = len(rows)
        cuda("cudaGraphLaunch", exe, stream)
        cuda("cudaStreamSynchronize", stream)
        for row, slot, ptr in rows:
            want_k[:, slot, :, ptr] = new_k[row]
            want_v[:, slot, :, ptr] = new_v[row]
        for dev, want in ((k, want_k), (v, want_v)):
            got = np.empty_like(want)
            cuda("cudaMemcpy", got.ctypes.data, dev, ring,
                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
            np.testing.assert_array_equal(got, want)


def test_tensorrt_unavailable_without_tensorrt(cudart, engine_model):
    """On a GPU machine without TensorRT the backend says what to install."""
    if "tensorrt" in sys.modules or _has_tensorrt():
        pytest.skip("TensorRT is installed here: test_tensorrt.py runs the real thing")
    _model, _spec, onnx_path, _ckpt = engine_model
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        get_backend("tensorrt", onnx_path, capacity=2)


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None

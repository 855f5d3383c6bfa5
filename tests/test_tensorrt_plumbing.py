"""The TensorRT backend's CUDA side, checked on a GPU without TensorRT.

TensorRT's libraries come only from NVIDIA's own package index, which the GPU machines this
project is tested on cannot reach, so ``test_tensorrt.py`` skips there too. Everything
around the engine is ours and can still be run for real with cuda-python: device rings,
pinned staging, the layer-major span addressing handed to ``set_tensor_address``, the
NVRTC-compiled ring-write kernel and its capture in a CUDA graph. Here the engine is a
stand-in that runs the same ONNX step with ONNX Runtime on the bytes at the addresses the
backend bound, so a wrong offset, shape, dtype or ring write shows up as a wrong embedding.

Skipped (with the reason) where cuda-python or an NVIDIA GPU is missing, as in CI. The
tests at the end are pure logic (span alignment, the FP16 guard, the I/O check, the engine
cache, capture failure, close, the gpu_check.sh package filter) and run everywhere.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import math
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engine.backends import BackendError, BackendUnavailable, get_backend
from engine.backends import tensorrt_backend as tb

ROOT = Path(__file__).resolve().parents[1]
_aligned_start = tb.aligned_start  # before any monkeypatching

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
        self.calls, self.captured = 0, False

    def set_input_shape(self, name: str, shape) -> bool:
        assert name in self.inputs, name
        assert not self.captured, f"{name}: re-shaped after its graph was captured"
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        assert int(address) % tb.ALIGN == 0, (name, hex(address))  # TensorRT's rule
        self.addresses[name] = int(address)
        return True

    def set_device_memory(self, address: int, size: int) -> None:
        self.device_memory = (int(address), int(size))

    def _copy(self, dst, src, nbytes: int, kind) -> None:
        err, = self.rt.cudaMemcpy(dst, src, nbytes, kind)
        assert err == self.rt.cudaError_t.cudaSuccess, err

    def execute_async_v3(self, stream) -> bool:
        rt = self.rt
        err, status = rt.cudaStreamIsCapturing(stream)
        assert err == rt.cudaError_t.cudaSuccess, err
        if status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone:
            defer = getattr(rt, "defer", None)  # only _HostCudart can put a host call in a graph
            if defer is None:
                return False  # its host round trip cannot be captured: a failed enqueue
            self.captured = True  # TensorRT: a captured context must keep its shapes
            defer(self._run)
            return True
        err, = rt.cudaStreamSynchronize(stream)  # the staged inputs have landed
        assert err == rt.cudaError_t.cudaSuccess, err
        self._run()
        return True

    def _run(self) -> None:
        rt, feeds = self.rt, {}
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


def _fake_tensorrt(onnx_path: str, rt) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, *_):
            pass

    trt.DataType = enum.Enum("DataType", "FLOAT INT64 INT32 BOOL")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.ExecutionContextAllocationStrategy = enum.Enum("Strategy", "STATIC USER_MANAGED")
    dtypes = {"tensor(float)": trt.DataType.FLOAT, "tensor(int64)": trt.DataType.INT64,
              "tensor(bool)": trt.DataType.BOOL}

    class Engine:
        device_memory_size_v2 = 1 << 12

        def __init__(self):
            import onnxruntime as ort

            sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            self.io = {i.name: (trt.TensorIOMode.INPUT, dtypes[i.type])
                       for i in sess.get_inputs()}
            self.io.update({o.name: (trt.TensorIOMode.OUTPUT, dtypes[o.type])
                            for o in sess.get_outputs()})
            self.num_io_tensors = len(self.io)
            self.strategies = []

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def create_execution_context(self, strategy=None):
            self.strategies.append(strategy)
            return _FakeContext(onnx_path, rt)

    class Runtime:
        def __init__(self, _logger):
            pass

        def deserialize_cuda_engine(self, blob):
            assert blob == b"fake-engine"
            return Engine()

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_tensorrt_backend_cuda_side_matches_onnxruntime(cudart, engine_model, monkeypatch,
                                                        tmp_path, caplog, graphs):
    """Dense and sparse slot sets, a reset and a release, eager enqueue. The stand-in's host
    round trip cannot be captured: with graphs on, every capture fails as a real failed
    enqueue would, and those buckets must fall back to eager with the same results (the
    graph path itself is checked below)."""
    _model, _spec, onnx_path, _ckpt = engine_model
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(str(onnx_path), cudart))
    monkeypatch.setattr(tb, "_build_engine", lambda *a, **k: b"fake-engine")
    gpu = get_backend("tensorrt", onnx_path, capacity=6, cuda_graphs=graphs,
                      cache_dir=tmp_path)
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
    assert gpu._eager_ctx.calls == 40
    assert all(exe is None for exe in gpu._graphs.values()) and (len(gpu._graphs) > 0) == graphs
    assert len([r for r in caplog.records if "capture failed" in r.message]) == int(graphs)
    gpu.close()
    gpu.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        gpu.step(np.arange(1), np.zeros((1, gpu.input_dim), np.float32))


class _HostCudart:
    """cudart over host memory, to run the backend's own logic without a GPU: "device"
    buffers are 256-aligned host buffers, copies are memmove, one in-order stream, and a
    stream capture records the operations that cudaGraphLaunch replays. Not a CUDA model:
    what only a GPU can check (the NVRTC kernel, real capture rules) stays in the tests
    above."""

    class cudaError_t(enum.Enum):  # noqa: N801 - cuda-python's spelling
        cudaSuccess = 0

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                           cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureStatus = types.SimpleNamespace(cudaStreamCaptureStatusNone=0,
                                                    cudaStreamCaptureStatusActive=1)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    cudaStreamNonBlocking = 1

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.recording: list | None = None
        self.graphs: dict[int, list] = {}

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def defer(self, op) -> None:
        """Run ``op`` now, or record it while the stream is capturing."""
        if self.recording is None:
            op()
        else:
            self.recording.append(op)

    def cudaMalloc(self, n):  # noqa: N802 - cudart names
        buf = np.zeros(n + tb.ALIGN, np.uint8)
        ptr = buf.ctypes.data + (-buf.ctypes.data) % tb.ALIGN
        self.buffers[ptr] = buf
        return self._ok(ptr)

    cudaMallocHost = cudaMalloc

    def cudaFree(self, ptr):  # noqa: N802
        del self.buffers[ptr]
        return self._ok()

    cudaFreeHost = cudaFree

    def cudaMemset(self, ptr, value, n):  # noqa: N802
        ctypes.memset(ptr, value, n)
        return self._ok()

    def cudaMemsetAsync(self, ptr, value, n, stream):  # noqa: N802
        self.defer(lambda: ctypes.memset(ptr, value, n))
        return self._ok()

    def cudaMemcpy(self, dst, src, n, kind):  # noqa: N802
        ctypes.memmove(dst, src, n)
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        self.defer(lambda: ctypes.memmove(dst, src, n))
        return self._ok()

    def cudaStreamIsCapturing(self, stream):  # noqa: N802
        return self._ok(int(self.recording is not None))

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.recording = []
        return self._ok()

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        graph = 1 + len(self.graphs)
        self.graphs[graph], self.recording = self.recording, None
        return self._ok(graph)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return self._ok(-graph)

    def cudaGraphLaunch(self, exe, stream):  # noqa: N802
        for op in self.graphs[-exe]:
            op()
        return self._ok()

    def __getattr__(self, name):  # sync, destroy: nothing to do on one in-order stream
        values = {"cudaStreamCreateWithFlags": (1,), "cudaGetDevice": (0,),
                  "cudaGetDeviceProperties": (types.SimpleNamespace(name=b"host", major=0,
                                                                    minor=0),)}
        return lambda *args: self._ok(*values.get(name, ()))


class _HostRingWriter:
    """The ring-write kernel's indexing (see _RING_WRITE), in numpy over host addresses."""

    def __init__(self, cuda, addresses: dict[str, int], dims: dict[str, int]):
        self.rt, self.at = cuda.rt, addresses
        self.d = {"lstride": dims["cap"] * dims["H"] * dims["S"] * dims["dh"], **dims}

    def _array(self, name: str, dtype, count: int) -> np.ndarray:
        raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.at[name])
        return np.frombuffer(raw, dtype=dtype)

    def _write(self) -> None:
        d = self.d
        L, H, S, dh, cap, stride = (d[k] for k in ("L", "H", "S", "dh", "cap", "lstride"))
        n = int(self._array("count", np.int32, 1)[0])
        table = self._array("table", np.int64, 3 * n).reshape(n, 3)
        for ring, new in (("k", "nk"), ("v", "nv")):
            rows = self._array(new, np.float32, cap * L * H * dh).reshape(cap, L, H, dh)
            layers = self._array(ring, np.float32, L * stride).reshape(L, stride)
            for layer in range(L):
                block = layers[layer, :cap * H * S * dh].reshape(cap, H, S, dh)
                for row, slot, ptr in table:
                    block[slot, :, ptr] = rows[row, layer]

    def launch(self, stream) -> None:
        self.rt.defer(self._write)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("graphs", [False, True])
def test_tensorrt_backend_logic_on_emulated_cuda(engine_model, monkeypatch, tmp_path, graphs):
    """The whole backend but TensorRT and CUDA, without a GPU: the stand-in engine over
    host "device" memory. Graph capture works here, so the graph path's bookkeeping is
    checked too: one context per bucket, bound once (the stand-in refuses a re-shape after
    capture), replayed with new frames, tables and spans, aligned span starts, close()."""
    _model, _spec, onnx_path, _ckpt = engine_model
    rt = _HostCudart()
    trt = _fake_tensorrt(str(onnx_path), rt)
    monkeypatch.setattr(tb, "_import_gpu", lambda: (trt, rt))
    monkeypatch.setattr(tb, "_RingWriter", _HostRingWriter)
    monkeypatch.setattr(tb, "_build_engine", lambda *a, **k: b"fake-engine")
    starts = []
    monkeypatch.setattr(tb, "aligned_start",
                        lambda a, row: starts.append((a, _aligned_start(a, row))) or starts[-1][1])
    gpu = get_backend("tensorrt", onnx_path, capacity=6, cuda_graphs=graphs,
                      cache_dir=tmp_path)
    cpu = get_backend("onnxruntime", onnx_path, capacity=6)
    assert gpu._layer_row % tb.ALIGN  # this model's rows are not aligned: spans widen
    for b in (gpu, cpu):
        assert [b.allocate() for _ in range(6)] == list(range(6))
    rng = np.random.default_rng(0)
    worst = 0.0
    live = 6
    for r in range(40):
        if r in (20, 28, 34):  # release the top slots: dense steps use buckets 4, 2, 1
            live = {20: 3, 28: 2, 34: 1}[r]
            for b in (gpu, cpu):
                for slot in range(live, b._pool.in_use):
                    b.release(slot)
        if r == 15:
            for b in (gpu, cpu):
                b.reset(np.array([2]))
        if r % 3 == 0 or live == 1:  # all live slots (graph path)
            slots = np.arange(live)
        else:  # a sparse subset (eager path, span widened to an aligned start)
            slots = np.sort(rng.choice(live, max(live // 2, 1), replace=False))
        frames = rng.standard_normal((len(slots), cpu.input_dim)).astype(np.float32)
        worst = max(worst, float(np.abs(gpu.step(slots, frames) - cpu.step(slots, frames)).max()))
    assert worst < 1e-5
    assert any(a0 < a for a, a0 in starts)  # some spans were widened to stay aligned
    if graphs:
        assert set(gpu._graphs) == {1, 2, 4, 6} and None not in gpu._graphs.values()
        assert len(gpu._contexts) == 1 + len(gpu._graphs)  # eager + one per bucket
    else:
        assert gpu._graphs == {} and gpu._contexts == [gpu._eager_ctx]
    assert all(s == trt.ExecutionContextAllocationStrategy.USER_MANAGED
               for s in gpu._engine.strategies)
    assert {c.device_memory for c in gpu._contexts} == {(gpu._scratch, 1 << 12)}  # shared
    gpu.close()
    assert rt.buffers == {}  # every device and pinned buffer freed


@pytest.mark.gpu
def test_ring_write_kernel_replays_in_a_cuda_graph(cudart):
    """The NVRTC ring write, captured once with its H2D table copy, writes whatever rows the
    table lists at each replay (the table's length is read on the device), into layer
    blocks padded to 256 bytes as the backend lays them out; the padding stays untouched."""
    cuda = tb._Cuda(cudart)
    L, H, S, dh, cap = 2, 3, 5, 4, 8
    block = cap * H * S * dh  # floats of one layer: 1920 bytes, padded to 2048
    stride = tb.round_up(block * 4) // 4
    assert stride > block
    ring = L * stride * 4
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
                            {"L": L, "H": H, "S": S, "dh": dh, "cap": cap, "lstride": stride})
    stream = cuda("cudaStreamCreateWithFlags", cudart.cudaStreamNonBlocking)
    cuda("cudaStreamBeginCapture", stream,
         cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    cuda.memcpy(table, host_table.ptr, host_table.nbytes, "h2d", stream)
    cuda.memcpy(count, host_count.ptr, 4, "h2d", stream)
    writer.launch(stream)
    graph = cuda("cudaStreamEndCapture", stream)
    exe = cuda("cudaGraphInstantiate", graph, 0)

    want_k = np.zeros((L, stride), np.float32)  # padding included: must stay zero
    want_v = np.zeros_like(want_k)
    for rows in ([(0, 3, 1), (1, 5, 4)], [(0, 0, 0), (1, 3, 2), (2, 7, 4)], []):
        host_table.array[:len(rows)] = rows if rows else 0
        host_count.array[0] = len(rows)
        cuda("cudaGraphLaunch", exe, stream)
        cuda("cudaStreamSynchronize", stream)
        for want, new_rows in ((want_k, new_k), (want_v, new_v)):
            blocks = want[:, :block].reshape(L, cap, H, S, dh)  # a view: writes land in want
            for row, slot, ptr in rows:
                blocks[:, slot, :, ptr] = new_rows[row]
        for dev, want in ((k, want_k), (v, want_v)):
            got = np.empty_like(want)
            cuda("cudaMemcpy", got.ctypes.data, dev, ring,
                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
            np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
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


# -- pure logic: no GPU, no TensorRT ---------------------------------------------------------


@pytest.mark.parametrize("row_bytes", [896, 256, 512, 4, 12, 1000, 0])
def test_aligned_start_keeps_every_layer_address_aligned(row_bytes):
    """setTensorAddress needs 256-byte aligned addresses: a span bound from aligned_start()
    is aligned in every layer (layers start on padded, aligned offsets), starts at or
    below the requested slot, and adds as few rows as alignment allows."""
    cap, L = 37, 3
    stride = tb.round_up(cap * row_bytes)
    assert stride % tb.ALIGN == 0 and stride >= cap * row_bytes
    most = tb.ALIGN // math.gcd(row_bytes, tb.ALIGN) - 1
    for a in range(cap):
        a0 = tb.aligned_start(a, row_bytes)
        assert 0 <= a - a0 <= most
        assert all((layer * stride + a0 * row_bytes) % tb.ALIGN == 0 for layer in range(L))
        assert all((layer * stride + b * row_bytes) % tb.ALIGN for layer in (0,)
                   for b in range(a0 + 1, a + 1))  # a0 is the nearest aligned slot


def test_fp16_flag_guard_names_the_supported_tensorrt():
    """TensorRT 11 has no BuilderFlag.FP16: a clear BackendError, raised before building."""
    trt11 = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace())
    with pytest.raises(BackendError, match=r"TensorRT 11.*tensorrt>=10,<11"):
        tb._build_engine(trt11, b"onnx", fp16=True, profile=(1, 2, 4))  # no Builder touched
    trt10 = types.SimpleNamespace(__version__="10.3.0",
                                  BuilderFlag=types.SimpleNamespace(FP16="fp16-flag"))
    assert tb._fp16_flag(trt10) == "fp16-flag"


def _fake_trt_enums() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        DataType=enum.Enum("DataType", "FLOAT INT64 INT32 BOOL"),
        TensorIOMode=enum.Enum("TensorIOMode", "INPUT OUTPUT"))


def test_engine_io_check_names_each_mismatch():
    trt = _fake_trt_enums()
    want = tb._expected_io(trt, 2)
    assert set(want) == {"frame", "age", "valid", "k_cache_0", "k_cache_1", "v_cache_0",
                         "v_cache_1", "embedding", "new_k", "new_v"}
    assert tb.io_mismatches(want, dict(want)) == []
    have = dict(want)
    have["age"] = (trt.TensorIOMode.INPUT, trt.DataType.INT32)  # int64 demoted
    del have["v_cache_1"]
    have["extra"] = (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT)
    problems = tb.io_mismatches(want, have)
    assert problems == ["v_cache_1: missing from the engine",
                        "extra: not bound by this backend",
                        "age: expected INPUT INT64, engine has INPUT INT32"]

    class Engine:
        num_io_tensors = len(have)

        def get_tensor_name(self, i):
            return list(have)[i]

        def get_tensor_mode(self, name):
            return have[name][0]

        def get_tensor_dtype(self, name):
            return have[name][1]

    with pytest.raises(BackendError, match=r"age: expected INPUT INT64.*INT32"):
        tb._check_io(trt, Engine(), 2)


def _fake_cuda(name, *args):
    if name == "cudaGetDeviceProperties":
        return types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0)
    return 0


def test_engine_cache_rebuilds_a_bad_file_and_keys_the_workspace(tmp_path, monkeypatch,
                                                                 caplog):
    trt = types.SimpleNamespace(__version__="10.3.0")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model")
    key = tb._engine_key(b"model", _fake_cuda, trt, True, (1, 2, 4))
    assert key != tb._engine_key(b"model", _fake_cuda, trt, True, (1, 2, 4), workspace=1 << 20)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{key}.engine").write_bytes(b"truncated")
    built = []
    monkeypatch.setattr(tb, "_build_engine", lambda *a, **k: built.append(1) or b"good")

    class Runtime:
        def deserialize_cuda_engine(self, blob):
            return "engine" if blob == b"good" else None  # what TensorRT does on bad bytes

    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        engine = tb._load_engine(trt, Runtime(), _fake_cuda, onnx, cache, True, (1, 2, 4))
    assert engine == "engine" and built == [1]
    assert (cache / f"{key}.engine").read_bytes() == b"good"
    assert any("does not deserialize" in r.message for r in caplog.records)
    assert tb._load_engine(trt, Runtime(), _fake_cuda, onnx, cache, True, (1, 2, 4)) == "engine"
    assert built == [1]  # the rebuilt file is used from now on


class _FakeRt:
    """cudart stand-in recording the calls that capture and close() make."""

    class cudaError_t(enum.Enum):  # noqa: N801 - cuda-python's spelling
        cudaSuccess = 0
        cudaErrorStreamCaptureInvalidated = 901

    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, graph: int = 77):
        self.calls: list[tuple] = []
        self.capturing, self.graph = False, graph

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            if name == "cudaStreamBeginCapture":
                self.capturing = True
            if name == "cudaStreamEndCapture":
                self.capturing = False
                return self.cudaError_t.cudaSuccess, self.graph
            if name == "cudaGraphInstantiate":
                return self.cudaError_t.cudaSuccess, "exe"
            return (self.cudaError_t.cudaSuccess,)
        return call

    def named(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


def _bare_backend(rt, enqueue_fails: bool):
    """A TensorRTBackend shell over fakes: only the capture and teardown logic is real."""
    b = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    b.cuda, b._stream, b._graphs, b._contexts, b._warned_capture = tb._Cuda(rt), 5, {}, [], False
    b._closed, b.cuda_graphs, b.capacity = False, True, 16

    def new_context():
        b._contexts.append(object())
        return b._contexts[-1]

    def enqueue(ctx, n, write):
        if rt.capturing and enqueue_fails:
            raise BackendError("TensorRT execute_async_v3 failed")

    b._new_context, b._bind, b._enqueue = new_context, lambda *a: None, enqueue
    b._stage = lambda *a: None
    return b


def test_failed_capture_ends_capture_and_falls_back_to_eager(caplog):
    rt = _FakeRt()
    b = _bare_backend(rt, enqueue_fails=True)
    with caplog.at_level(logging.DEBUG, logger=tb.__name__):
        s, f = np.arange(3), np.zeros((3, 2), np.float32)
        assert b._graph(s, f) is None  # bucket 4: capture fails
        assert b._graph(s, f) is None  # and is not tried again
        assert b._graph(np.arange(7), f) is None  # bucket 8 fails too
    assert not rt.capturing and len(rt.named("cudaStreamEndCapture")) == 2
    assert rt.named("cudaGraphDestroy") == [(77,), (77,)]  # the partial graphs
    assert rt.named("cudaGraphInstantiate") == [] and b._graphs == {4: None, 8: None}
    assert b._contexts == []  # the buckets' contexts are dropped
    warned = [r for r in caplog.records if "capture failed" in r.message]
    assert [r.levelno for r in warned] == [logging.WARNING, logging.DEBUG]  # warned once


def test_capture_keeps_the_exec_and_frees_the_graph():
    rt = _FakeRt()
    b = _bare_backend(rt, enqueue_fails=False)
    assert b._graph(np.arange(3), np.zeros((3, 2), np.float32)) == "exe"
    assert rt.named("cudaGraphInstantiate") == [(77, 0)] and rt.named("cudaGraphDestroy") == [(77,)]
    assert b._graphs == {4: "exe"} and len(b._contexts) == 1  # one context per bucket


def test_close_frees_everything_once():
    rt = _FakeRt()
    b = _bare_backend(rt, enqueue_fails=False)
    writer = types.SimpleNamespace(closed=0)
    writer.close = lambda: setattr(writer, "closed", writer.closed + 1)
    b._graphs, b._contexts, b._eager_ctx = {4: "exe4", 8: None}, [object()], object()
    b._engine, b._runtime, b._writer = object(), object(), writer
    b._k, b._v, b._scratch, b._dev = 100, 200, 300, {"frame": 400, "embedding": 500}
    b._host = {"frame": types.SimpleNamespace(ptr=600)}
    b.close()
    b.close()
    assert rt.named("cudaGraphExecDestroy") == [("exe4",)]
    assert sorted(rt.named("cudaFree")) == [(100,), (200,), (300,), (400,), (500,)]
    assert rt.named("cudaFreeHost") == [(600,)] and rt.named("cudaStreamDestroy") == [(5,)]
    assert writer.closed == 1 and b._engine is None and b._contexts == []
    with pytest.raises(BackendError, match="closed"):
        b.step(np.arange(1), np.zeros((1, 2), np.float32))


@pytest.mark.skipif(shutil.which("grep") is None, reason="no grep here")
def test_gpu_check_lists_the_gpu_packages():
    """benchmarks/gpu_check.sh greps `pip list` for the packages that matter on a GPU box."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    pattern = re.search(r'grep -iE \\?\s*"(\^\(.*?\) )"', script).group(1)
    listing = ["cuda-python 13.4.4", "cuda-bindings 13.4.4", "cuda_pathfinder 1.9",
               "tensorrt 10.3.0", "tensorrt-cu12 10.3.0", "tensorrt_cu12_libs 10.3.0",
               "onnx 1.17.0", "onnxruntime 1.20.1", "onnxruntime-gpu 1.20.1", "numpy 2.1.0",
               "torch 2.13.0", "pyzmq 26.2.0", "msgpack 1.1.0", "nvidia-cuda-nvrtc-cu12 12.4",
               "scipy 1.14.1", "torchvision 0.20", "nvidia-cublas-cu12 12.4"]
    out = subprocess.run(["grep", "-iE", pattern], input="\n".join(listing) + "\n",
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert [line for line in out if line] == listing[:-3]

"""TensorRT backend (TensorRT 10 Python API + cuda-python), for NVIDIA GPUs.

- **Engine**: built from the exported ONNX (step ABI 2, see ``engine/export.py``) with the
  FP16 flag and one optimisation profile over the batch axis (min 1, opt
  ``min(64, capacity)``, max ``capacity``). Building takes minutes, so serialized engines
  are cached in ``~/.cache/masa-rt/trt/`` under sha256(ONNX bytes, GPU name, compute
  capability, TensorRT version, precision, profile): any change to one of them builds a
  new engine, never loads a stale one.
- **Rings on the device**, layer-major like the ONNX Runtime backend's:
  ``k, v (L, capacity, H, W-1, dh)`` float32 (``cudaMalloc``), so every layer's cache of a
  slot span ``[a, b)`` is one contiguous block whose address goes straight to
  ``set_tensor_address`` (no gather; rows of the span that do not step are computed and
  ignored). The write pointers and valid masks live on the **host** (numpy): each step
  stages ``age`` (from the pointers) and ``valid`` of the span with the frames into pinned
  buffers (``cudaMallocHost``) and copies them up; the engine returns only the new
  keys/values ``(B, L, H, dh)``.
- **Ring write**: a tiny CUDA kernel, compiled once with NVRTC (cuda-python), copies row
  ``i`` of ``new_k``/``new_v`` into slot ``ptr`` of stream ``slot`` for every
  ``(i, slot, ptr)`` of a small index table, ``B*L*H*dh`` floats per tensor in one launch.
  Every address it touches is fixed at start-up (compiled in as constants) and the table
  and its length are read from device memory, so the launch takes no arguments and can sit
  in a CUDA graph while the batch changes. (Per-stream ``cudaMemcpy2DAsync`` calls would
  be ``2 * L * B`` calls per step and could not be captured.)
- **CUDA graphs**: when the stepping streams are exactly slots ``0..n-1`` and no other slot
  is live (all streams step together, the common case in a server), the whole step (H2D
  frames/age/valid/index table, ``execute_async_v3``, ring write, D2H embeddings) is
  captured once per batch-size bucket (n padded up to a power of two; padded rows are free
  slots, never written: the index table lists the n real rows) after a warm-up enqueue,
  and replayed with one ``cudaGraphLaunch``.

GPU libraries are imported lazily; without them :class:`BackendUnavailable` says what to
install. Not exercised in CI (no GPU there): ``tests/test_tensorrt.py`` runs where one is.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.base import (
    BackendError,
    BackendUnavailable,
    PooledSlots,
    SlotPool,
    check_frames,
    read_model_info,
    ring_ages,
)

__all__ = ["TensorRTBackend", "engine_cache_dir"]

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install -e .[gpu] (TensorRT from NVIDIA's index) and an NVIDIA GPU")
_RING_WRITE = r"""
extern "C" __global__ void ring_write() {
    float* k = (float*)%(k)dULL;
    float* v = (float*)%(v)dULL;
    const float* nk = (const float*)%(nk)dULL;
    const float* nv = (const float*)%(nv)dULL;
    const long long* table = (const long long*)%(table)dULL;  // (n, 3): row, slot, ptr
    const int n = *(const int*)%(count)dULL;
    const long long per = %(L)dLL * %(H)dLL * %(dh)dLL;  // floats of one row of new_k
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i = t / per;
    if (i >= n) return;
    const long long r = t - i * per;  // (layer, head, channel) inside the row
    const long long layer = r / (%(H)dLL * %(dh)dLL);
    const long long head = (r / %(dh)dLL) %% %(H)dLL;
    const long long e = r %% %(dh)dLL;
    const long long row = table[3 * i], slot = table[3 * i + 1], ptr = table[3 * i + 2];
    const long long dst = (((layer * %(cap)dLL + slot) * %(H)dLL + head) * %(S)dLL + ptr)
                          * %(dh)dLL + e;
    k[dst] = nk[row * per + r];
    v[dst] = nv[row * per + r];
}
"""
_THREADS = 256


def engine_cache_dir() -> Path:
    base = os.environ.get("MASA_RT_CACHE", str(Path.home() / ".cache" / "masa-rt"))
    return Path(base) / "trt"


def _import_gpu() -> tuple[Any, Any]:
    """(tensorrt, cudart) or BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable(f"cuda-python is not installed: {INSTALL_HINT}") from exc
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise BackendUnavailable(f"no NVIDIA GPU is visible ({err}): {INSTALL_HINT}")
    return trt, cudart


def _import_driver() -> tuple[Any, Any]:
    """(cuda driver API, nvrtc) from cuda-python, for the ring-write kernel."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
            from cuda import nvrtc
        except ImportError as exc:
            raise BackendUnavailable(f"cuda-python (driver, nvrtc) is missing: {INSTALL_HINT}"
                                     ) from exc
    return driver, nvrtc


def _check(result: Any, what: str) -> Any:
    """Driver/NVRTC calls return ``(error, *values)``: raise on an error."""
    err, *values = result
    if int(err) != 0:
        raise BackendError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else (values or None)


class _RingWriter:
    """The ring-write kernel (see module doc), compiled for this state's addresses."""

    def __init__(self, cuda: _Cuda, addresses: dict[str, int], dims: dict[str, int]):
        driver, nvrtc = _import_driver()
        self.driver = driver
        _check(driver.cuInit(0), "cuInit")
        props = cuda("cudaGetDeviceProperties", cuda("cudaGetDevice"))
        source = (_RING_WRITE % {**addresses, **dims}).encode()
        prog = _check(nvrtc.nvrtcCreateProgram(source, b"ring_write.cu", 0, [], []),
                      "nvrtcCreateProgram")
        opts = [f"--gpu-architecture=compute_{props.major}{props.minor}".encode()]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log_text = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log_text)
            raise BackendError(f"NVRTC could not compile the ring write: {log_text.decode()}")
        size = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        _check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        # NUL-terminated PTX image (nvrtcGetPTXSize counts the NUL), kept alive while loading
        self._ptx = np.frombuffer(ptx.rstrip(b"\0") + b"\0", dtype=np.uint8)
        self.module = _check(driver.cuModuleLoadData(self._ptx.ctypes.data), "cuModuleLoadData")
        self.kernel = _check(driver.cuModuleGetFunction(self.module, b"ring_write"),
                             "cuModuleGetFunction")
        per = dims["L"] * dims["H"] * dims["dh"]
        self.blocks = (dims["cap"] * per + _THREADS - 1) // _THREADS

    def launch(self, stream: Any) -> None:
        """One launch over capacity rows; rows past the table's length return at once."""
        _check(self.driver.cuLaunchKernel(self.kernel, self.blocks, 1, 1, _THREADS, 1, 1, 0,
                                          self.driver.CUstream(int(stream)), None, 0),
               "cuLaunchKernel(ring_write)")


class _Cuda:
    """cuda-python calls return ``(error, *values)``; this raises on an error."""

    def __init__(self, cudart: Any):
        self.rt = cudart

    def __call__(self, name: str, *args: Any) -> Any:
        err, *values = getattr(self.rt, name)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA {name} failed: {err}")
        return values[0] if len(values) == 1 else (values or None)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        kinds = {"h2d": self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                 "d2h": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                 "d2d": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}
        if nbytes:
            self("cudaMemcpyAsync", dst, src, nbytes, kinds[kind], stream)


def _engine_key(onnx_bytes: bytes, cuda: _Cuda, trt: Any, fp16: bool,
                profile: tuple[int, int, int]) -> str:
    props = cuda("cudaGetDeviceProperties", cuda("cudaGetDevice"))
    gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    h = hashlib.sha256(onnx_bytes)
    h.update(f"|{gpu}|sm{props.major}{props.minor}|trt{trt.__version__}|fp16={fp16}|"
             f"profile={profile}".encode())
    return h.hexdigest()[:32]


def _build_engine(trt: Any, onnx_bytes: bytes, fp16: bool,
                  profile: tuple[int, int, int]) -> bytes:
    """Parse the ONNX and build a serialized engine with one batch profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        lo, mid, hi = ((b, *rest) for b in profile)
        opt.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(opt)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendError("TensorRT engine build failed (see the TensorRT log above)")
    return bytes(blob)


def _load_or_build(trt: Any, cuda: _Cuda, onnx_path: Path, cache_dir: Path, fp16: bool,
                   profile: tuple[int, int, int]) -> bytes:
    from masa_rt.atomic import atomic_write

    data = onnx_path.read_bytes()
    path = cache_dir / f"{_engine_key(data, cuda, trt, fp16, profile)}.engine"
    if path.is_file():
        return path.read_bytes()
    log.info("building TensorRT engine for %s (fp16=%s, batch %s); cached at %s",
             onnx_path, fp16, profile, path)
    blob = _build_engine(trt, data, fp16, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(blob)
    return blob


class _Pinned:
    """A pinned host array (``cudaMallocHost``) viewed as numpy."""

    def __init__(self, cuda: _Cuda, shape: tuple[int, ...], dtype: Any):
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = cuda("cudaMallocHost", self.nbytes)
        raw = (ctypes.c_byte * self.nbytes).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)


class TensorRTBackend(PooledSlots):
    """``Backend`` over a TensorRT engine with device-resident rings (see module doc)."""

    name = "tensorrt"

    def __init__(self, onnx_path: str | Path, capacity: int = 256, *, fp16: bool = True,
                 cache_dir: str | Path | None = None, cuda_graphs: bool = True):
        trt, cudart = _import_gpu()
        self.trt, self.cuda = trt, _Cuda(cudart)
        self.info = read_model_info(onnx_path)
        self.input_dim, self.embed_dim = self.info.input_dim, self.info.embed_dim
        self.capacity = capacity
        self._pool = SlotPool(capacity)
        profile = (1, min(64, capacity), capacity)
        blob = _load_or_build(trt, self.cuda, Path(onnx_path),
                              Path(cache_dir) if cache_dir else engine_cache_dir(), fp16, profile)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise BackendError("TensorRT could not deserialize the cached engine")
        self._context = self._engine.create_execution_context()
        self._stream = self.cuda("cudaStreamCreateWithFlags", cudart.cudaStreamNonBlocking)
        L, H, S, dh = self.info.cache_shape
        self._ptr = np.zeros(capacity, dtype=np.int64)  # host: write pointers
        self._valid = np.zeros((capacity, S), dtype=bool)  # host: the valid masks
        self._age_table = ring_ages(S)
        self._alloc_buffers()
        self._writer = _RingWriter(
            self.cuda,
            {"k": self._k, "v": self._v, "nk": self._dev["new_k"], "nv": self._dev["new_v"],
             "table": self._dev["table"], "count": self._dev["count"]},
            {"L": L, "H": H, "S": max(S, 1), "dh": dh, "cap": capacity})
        self._graphs: dict[int, Any] = {}
        self.cuda_graphs = cuda_graphs

    # -- memory ---------------------------------------------------------------------------

    def _alloc_buffers(self) -> None:
        cap, malloc = self.capacity, (lambda n: int(self.cuda("cudaMalloc", max(n, 1))))
        L, H, S, dh = self.info.cache_shape
        self._layer_row = H * S * dh * 4  # bytes of one slot's cache in one layer
        ring = L * cap * self._layer_row
        self._k, self._v = malloc(ring), malloc(ring)
        for ptr in (self._k, self._v):
            self.cuda("cudaMemset", ptr, 0, max(ring, 1))
        self._host = {  # pinned staging, one row per slot
            "frame": _Pinned(self.cuda, (cap, self.input_dim), np.float32),
            "age": _Pinned(self.cuda, (cap, max(S, 1)), np.int64),
            "valid": _Pinned(self.cuda, (cap, max(S, 1)), np.bool_),
            "table": _Pinned(self.cuda, (cap, 3), np.int64),
            "count": _Pinned(self.cuda, (1,), np.int32),
            "embedding": _Pinned(self.cuda, (cap, self.embed_dim), np.float32),
        }
        self._row = {n: h.nbytes // h.array.shape[0] for n, h in self._host.items()}
        self._dev = {n: malloc(h.nbytes) for n, h in self._host.items()}
        new = cap * L * H * dh * 4
        self._dev["new_k"], self._dev["new_v"] = malloc(new), malloc(new)

    def state_nbytes(self) -> int:
        L = self.info.num_layers
        return 2 * L * self.capacity * self._layer_row + self._valid.nbytes + self._ptr.nbytes

    # -- slots ----------------------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        s = np.asarray(slots, dtype=np.int64)
        self._valid[s] = False
        self._ptr[s] = 0
        for slot in s:  # zeros keep the masked slots finite
            for layer in range(self.info.num_layers):
                off = (layer * self.capacity + int(slot)) * self._layer_row
                for base in (self._k, self._v):
                    self.cuda("cudaMemsetAsync", base + off, 0, self._layer_row, self._stream)
        self.cuda("cudaStreamSynchronize", self._stream)

    # -- stepping -------------------------------------------------------------------------

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        s = self._pool.check(slots)
        f = check_frames(frames, len(s), self.input_dim)
        if len(s) == 0:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        dense = int(s.max()) + 1 == len(s) == self._pool.in_use
        if self.cuda_graphs and dense:
            bucket = min(1 << (len(s) - 1).bit_length(), self.capacity)
            self._stage(0, bucket, s, f)
            graph = self._graphs.get(bucket)
            if graph is None:
                graph = self._graphs[bucket] = self._capture(bucket)
            self.cuda("cudaGraphLaunch", graph, self._stream)
            a = 0
        else:
            a, b = int(s.min()), int(s.max()) + 1
            self._stage(a, b - a, s, f)
            self._enqueue(a, b - a, write=True)
        self.cuda("cudaStreamSynchronize", self._stream)
        self._advance(s)
        return self._host["embedding"].array[s - a].copy()

    def _stage(self, a: int, n: int, slots: np.ndarray, frames: np.ndarray) -> None:
        """Host side of a step over rows [a, a+n): frames (zeros for rows that do not step),
        ages and valid masks of the span, and the ring-write table of the stepping rows."""
        h = {k: p.array for k, p in self._host.items()}
        rows = slots - a
        h["frame"][:n] = 0.0
        h["frame"][rows] = frames
        if self._valid.shape[1]:
            np.take(self._age_table, self._ptr[a:a + n], axis=0, out=h["age"][:n])
            h["valid"][:n] = self._valid[a:a + n]
        m = len(slots)
        h["table"][:m, 0], h["table"][:m, 1], h["table"][:m, 2] = rows, slots, self._ptr[slots]
        h["count"][0] = m if self._valid.shape[1] else 0

    def _advance(self, slots: np.ndarray) -> None:
        S = self._valid.shape[1]
        if S:
            p = self._ptr[slots]
            self._valid[slots, p] = True
            self._ptr[slots] = (p + 1) % S

    def _enqueue(self, a: int, n: int, write: bool) -> None:
        """H2D staging, the engine over rows [a, a+n), the ring write, D2H embeddings."""
        cuda, st, ctx = self.cuda, self._stream, self._context
        for name in ("frame", "age", "valid", "table"):
            cuda.memcpy(self._dev[name], self._host[name].ptr, n * self._row[name], "h2d", st)
        cuda.memcpy(self._dev["count"], self._host["count"].ptr, 4, "h2d", st)
        L, H, S, dh = self.info.cache_shape
        shapes = {"frame": (n, self.input_dim), "age": (n, S), "valid": (n, S)}
        for name, shape in shapes.items():
            ctx.set_input_shape(name, shape)
            ctx.set_tensor_address(name, self._dev[name])
        for layer in range(L):
            off = (layer * self.capacity + a) * self._layer_row
            for kind, base in (("k", self._k), ("v", self._v)):
                ctx.set_input_shape(f"{kind}_cache_{layer}", (n, H, S, dh))
                ctx.set_tensor_address(f"{kind}_cache_{layer}", base + off)
        for name in ("embedding", "new_k", "new_v"):
            ctx.set_tensor_address(name, self._dev[name])
        if not ctx.execute_async_v3(st):
            raise BackendError("TensorRT execute_async_v3 failed")
        if write:
            self._writer.launch(st)
        cuda.memcpy(self._host["embedding"].ptr, self._dev["embedding"],
                    n * self._row["embedding"], "d2h", st)

    def _capture(self, bucket: int) -> Any:
        """Warm up (TensorRT finishes deferred setup on the first enqueue), then capture.

        The warm-up runs the bucket's rows without the ring write, so it changes no state;
        the captured graph writes the rows the index table lists (its length is read on
        the device at every replay).
        """
        rt = self.cuda.rt
        self._enqueue(0, bucket, write=False)
        self.cuda("cudaStreamSynchronize", self._stream)
        self.cuda("cudaStreamBeginCapture", self._stream,
                  rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        self._enqueue(0, bucket, write=True)
        graph = self.cuda("cudaStreamEndCapture", self._stream)
        exe = self.cuda("cudaGraphInstantiate", graph, 0)
        self.cuda("cudaGraphDestroy", graph)  # the executable graph keeps what it needs
        return exe

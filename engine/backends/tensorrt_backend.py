"""TensorRT backend (TensorRT 10.x Python API + cuda-python), for NVIDIA GPUs.

Supported: TensorRT 10.x (``pyproject.toml`` pins ``tensorrt>=10,<11``); TensorRT 11 drops
``BuilderFlag.FP16`` (weak typing), which this backend builds with, and says so.

- **Engine**: built from the exported ONNX (step ABI 2, see ``engine/export.py``) with the
  FP16 flag and one optimisation profile over the batch axis (min 1, opt
  ``min(64, capacity)``, max ``capacity``). Building takes minutes, so serialized engines
  are cached in ``~/.cache/masa-rt/trt/`` under sha256(ONNX bytes, GPU name, compute
  capability, TensorRT version, precision, profile, workspace): any change to one of them
  builds a new engine, never loads a stale one; a cached file that does not deserialize
  is rebuilt. At start-up the engine's I/O tensors (names, direction, dtype) are checked
  against what this backend binds.
- **Rings on the device**, layer-major like the ONNX Runtime backend's: ``k, v (L, capacity,
  H, W-1, dh)`` float32 (``cudaMalloc``), each layer's block padded to a multiple of 256
  bytes, so every layer's cache of a slot span ``[a, b)`` is one contiguous block whose
  address goes straight to ``set_tensor_address`` (no gather; rows of the span that do
  not step are computed and ignored). TensorRT wants 256-byte aligned tensor addresses,
  so an eager span starts at the nearest slot at or below ``a`` whose offset is aligned
  (:func:`aligned_start`). The write pointers and valid masks live on the **host**
  (numpy): each step stages ``age`` (from the pointers) and ``valid`` of the span with the
  frames into pinned buffers (``cudaMallocHost``) and copies them up; the engine returns
  only the new keys/values ``(B, L, H, dh)``.
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
  and replayed with one ``cudaGraphLaunch``. A captured graph is tied to the shapes and
  addresses of the execution context it was captured with, so **each bucket has its own
  context**, bound once and never re-shaped, and the eager path has another. All contexts
  share one activation block (``USER_MANAGED``): they run one at a time on one stream. A
  bucket whose capture fails runs eagerly from then on (one warning).
- :meth:`TensorRTBackend.close` frees graphs, contexts, device and pinned memory, the
  kernel module and the stream.

GPU libraries are imported lazily; without them :class:`BackendUnavailable` says what to
install. Not exercised in CI (no GPU there): ``tests/test_tensorrt.py`` runs where one is.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
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

__all__ = ["TensorRTBackend", "aligned_start", "engine_cache_dir"]

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install -e .[gpu] (TensorRT 10.x from NVIDIA's index) and an NVIDIA GPU")
ALIGN = 256  # IExecutionContext::setTensorAddress: "at least 256-byte alignment"
WORKSPACE_BYTES = 1 << 30  # builder workspace pool limit (part of the engine cache key)
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
    // layers are %(lstride)d floats apart (padded to 256 bytes), slots contiguous inside
    const long long dst = layer * %(lstride)dLL
                          + ((slot * %(H)dLL + head) * %(S)dLL + ptr) * %(dh)dLL + e;
    k[dst] = nk[row * per + r];
    v[dst] = nv[row * per + r];
}
"""
_THREADS = 256
_UNSET = object()  # a bucket not captured yet (None: its capture failed, run it eagerly)
_LOGGER: tuple[Any, Any] | None = None  # (tensorrt module, its Logger)


def engine_cache_dir() -> Path:
    base = os.environ.get("MASA_RT_CACHE", str(Path.home() / ".cache" / "masa-rt"))
    return Path(base) / "trt"


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_start(a: int, row_bytes: int, align: int = ALIGN) -> int:
    """The largest slot ``a0 <= a`` whose offset ``a0 * row_bytes`` is a multiple of
    ``align``. Binding a span from ``a0`` instead of ``a`` keeps every layer's address
    aligned (layer blocks start on aligned offsets); the extra rows ``[a0, a)`` are
    computed and ignored like any other row of the span that does not step, so results
    stay exact. At most ``align // gcd(row_bytes, align) - 1`` rows are added."""
    step = align // math.gcd(row_bytes, align)
    return a - a % step


def _trt_logger(trt: Any) -> Any:
    """One ``trt.Logger`` per process, shared by Builder and Runtime: TensorRT needs a
    logger alive until every object made through it is released (and releases before 8.6
    treat it as a process-wide singleton), which a module-level one is."""
    global _LOGGER
    if _LOGGER is None or _LOGGER[0] is not trt:
        _LOGGER = (trt, trt.Logger(trt.Logger.WARNING))
    return _LOGGER[1]


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
    """The ring-write kernel (see module doc), compiled for this state's addresses.

    ``dims`` holds ``L, H, S, dh, cap`` and optionally ``lstride``, the distance between
    two layers' blocks in floats (default ``cap*H*S*dh``: unpadded)."""

    def __init__(self, cuda: _Cuda, addresses: dict[str, int], dims: dict[str, int]):
        driver, nvrtc = _import_driver()
        self.driver, self.module = driver, None
        _check(driver.cuInit(0), "cuInit")
        props = cuda("cudaGetDeviceProperties", cuda("cudaGetDevice"))
        dims = {"lstride": dims["cap"] * dims["H"] * dims["S"] * dims["dh"], **dims}
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

    def close(self) -> None:
        if self.module is not None:
            self.driver.cuModuleUnload(self.module)  # best effort: we are shutting down
            self.module = None


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


# -- engine: build, cache, check ------------------------------------------------------------


def _engine_key(onnx_bytes: bytes, cuda: _Cuda, trt: Any, fp16: bool,
                profile: tuple[int, int, int], workspace: int = WORKSPACE_BYTES) -> str:
    props = cuda("cudaGetDeviceProperties", cuda("cudaGetDevice"))
    gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    h = hashlib.sha256(onnx_bytes)
    h.update(f"|{gpu}|sm{props.major}{props.minor}|trt{trt.__version__}|fp16={fp16}|"
             f"profile={profile}|workspace={workspace}".encode())
    return h.hexdigest()[:32]


def _fp16_flag(trt: Any) -> Any:
    """``trt.BuilderFlag.FP16``, or a clear error where it is gone (TensorRT 11 removed
    weak typing and with it the precision flags)."""
    flag = getattr(getattr(trt, "BuilderFlag", None), "FP16", None)
    if flag is None:
        raise BackendError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no BuilderFlag.FP16 (weak "
            "typing was removed in TensorRT 11); the tensorrt backend supports TensorRT "
            "10.x: pip install 'tensorrt>=10,<11'")
    return flag


def _build_engine(trt: Any, onnx_bytes: bytes, fp16: bool, profile: tuple[int, int, int],
                  workspace: int = WORKSPACE_BYTES) -> bytes:
    """Parse the ONNX and build a serialized engine with one batch profile."""
    fp16_flag = _fp16_flag(trt) if fp16 else None  # fail before minutes of building
    builder = trt.Builder(_trt_logger(trt))
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, _trt_logger(trt))
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16_flag is not None:
        config.set_flag(fp16_flag)
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


def _load_engine(trt: Any, runtime: Any, cuda: _Cuda, onnx_path: Path, cache_dir: Path,
                 fp16: bool, profile: tuple[int, int, int]) -> Any:
    """The deserialized engine: from the cache, or built (and cached) when there is none or
    the cached file does not deserialize (truncated, or written by an incompatible build)."""
    from masa_rt.atomic import atomic_write

    data = onnx_path.read_bytes()
    path = cache_dir / f"{_engine_key(data, cuda, trt, fp16, profile)}.engine"
    if path.is_file():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is not None:
            return engine
        log.warning("cached TensorRT engine %s does not deserialize; rebuilding it", path)
    log.info("building TensorRT engine for %s (fp16=%s, batch %s); cached at %s",
             onnx_path, fp16, profile, path)
    blob = _build_engine(trt, data, fp16, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(blob)
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise BackendError(f"TensorRT could not deserialize the engine it just built ({path})")
    return engine


def _expected_io(trt: Any, num_layers: int) -> dict[str, tuple[Any, Any]]:
    """name -> (TensorIOMode, DataType) of every tensor the backend binds (step ABI 2)."""
    f32, i64 = trt.DataType.FLOAT, trt.DataType.INT64
    inp, out = trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT
    io = {"frame": (inp, f32), "age": (inp, i64), "valid": (inp, trt.DataType.BOOL)}
    for layer in range(num_layers):
        io[f"k_cache_{layer}"] = io[f"v_cache_{layer}"] = (inp, f32)
    io.update(embedding=(out, f32), new_k=(out, f32), new_v=(out, f32))
    return io


def _engine_io(engine: Any) -> dict[str, tuple[Any, Any]]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return {n: (engine.get_tensor_mode(n), engine.get_tensor_dtype(n)) for n in names}


def io_mismatches(want: dict[str, tuple[Any, Any]], have: dict[str, tuple[Any, Any]]
                  ) -> list[str]:
    """What differs between the I/O tensors the backend binds and the engine's."""
    problems = [f"{n}: missing from the engine" for n in want if n not in have]
    problems += [f"{n}: not bound by this backend" for n in have if n not in want]
    problems += [f"{n}: expected {_io_str(want[n])}, engine has {_io_str(have[n])}"
                 for n in want if n in have and have[n] != want[n]]
    return problems


def _io_str(io: tuple[Any, Any]) -> str:
    return " ".join(str(x).rsplit(".", 1)[-1] for x in io)


def _check_io(trt: Any, engine: Any, num_layers: int) -> None:
    problems = io_mismatches(_expected_io(trt, num_layers), _engine_io(engine))
    if problems:
        raise BackendError("TensorRT engine I/O does not match the step ABI this backend "
                           "binds (re-export the model; delete the cached engine): "
                           + "; ".join(problems))


def _require(ok: Any, call: str, name: str, value: Any) -> None:
    """TensorRT's setters return False (and log) instead of raising."""
    if not ok:
        raise BackendError(f"TensorRT {call}({name!r}, {value}) failed (see the TensorRT log)")


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
        self.cuda_graphs = cuda_graphs
        self._pool = SlotPool(capacity)
        S = self.info.cache_shape[2]
        self._ptr = np.zeros(capacity, dtype=np.int64)  # host: write pointers
        self._valid = np.zeros((capacity, S), dtype=bool)  # host: the valid masks
        self._age_table = ring_ages(S)
        # everything close() frees, empty until made (close() also cleans up a failed init)
        self._closed, self._warned_capture = False, False
        self._runtime = self._engine = self._eager_ctx = self._writer = self._stream = None
        self._contexts: list[Any] = []
        self._graphs: dict[int, Any] = {}  # bucket -> graph exec, or None: not capturable
        self._host: dict[str, _Pinned] = {}
        self._dev: dict[str, int] = {}
        self._k = self._v = self._scratch = self._scratch_size = 0
        try:
            self._open(Path(onnx_path), fp16,
                       Path(cache_dir) if cache_dir else engine_cache_dir())
        except BaseException:
            self.close()
            raise

    def _open(self, onnx_path: Path, fp16: bool, cache_dir: Path) -> None:
        trt, L = self.trt, self.info.num_layers
        profile = (1, min(64, self.capacity), self.capacity)
        self._runtime = trt.Runtime(_trt_logger(trt))
        self._engine = _load_engine(trt, self._runtime, self.cuda, onnx_path, cache_dir, fp16,
                                    profile)
        _check_io(trt, self._engine, L)
        self._stream = self.cuda("cudaStreamCreateWithFlags", self.cuda.rt.cudaStreamNonBlocking)
        self._alloc_buffers()
        _L, H, S, dh = self.info.cache_shape
        self._writer = _RingWriter(
            self.cuda,
            {"k": self._k, "v": self._v, "nk": self._dev["new_k"], "nv": self._dev["new_v"],
             "table": self._dev["table"], "count": self._dev["count"]},
            {"L": L, "H": H, "S": max(S, 1), "dh": dh, "cap": self.capacity,
             "lstride": self._layer_stride // 4})
        self._eager_ctx = self._new_context()  # re-shaped every eager step, never captured

    # -- memory ---------------------------------------------------------------------------

    def _alloc_buffers(self) -> None:
        cap, L, (_L, H, S, dh) = self.capacity, self.info.num_layers, self.info.cache_shape
        self._layer_row = H * S * dh * 4  # bytes of one slot's cache in one layer
        # layers start on 256-byte offsets, so aligned_start() aligns every layer's span
        self._layer_stride = round_up(cap * self._layer_row)
        ring = max(L * self._layer_stride, 1)
        for name in ("_k", "_v"):
            setattr(self, name, self._malloc(ring))
            self.cuda("cudaMemset", getattr(self, name), 0, ring)
        shapes = {"frame": ((cap, self.input_dim), np.float32),  # pinned staging, row per slot
                  "age": ((cap, max(S, 1)), np.int64), "valid": ((cap, max(S, 1)), np.bool_),
                  "table": ((cap, 3), np.int64), "count": ((1,), np.int32),
                  "embedding": ((cap, self.embed_dim), np.float32)}
        for name, (shape, dtype) in shapes.items():
            self._host[name] = _Pinned(self.cuda, shape, dtype)
            self._dev[name] = self._malloc(self._host[name].nbytes)
        self._row = {n: h.nbytes // h.array.shape[0] for n, h in self._host.items()}
        for name in ("new_k", "new_v"):
            self._dev[name] = self._malloc(cap * L * H * dh * 4)

    def _malloc(self, nbytes: int) -> int:
        """Device memory; cudaMalloc returns 256-byte aligned addresses (TensorRT's need)."""
        return int(self.cuda("cudaMalloc", max(nbytes, 1)))

    def state_nbytes(self) -> int:
        L = self.info.num_layers
        return 2 * L * self.capacity * self._layer_row + self._valid.nbytes + self._ptr.nbytes

    # -- execution contexts ---------------------------------------------------------------

    def _new_context(self) -> Any:
        """A fresh execution context. With the USER_MANAGED strategy every context runs on
        one shared activation block: TensorRT only forbids using it from contexts that run
        in parallel, and all of ours enqueue (or replay) one at a time on one stream.
        Without the strategy each context allocates its own (docs/engine.md: the cost)."""
        strategy = getattr(getattr(self.trt, "ExecutionContextAllocationStrategy", None),
                           "USER_MANAGED", None)
        ctx = (self._engine.create_execution_context() if strategy is None
               else self._engine.create_execution_context(strategy))
        if ctx is None:
            raise BackendError("TensorRT could not create an execution context "
                               "(out of device memory?)")
        self._contexts.append(ctx)
        if strategy is not None:
            self._share_scratch(ctx)
        return ctx

    def _share_scratch(self, ctx: Any) -> None:
        if not self._scratch:  # sized for the profile's largest batch: fits every context
            engine = self._engine
            self._scratch_size = int(engine.device_memory_size_v2
                                     if hasattr(engine, "device_memory_size_v2")  # >= 10.1
                                     else engine.device_memory_size)
            self._scratch = self._malloc(self._scratch_size)
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
            ctx.set_device_memory(self._scratch, self._scratch_size)
        else:
            ctx.device_memory = self._scratch

    def _bind(self, ctx: Any, a: int, n: int) -> None:
        """Shapes and addresses for rows [a, a+n) on ``ctx``, every return checked."""
        L, H, S, dh = self.info.cache_shape
        shapes = {"frame": (n, self.input_dim), "age": (n, S), "valid": (n, S)}
        addresses = {name: self._dev[name] for name in (*shapes, "embedding", "new_k", "new_v")}
        for layer in range(L):
            off = layer * self._layer_stride + a * self._layer_row
            for kind, base in (("k", self._k), ("v", self._v)):
                shapes[f"{kind}_cache_{layer}"] = (n, H, S, dh)
                addresses[f"{kind}_cache_{layer}"] = base + off
        for name, shape in shapes.items():
            _require(ctx.set_input_shape(name, shape), "set_input_shape", name, shape)
        for name, address in addresses.items():
            if address % ALIGN:  # aligned_start() and the layer padding rule this out
                raise BackendError(f"{name}: device address {address:#x} is not "
                                   f"{ALIGN}-byte aligned (TensorRT requires it)")
            _require(ctx.set_tensor_address(name, address), "set_tensor_address", name,
                     f"{address:#x}")

    # -- slots ----------------------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        self._require_open()
        s = np.asarray(slots, dtype=np.int64)
        self._valid[s] = False
        self._ptr[s] = 0
        for slot in s:  # zeros keep the masked slots finite
            for layer in range(self.info.num_layers):
                off = layer * self._layer_stride + int(slot) * self._layer_row
                for base in (self._k, self._v):
                    self.cuda("cudaMemsetAsync", base + off, 0, self._layer_row, self._stream)
        self.cuda("cudaStreamSynchronize", self._stream)

    # -- stepping -------------------------------------------------------------------------

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        self._require_open()
        s = self._pool.check(slots)
        f = check_frames(frames, len(s), self.input_dim)
        if len(s) == 0:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        dense = int(s.max()) + 1 == len(s) == self._pool.in_use
        exe = self._graph(s, f) if self.cuda_graphs and dense else None
        if exe is not None:
            self.cuda("cudaGraphLaunch", exe, self._stream)
            a = 0
        else:
            a = self._eager(s, f)
        self.cuda("cudaStreamSynchronize", self._stream)
        self._advance(s)
        return self._host["embedding"].array[s - a].copy()

    def _graph(self, s: np.ndarray, f: np.ndarray) -> Any:
        """The bucket's graph exec with the step staged, or None: run it eagerly."""
        bucket = min(1 << (len(s) - 1).bit_length(), self.capacity)
        exe = self._graphs.get(bucket, _UNSET)
        if exe is None:
            return None
        self._stage(0, bucket, s, f)
        if exe is _UNSET:
            exe = self._graphs[bucket] = self._capture(bucket)
        return exe

    def _eager(self, s: np.ndarray, f: np.ndarray) -> int:
        """The step over the span of ``s`` on the eager context; returns the span start."""
        a = aligned_start(int(s.min()), self._layer_row)
        n = int(s.max()) + 1 - a
        self._stage(a, n, s, f)
        self._bind(self._eager_ctx, a, n)
        self._enqueue(self._eager_ctx, n, write=True)
        return a

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

    def _enqueue(self, ctx: Any, n: int, write: bool) -> None:
        """H2D staging, the engine on ``ctx`` (already bound) over n rows, the ring write,
        D2H embeddings. Sets no shape or address: safe to capture."""
        cuda, st = self.cuda, self._stream
        for name in ("frame", "age", "valid", "table"):
            cuda.memcpy(self._dev[name], self._host[name].ptr, n * self._row[name], "h2d", st)
        cuda.memcpy(self._dev["count"], self._host["count"].ptr, 4, "h2d", st)
        if not ctx.execute_async_v3(int(st)):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        if write:
            self._writer.launch(st)
        cuda.memcpy(self._host["embedding"].ptr, self._dev["embedding"],
                    n * self._row["embedding"], "d2h", st)

    # -- CUDA graphs ----------------------------------------------------------------------

    def _capture(self, bucket: int) -> Any:
        """A graph exec of the whole step over rows [0, bucket), or None if capture fails.

        The bucket gets its own context, bound here once and never re-shaped: a captured
        graph holds that context's shapes and addresses. The warm-up enqueue (TensorRT
        finishes shape-dependent setup on the first one) skips the ring write, so it
        changes no state; the captured graph writes the rows the index table lists (its
        length is read on the device at every replay).
        """
        ctx = self._new_context()
        try:
            self._bind(ctx, 0, bucket)
            self._enqueue(ctx, bucket, write=False)
            self.cuda("cudaStreamSynchronize", self._stream)
            return self._record(ctx, bucket)
        except BackendError as exc:  # a failure not capture's own recurs on the eager path
            self._contexts.remove(ctx)  # never used again: let TensorRT free it
            level = logging.DEBUG if self._warned_capture else logging.WARNING
            self._warned_capture = True
            log.log(level, "TensorRT backend: CUDA graph capture failed for batch bucket %d "
                    "(%s); that bucket runs eagerly from now on", bucket, exc)
            return None

    def _record(self, ctx: Any, bucket: int) -> Any:
        rt = self.cuda.rt
        self.cuda("cudaStreamBeginCapture", self._stream,
                  rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        graph = None
        try:
            try:
                self._enqueue(ctx, bucket, write=True)
            finally:  # always leave capture mode: a stream left capturing fails every call
                err, graph = rt.cudaStreamEndCapture(self._stream)
            if err != rt.cudaError_t.cudaSuccess:
                raise BackendError(f"CUDA cudaStreamEndCapture failed: {err}")
            return self.cuda("cudaGraphInstantiate", graph, 0)
        finally:
            if graph is not None and int(graph):  # partial or whole: the exec keeps a copy
                rt.cudaGraphDestroy(graph)

    # -- teardown -------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise BackendError("the tensorrt backend is closed")

    def close(self) -> None:
        """Free graphs, contexts, the engine, device and pinned memory, the ring-write
        module and the stream. Idempotent; the backend is unusable afterwards. Errors are
        ignored: this also cleans up after a failed start-up."""
        if self._closed:
            return
        self._closed = True
        rt = self.cuda.rt
        if self._stream is not None:
            rt.cudaStreamSynchronize(self._stream)  # nothing in flight reads what we free
        for exe in self._graphs.values():
            if exe is not None:
                rt.cudaGraphExecDestroy(exe)
        self._graphs.clear()
        # TensorRT frees an object with its last Python reference: contexts before the
        # engine before the runtime (the order TensorRT requires)
        self._eager_ctx = None
        self._contexts.clear()
        self._engine = self._runtime = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for ptr in (self._k, self._v, self._scratch, *self._dev.values()):
            if ptr:
                rt.cudaFree(ptr)
        for pinned in self._host.values():  # drop the numpy views with the memory
            rt.cudaFreeHost(pinned.ptr)
        self._host, self._dev, self._k, self._v, self._scratch = {}, {}, 0, 0, 0
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

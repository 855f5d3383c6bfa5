"""TensorRT backend (TensorRT 10 Python API + cuda-python), for NVIDIA GPUs.

- **Engine**: built from the exported ONNX with the FP16 flag and one optimisation profile
  over the batch axis (min 1, opt ``min(64, capacity)``, max ``capacity``). Building takes
  minutes, so serialized engines are cached in ``~/.cache/masa-rt/trt/`` under
  sha256(ONNX bytes, GPU name, compute capability, TensorRT version, precision, profile):
  any change to one of them builds a new engine, never loads a stale one.
- **State on the device**, slot-major like the ONNX I/O: keys/values/valid for ``capacity``
  streams (``cudaMalloc``) plus an equally sized output area. A step over the slot span
  ``[a, b)`` reads the state rows in place (their addresses go straight to
  ``set_tensor_address``), writes the new state into the output area, and copies back only
  the rows of streams that really stepped (one device-to-device copy per run of
  consecutive slots; rows in the span that did not step keep their state). Frames and
  embeddings go through pinned host buffers (``cudaMallocHost``) on one CUDA stream.
- **CUDA graphs**: when the stepping streams are exactly slots ``0..n-1`` and no other slot
  is live (all streams step together, the common case in a server), the whole step (H2D
  frames, ``execute_async_v3``, state copy-back, D2H embeddings) is captured once per
  batch-size bucket (n padded up to a power of two; padded rows are free slots, whose state
  is rebuilt on ``allocate``) after a warm-up, and replayed with one ``cudaGraphLaunch``.

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
    SlotPool,
    check_frames,
    read_model_info,
)

__all__ = ["TensorRTBackend", "engine_cache_dir"]

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install -e .[gpu] (TensorRT from NVIDIA's index) and an NVIDIA GPU")
_STATE = ("k_cache", "v_cache", "valid")
_STATE_OUT = {"k_cache": "k_cache_out", "v_cache": "v_cache_out", "valid": "valid_out"}


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


class TensorRTBackend:
    """``Backend`` over a TensorRT engine with device-resident state (see module doc)."""

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
        self._alloc_buffers()
        self._graphs: dict[int, Any] = {}
        self.cuda_graphs = cuda_graphs

    # -- memory ---------------------------------------------------------------------------

    def _row_nbytes(self, name: str) -> int:
        shape = self._engine.get_tensor_shape(name)  # -1 on the batch axis
        itemsize = np.dtype(self.trt.nptype(self._engine.get_tensor_dtype(name))).itemsize
        return int(np.prod(tuple(shape)[1:])) * itemsize

    def _alloc_buffers(self) -> None:
        cap, malloc = self.capacity, (lambda n: int(self.cuda("cudaMalloc", n)))
        self._row = {n: self._row_nbytes(n) for n in (*_STATE, "frame", "embedding")}
        self._state = {n: malloc(cap * self._row[n]) for n in _STATE}
        self._out = {n: malloc(cap * self._row[n]) for n in _STATE}
        self._frames_dev = malloc(cap * self._row["frame"])
        self._emb_dev = malloc(cap * self._row["embedding"])
        self._frames_host = _Pinned(self.cuda, (cap, self.input_dim), np.float32)
        self._emb_host = _Pinned(self.cuda, (cap, self.embed_dim), np.float32)
        for n in _STATE:
            self.cuda("cudaMemset", self._state[n], 0, cap * self._row[n])

    def state_nbytes(self) -> int:
        return 2 * self.capacity * sum(self._row[n] for n in _STATE)

    # -- slots ----------------------------------------------------------------------------

    def allocate(self) -> int:
        slot = self._pool.take()
        self.reset(np.array([slot]))
        return slot

    def release(self, slot: int) -> None:
        self._pool.give_back(slot)

    def reset(self, slots: np.ndarray) -> None:
        for s in np.asarray(slots, dtype=np.int64):
            for n in _STATE:
                self.cuda("cudaMemsetAsync", self._state[n] + int(s) * self._row[n], 0,
                          self._row[n], self._stream)
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
            return self._step_graph(s, f, bucket)
        return self._step_span(s, f)

    def _stage(self, a: int, b: int, slots: np.ndarray, frames: np.ndarray) -> None:
        """Frames of the span [a, b) into pinned memory; rows that do not step get zeros."""
        host = self._frames_host.array
        host[a:b] = 0.0
        host[slots] = frames

    def _enqueue(self, a: int, b: int, runs: list[tuple[int, int]]) -> None:
        """H2D frames, the engine over rows [a, b), copy-back of ``runs``, D2H embeddings."""
        cuda, st, n = self.cuda, self._stream, b - a
        rf, re = self._row["frame"], self._row["embedding"]
        cuda.memcpy(self._frames_dev + a * rf, self._frames_host.ptr + a * rf, n * rf, "h2d", st)
        ctx = self._context
        ctx.set_input_shape("frame", (n, self.input_dim))
        ctx.set_tensor_address("frame", self._frames_dev + a * rf)
        for name in _STATE:
            ctx.set_input_shape(name, (n, *tuple(self._engine.get_tensor_shape(name))[1:]))
            ctx.set_tensor_address(name, self._state[name] + a * self._row[name])
            ctx.set_tensor_address(_STATE_OUT[name], self._out[name])
        ctx.set_tensor_address("embedding", self._emb_dev + a * re)
        if not ctx.execute_async_v3(st):
            raise BackendError("TensorRT execute_async_v3 failed")
        for r0, r1 in runs:
            for name in _STATE:
                row = self._row[name]
                cuda.memcpy(self._state[name] + r0 * row, self._out[name] + (r0 - a) * row,
                            (r1 - r0) * row, "d2d", st)
        cuda.memcpy(self._emb_host.ptr + a * re, self._emb_dev + a * re, n * re, "d2h", st)

    def _step_span(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        a, b = int(slots.min()), int(slots.max()) + 1
        self._stage(a, b, slots, frames)
        self._enqueue(a, b, _runs(np.sort(slots)))
        self.cuda("cudaStreamSynchronize", self._stream)
        return self._emb_host.array[slots].copy()

    def _step_graph(self, slots: np.ndarray, frames: np.ndarray, bucket: int) -> np.ndarray:
        """Slots are 0..n-1 (any order) and nothing else is live: replay the bucket's graph."""
        self._stage(0, bucket, slots, frames)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._graphs[bucket] = self._capture(bucket)
        self.cuda("cudaGraphLaunch", graph, self._stream)
        self.cuda("cudaStreamSynchronize", self._stream)
        return self._emb_host.array[slots].copy()

    def _capture(self, bucket: int) -> Any:
        """Warm up (TensorRT finishes deferred setup on the first enqueue), then capture.

        The warm-up runs the bucket's rows without copying state back, so it changes
        nothing; the captured graph copies back all ``bucket`` rows (the padded ones are
        free slots).
        """
        rt = self.cuda.rt
        self._enqueue(0, bucket, runs=[])
        self.cuda("cudaStreamSynchronize", self._stream)
        self.cuda("cudaStreamBeginCapture", self._stream,
                  rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        self._enqueue(0, bucket, runs=[(0, bucket)])
        graph = self.cuda("cudaStreamEndCapture", self._stream)
        exe = self.cuda("cudaGraphInstantiate", graph, 0)
        self.cuda("cudaGraphDestroy", graph)  # the executable graph keeps what it needs
        return exe


def _runs(sorted_slots: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive slots as half-open ranges: [0,1,2,5] -> [(0,3), (5,6)]."""
    breaks = np.flatnonzero(np.diff(sorted_slots) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(sorted_slots)]])
    return [(int(sorted_slots[i]), int(sorted_slots[j - 1]) + 1)
            for i, j in zip(starts, ends, strict=True)]

"""ONNX Runtime backend: the CPU default, no torch.

State lives in preallocated numpy arrays, slot-major, twice over (ping-pong)::

    k[2, capacity, L, H, W-1, dh]   v[same]   valid[2, capacity, W-1]   parity[capacity]

``parity[s]`` says which of the two copies holds slot ``s``'s current state. A step binds
the current copy as the graph's input and the other copy as its output (ONNX Runtime
I/O binding with raw pointers, so it reads and writes our memory directly), then flips the
parity: the cache is never copied by us, only by the graph itself (its shift-by-concat).

That zero-copy path needs the batch to be a view: a contiguous slot range whose slots share
one parity. The lowest-free-slot allocation makes "all live streams" such a range. Any
other batch is gathered into scratch arrays and scattered back, which costs one read and
one write of the active rows' caches: ``2 * L * H * (W-1) * dh * 4`` bytes per stream each
way (127 KB per stream for the shipped d=128, L=4, W=32 model; ~2 ms for 256 streams on
this CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.backends.base import (
    BackendError,
    ModelInfo,
    SlotPool,
    check_frames,
    contiguous_range,
    read_model_info,
)

__all__ = ["OnnxRuntimeBackend"]


def _session(path: Path, threads: int, providers: list[str] | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class OnnxRuntimeBackend:
    """``Backend`` over an ONNX Runtime session with state kept in place (see module doc)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, capacity: int = 256, *,
                 intra_op_threads: int = 1, providers: list[str] | None = None):
        self.info: ModelInfo = read_model_info(onnx_path)
        self.input_dim, self.embed_dim = self.info.input_dim, self.info.embed_dim
        self.capacity = capacity
        self._pool = SlotPool(capacity)
        self._session = _session(self.info.path, intra_op_threads, providers)
        self._io = self._session.io_binding()
        cache = (2, capacity, *self.info.cache_shape)
        self._k = np.zeros(cache, dtype=np.float32)
        self._v = np.zeros(cache, dtype=np.float32)
        self._valid = np.zeros((2, capacity, self.info.window - 1), dtype=bool)
        self._parity = np.zeros(capacity, dtype=np.int8)
        self._scratch: dict[str, np.ndarray] = {}
        self.rows_copied = 0  # rows gathered+scattered so far (the slow path), for stats

    # -- slots ----------------------------------------------------------------------------

    def allocate(self) -> int:
        slot = self._pool.take()
        self.reset(np.array([slot]))
        return slot

    def release(self, slot: int) -> None:
        self._pool.give_back(slot)

    def reset(self, slots: np.ndarray) -> None:
        s = np.asarray(slots, dtype=np.int64)
        self._valid[:, s] = False  # the model masks invalid slots; zeros keep them finite
        self._k[:, s] = 0.0
        self._v[:, s] = 0.0

    def state_nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes + self._valid.nbytes

    # -- stepping -------------------------------------------------------------------------

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        s = self._pool.check(slots)
        f = check_frames(frames, len(s), self.input_dim)
        emb = np.empty((len(s), self.embed_dim), dtype=np.float32)
        if len(s) == 0:
            return emb
        span = contiguous_range(s)
        p = int(self._parity[s[0]])
        if span is not None and bool(np.all(self._parity[s] == p)):
            self._step_view(span, p, f, emb)
        else:
            self._step_gathered(s, f, emb)
        return emb

    def _step_view(self, span: tuple[int, int], p: int, frames: np.ndarray,
                   emb: np.ndarray) -> None:
        """Zero-copy: read copy ``p`` of the range, write copy ``1-p``, flip parity."""
        a, b = span
        q = 1 - p
        self._run(frames, (self._k[p, a:b], self._v[p, a:b], self._valid[p, a:b]),
                  (emb, self._k[q, a:b], self._v[q, a:b], self._valid[q, a:b]))
        self._parity[a:b] = q

    def _step_gathered(self, s: np.ndarray, frames: np.ndarray, emb: np.ndarray) -> None:
        """Gather the rows into scratch, run, scatter the new state back in place."""
        n = len(s)
        k_in, v_in, ok_in = self._buffer("k_in", n), self._buffer("v_in", n), self._buffer(
            "ok_in", n)
        k_out, v_out, ok_out = self._buffer("k_out", n), self._buffer("v_out", n), self._buffer(
            "ok_out", n)
        par = self._parity[s]
        for p in (0, 1):
            rows = par == p
            k_in[rows], v_in[rows], ok_in[rows] = (
                self._k[p, s[rows]], self._v[p, s[rows]], self._valid[p, s[rows]])
        self._run(frames, (k_in, v_in, ok_in), (emb, k_out, v_out, ok_out))
        for p in (0, 1):
            rows = par == p
            self._k[p, s[rows]], self._v[p, s[rows]] = k_out[rows], v_out[rows]
            self._valid[p, s[rows]] = ok_out[rows]
        self.rows_copied += n

    def _buffer(self, key: str, n: int) -> np.ndarray:
        """The first ``n`` rows of a scratch array, grown by doubling (never per call)."""
        arr = self._scratch.get(key)
        if arr is None or arr.shape[0] < n:
            rows = max(n, 2 * (arr.shape[0] if arr is not None else 8))
            rows = min(rows, self.capacity)
            if key.startswith("ok"):
                arr = np.zeros((rows, self.info.window - 1), dtype=bool)
            else:
                arr = np.zeros((rows, *self.info.cache_shape), dtype=np.float32)
            self._scratch[key] = arr
        return arr[:n]

    def _run(self, frames: np.ndarray, state_in: tuple[np.ndarray, ...],
             outputs: tuple[np.ndarray, ...]) -> None:
        """Bind our arrays' memory as the graph's inputs and outputs and run it."""
        io = self._io
        for name, arr in zip(("frame", "k_cache", "v_cache", "valid"), (frames, *state_in),
                             strict=True):
            _bind(io.bind_input, name, arr)
        for name, arr in zip(("embedding", "k_cache_out", "v_cache_out", "valid_out"), outputs,
                             strict=True):
            _bind(io.bind_output, name, arr)
        self._session.run_with_iobinding(io)


def _bind(bind, name: str, arr: np.ndarray) -> None:
    if not arr.flags.c_contiguous:
        raise BackendError(f"internal: {name} is not contiguous")  # views are by construction
    bind(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)

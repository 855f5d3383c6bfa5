"""ONNX Runtime backend: the CPU default, no torch.

State lives in preallocated numpy arrays, one ring of ``S = W-1`` slots per stream and
layer, layer-major so that every layer's cache of a contiguous slot range is one contiguous
block (the graph takes one cache input per layer, step ABI 2, see ``engine/export.py``)::

    k[L, capacity, H, S, dh]   v[same]   valid[capacity, S]   ptr[capacity]

A step binds the caches **in place** as read-only inputs (ONNX Runtime I/O binding with raw
pointers) and gets back only the new frame's keys/values ``(B, L, H, dh)``; the backend
then writes them into ring slot ``ptr`` of each stream (one numpy fancy assignment of
``B*L*H*dh`` floats per tensor), marks the slot valid and advances ``ptr``. ``age`` (frames
since each slot was written, which selects the relative position bias) is a row of a small
``(S, S)`` table indexed by ``ptr``. The cache is read once per step and written 1/S of
it: no copies of it by the graph or by us.

Zero-copy needs the batch's slots, once sorted, to be a contiguous range (any order is
fine: frames and embeddings are permuted, they are small). The lowest-free-slot allocation
makes "all live streams" such a range. Any other batch has its caches gathered into
scratch arrays first: one read and one write of the active rows' caches (nothing is
scattered back any more: the ring write is the same in both paths). Outputs go to
preallocated buffers; the I/O bindings of recent batch shapes are kept and reused.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.backends.base import (
    BackendError,
    ModelInfo,
    PooledSlots,
    SlotPool,
    check_frames,
    read_model_info,
    ring_ages,
)

__all__ = ["OnnxRuntimeBackend", "default_threads"]

_MAX_BINDINGS = 64  # cached I/O bindings (one per recent batch shape)


def default_threads() -> int:
    """ONNX Runtime intra-op threads by default: 1.

    Measured on the 2-core development machine (docs/engine.md): a second thread does not
    pay for itself below ~64 streams and competes with the aligner, which runs in the same
    process between encoder calls. ``MASA_RT_ORT_THREADS`` overrides it.
    """
    return max(1, int(os.environ.get("MASA_RT_ORT_THREADS", "1")))


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_mem_pattern = True  # fixed intermediate layout per input shape
    opts.enable_cpu_mem_arena = True
    if threads > 1:  # do not spin between steps on cores the aligner needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxRuntimeBackend(PooledSlots):
    """``Backend`` over an ONNX Runtime session with state kept in place (see module doc)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, capacity: int = 256, *,
                 intra_op_threads: int | None = None, providers: list[str] | None = None):
        self.info: ModelInfo = read_model_info(onnx_path)
        self.input_dim, self.embed_dim = self.info.input_dim, self.info.embed_dim
        self.capacity = capacity
        self.threads = intra_op_threads or default_threads()
        self._pool = SlotPool(capacity)
        self._session = ort.InferenceSession(
            str(self.info.path), session_options(self.threads),
            providers=providers or ["CPUExecutionProvider"])
        L, H, S, dh = self.info.cache_shape
        self._k = np.zeros((L, capacity, H, S, dh), dtype=np.float32)
        self._v = np.zeros_like(self._k)
        self._valid = np.zeros((capacity, S), dtype=bool)
        self._ptr = np.zeros(capacity, dtype=np.int64)
        self._age_table = ring_ages(S)  # (S, S): ages of the slots given ptr
        # ring row (of dh floats) of (layer, head) for slot 0, pointer 0: (L, H)
        self._ring_row = ((np.arange(L)[:, None] * capacity * H + np.arange(H)[None, :]) * S
                          ).astype(np.int64)
        # per-call buffers, full capacity, allocated once: a batch of n uses the first n rows
        self._frames = np.zeros((capacity, self.input_dim), dtype=np.float32)
        self._age = np.ones((capacity, S), dtype=np.int64)
        self._emb = np.zeros((capacity, self.embed_dim), dtype=np.float32)
        self._new_k = np.zeros((capacity, L, H, dh), dtype=np.float32)
        self._new_v = np.zeros_like(self._new_k)
        self._gathered: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # lazily
        self._bindings: OrderedDict[tuple, ort.IOBinding] = OrderedDict()
        self.rows_copied = 0  # rows gathered so far (the slow path), for stats

    # -- slots ----------------------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        s = np.asarray(slots, dtype=np.int64)
        self._valid[s] = False  # the model masks invalid slots; zeros keep them finite
        self._ptr[s] = 0
        self._k[:, s] = 0.0
        self._v[:, s] = 0.0

    def state_nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes + self._valid.nbytes + self._ptr.nbytes

    # -- stepping -------------------------------------------------------------------------

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        s = self._pool.check(slots)
        f = check_frames(frames, len(s), self.input_dim)
        n = len(s)
        if n == 0:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        order = None if n == 1 or bool(np.all(s[1:] > s[:-1])) else np.argsort(s)
        if order is None:
            ss = s
            self._frames[:n] = f
        else:
            ss = s[order]
            np.take(f, order, axis=0, out=self._frames[:n])
        ptr = self._ptr[ss]
        np.take(self._age_table, ptr, axis=0, out=self._age[:n])
        a = int(ss[0])
        if int(ss[-1]) - a == n - 1:  # a contiguous range: bind the state itself
            io = self._binding(("view", a, a + n))
        else:
            io = self._binding(("gather", n))
            self._gather(ss)
        self._session.run_with_iobinding(io)
        self._write(ss, ptr, n)
        if order is None:
            return self._emb[:n].copy()
        emb = np.empty((n, self.embed_dim), dtype=np.float32)
        emb[order] = self._emb[:n]
        return emb

    def _write(self, ss: np.ndarray, ptr: np.ndarray, n: int) -> None:
        """The new keys/values into each stream's ring at its pointer, which advances."""
        S = self._valid.shape[1]
        if S == 0:
            return
        if n == 1:  # plain strided views: no index arrays to build
            s0, p0 = int(ss[0]), int(ptr[0])
            self._k[:, s0, :, p0] = self._new_k[0]
            self._v[:, s0, :, p0] = self._new_v[0]
        else:  # rows of dh floats: ring row ((layer * capacity + slot) * H + head) * S + ptr
            H, dh = self._k.shape[2], self._k.shape[-1]
            rows = (self._ring_row[None] + (ss * (H * S) + ptr)[:, None, None]).reshape(-1)
            self._k.reshape(-1, dh)[rows] = self._new_k[:n].reshape(-1, dh)
            self._v.reshape(-1, dh)[rows] = self._new_v[:n].reshape(-1, dh)
        self._valid[ss, ptr] = True
        self._ptr[ss] = (ptr + 1) % S

    def _gather(self, ss: np.ndarray) -> None:
        """Copies of the rows' caches and valid masks into the scratch the binding reads."""
        n = len(ss)
        kg, vg, okg = self._gather_scratch()
        for layer in range(self._k.shape[0]):
            np.take(self._k[layer], ss, axis=0, out=kg[layer, :n])
            np.take(self._v[layer], ss, axis=0, out=vg[layer, :n])
        np.take(self._valid, ss, axis=0, out=okg[:n])
        self.rows_copied += n

    def _gather_scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._gathered is None:  # as large as the state: only made if ever needed
            self._gathered = (np.zeros_like(self._k), np.zeros_like(self._v),
                              np.zeros_like(self._valid))
        return self._gathered

    def _binding(self, key: tuple) -> ort.IOBinding:
        """The I/O binding for a batch shape: ``("view", a, b)`` binds the state rows
        ``[a, b)``, ``("gather", n)`` the first n rows of the gather scratch. Every buffer
        address is fixed per key, so a binding is made once and reused."""
        io = self._bindings.get(key)
        if io is not None:
            self._bindings.move_to_end(key)
            return io
        if key[0] == "view":
            a, b = key[1], key[2]
            k, v, ok = self._k[:, a:b], self._v[:, a:b], self._valid[a:b]
        else:
            a, b = 0, key[1]
            kg, vg, okg = self._gather_scratch()
            k, v, ok = kg[:, :b], vg[:, :b], okg[:b]
        n = b - a
        io = self._session.io_binding()
        _bind(io.bind_input, "frame", self._frames[:n])
        for layer in range(k.shape[0]):
            _bind(io.bind_input, f"k_cache_{layer}", k[layer])
            _bind(io.bind_input, f"v_cache_{layer}", v[layer])
        _bind(io.bind_input, "age", self._age[:n])
        _bind(io.bind_input, "valid", ok)
        _bind(io.bind_output, "embedding", self._emb[:n])
        _bind(io.bind_output, "new_k", self._new_k[:n])
        _bind(io.bind_output, "new_v", self._new_v[:n])
        self._bindings[key] = io
        if len(self._bindings) > _MAX_BINDINGS:
            self._bindings.popitem(last=False)
        return io


def _bind(bind, name: str, arr: np.ndarray) -> None:
    if not arr.flags.c_contiguous:
        raise BackendError(f"internal: {name} is not contiguous")  # views are by construction
    bind(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)

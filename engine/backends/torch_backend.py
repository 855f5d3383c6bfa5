"""torch backend: the reference implementation of the step, on CPU or CUDA.

It runs the same ``StreamingEncoder`` step that ``engine.export`` exports (step ABI 2,
ring-buffer caches), from the checkpoint whose fingerprint the ONNX file names (so "same
model" is checked, not assumed). State on the device, like the ONNX Runtime backend's:
rings ``k, v (L, capacity + 1, H, W-1, dh)``, ``valid (capacity + 1, W-1)`` and write
pointers ``ptr (capacity + 1,)``; row ``capacity`` is a dump row that padded batch rows
read and write, so a fixed-size CUDA graph can serve any batch.

A step gathers the active rows' caches (``index_select``), runs the step, and writes the
new keys/values into ring slot ``ptr`` of each row (``index_put_`` of ``B*L*H*dh``
floats), marks it valid and advances ``ptr``: all on the device, no host sync. On CUDA
with ``cuda_graphs=True`` each batch-size bucket (powers of two up to capacity) is
captured once after a warm-up and replayed as one graph launch, with slot indices and
frames written into the graph's static input tensors. Without graphs (or on CPU) the same
body runs eagerly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.backends.base import (
    BackendError,
    BackendUnavailable,
    PooledSlots,
    SlotPool,
    check_frames,
    read_model_info,
)

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is a dependency, but be clear
    raise BackendUnavailable("the torch backend needs torch (pip install -e .)") from exc

__all__ = ["TorchBackend"]


class TorchBackend(PooledSlots):
    """``Backend`` over ``SlotMajorStep`` in torch (see module docstring)."""

    name = "torch"

    def __init__(self, onnx_path: str | Path, capacity: int = 256, *,
                 checkpoint: str | Path | None = None, device: str = "cpu",
                 cuda_graphs: bool = False):
        from masa_rt.checkpoint import load_model
        from masa_rt.model import StreamingEncoder

        if device.startswith("cuda") and not torch.cuda.is_available():
            # Before loading: map_location='cuda' without a GPU reads as a corrupt file.
            raise BackendUnavailable(f"torch backend: --device {device} asked for, but torch "
                                     "sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.info = read_model_info(onnx_path)
        model, _cfg, _spec, meta = load_model(checkpoint, map_location=device)
        if meta.get("model_fingerprint") != self.info.fingerprint:
            raise BackendError(f"the torch backend runs a checkpoint, and {meta['path']} is "
                               f"model {meta.get('model_fingerprint')} while {onnx_path} is "
                               f"model {self.info.fingerprint}: pass the checkpoint (.pt or "
                               "run folder) as --model instead of its .onnx export")
        self.device = torch.device(device)
        self.encoder = StreamingEncoder(model).eval().to(self.device)
        self.input_dim, self.embed_dim = self.info.input_dim, self.info.embed_dim
        self.capacity = capacity
        self._pool = SlotPool(capacity)
        L, H, S, dh = self.info.cache_shape
        rows = capacity + 1  # + dump row for padding
        self._k = torch.zeros(L, rows, H, S, dh, device=self.device)
        self._v = torch.zeros_like(self._k)
        self._valid = torch.zeros(rows, S, dtype=torch.bool, device=self.device)
        self._ptr = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._graphs: dict[int, _Graph] = {}
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"

    def reset(self, slots: np.ndarray) -> None:
        idx = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)
        self._valid[idx] = False
        self._ptr[idx] = 0
        self._k[:, idx] = 0.0
        self._v[:, idx] = 0.0

    def state_nbytes(self) -> int:
        return self.capacity * self.info.slot_nbytes

    @torch.no_grad()
    def _body(self, idx: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Gather rows ``idx``, step, write the new keys/values into the rings; returns the
        embeddings."""
        ptr = self._ptr.index_select(0, idx)
        u, k_new, v_new = self.encoder(
            frames, [k.index_select(0, idx) for k in self._k],
            [v.index_select(0, idx) for v in self._v], self.encoder.ages(ptr),
            self._valid.index_select(0, idx))
        if self.encoder.slots:
            self._k[:, idx, :, ptr] = k_new  # advanced indices first: (B, L, H, dh)
            self._v[:, idx, :, ptr] = v_new
            self._valid[idx, ptr] = self._true  # a device scalar: no host copy in a graph
            self._ptr[idx] = (ptr + 1) % self.encoder.slots
        return u

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        s = self._pool.check(slots)
        f = check_frames(frames, len(s), self.input_dim)
        if len(s) == 0:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        if self.cuda_graphs:
            return self._graph(len(s)).run(s, f)
        idx = torch.as_tensor(s, device=self.device)
        u = self._body(idx, torch.as_tensor(f, device=self.device))
        return u.float().cpu().numpy()

    def _graph(self, n: int) -> _Graph:
        bucket = 1 << (n - 1).bit_length()
        if bucket not in self._graphs:
            self._graphs[bucket] = _Graph(self, min(bucket, self.capacity))
        return self._graphs[bucket]


class _Graph:
    """One captured CUDA graph of ``_body`` for a fixed padded batch size."""

    def __init__(self, backend: TorchBackend, size: int):
        self.backend, self.size = backend, size
        dev = backend.device
        self.dump = backend.capacity
        self.idx = torch.full((size,), self.dump, dtype=torch.int64, device=dev)
        self.frames = torch.zeros(size, backend.input_dim, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up touches only the dump row
            for _ in range(3):
                backend._body(self.idx, self.frames)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = backend._body(self.idx, self.frames)

    def run(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        n = len(slots)
        self.idx.fill_(self.dump)
        self.idx[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        self.frames[:n].copy_(torch.from_numpy(frames), non_blocking=True)
        self.graph.replay()
        return self.out[:n].float().cpu().numpy()

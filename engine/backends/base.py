"""The one small interface every encoder backend implements, and what they share.

A backend runs the exported one-frame step (``engine.export``, step ABI 2) for many streams
at once and **owns the per-stream state** (key/value rings, write pointers and the valid
mask) for up to ``capacity`` slots. Callers hand over slot indices and frames and get
embeddings back; the caches never cross the Python boundary per call, so a step costs what
the model costs plus the ring write of the new keys/values and, for a batch that is not a
contiguous slot range, one gather of the active rows (see ``docs/engine.md``).

No torch here: this module is on the serving path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CapacityError",
    "ModelInfo",
    "SlotPool",
    "contiguous_range",
    "read_model_info",
    "ring_ages",
]

STEP_ABI = 2  # the step signature these backends run (engine.export.STEP_ABI)


class BackendError(RuntimeError):
    """A backend was used wrongly (unknown slot, bad frame shape) or failed."""

    user_facing = True  # masa_rt.cli prints it as one line: it names what to install or fix


class BackendUnavailable(BackendError):
    """The backend's runtime (TensorRT, CUDA, torch) is not installed or has no device."""


class CapacityError(BackendError):
    """Every slot is taken: the server is at the number of streams it was sized for."""


@runtime_checkable
class Backend(Protocol):
    """What the stream bank needs from an encoder backend."""

    name: str
    input_dim: int  # D_in, one frame's model input
    embed_dim: int  # d
    capacity: int  # most streams whose state the backend holds

    def allocate(self) -> int:
        """A free slot with an empty (reset) state; raises ``CapacityError`` when full."""
        ...

    def release(self, slot: int) -> None:
        """Give a slot back; its state is dropped."""
        ...

    def reset(self, slots: np.ndarray) -> None:
        """Forget the history of these slots (the next frame starts a fresh window)."""
        ...

    def step(self, slots: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """One frame for each slot: ``slots`` (B,) int, ``frames`` (B, D_in) float32 ->
        embeddings (B, d) float32 (a new array, safe to keep). Slots must be distinct."""
        ...

    def state_nbytes(self) -> int:
        """Bytes of per-stream state held for all ``capacity`` slots (constant)."""
        ...

    def close(self) -> None:
        """Free what the garbage collector cannot (device memory, CUDA graphs); idempotent.
        A no-op for the CPU backends."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """What an exported step model says about itself (ONNX ``metadata_props`` + shapes)."""

    path: Path
    fingerprint: str
    input_spec: dict[str, Any]
    masa_config: dict[str, Any]
    window: int
    num_layers: int
    num_heads: int
    head_dim: int
    input_dim: int
    embed_dim: int

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        """One slot's key (or value) ring over all layers: (L, H, W-1, dh)."""
        return (self.num_layers, self.num_heads, self.window - 1, self.head_dim)

    @property
    def slot_nbytes(self) -> int:
        """Bytes of state per stream: keys + values (float32), the valid row, the write
        pointer (int64)."""
        return 2 * 4 * int(np.prod(self.cache_shape)) + (self.window - 1) + 8


def read_model_info(path: str | Path) -> ModelInfo:
    """Metadata and cache geometry of an ONNX step model written by ``engine.export``."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError types
        raise BackendError(f"{p}: not an ONNX model ({type(exc).__name__}); export one "
                           "with masa-rt export") from None
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    missing = [k for k in ("masa_config", "input_spec", "model_fingerprint") if k not in meta]
    if missing:
        raise BackendError(f"{p}: not a masa-rt step model (metadata {missing} missing); "
                           "export one with masa-rt export")
    abi = meta.get("step_abi", "1")
    if abi != str(STEP_ABI):
        raise BackendError(f"{p}: step ABI {abi}, this engine runs ABI {STEP_ABI} (ring "
                           "buffer caches): re-export it with masa-rt export")
    cfg = json.loads(meta["masa_config"])
    return ModelInfo(
        path=p,
        fingerprint=meta["model_fingerprint"],
        input_spec=json.loads(meta["input_spec"]),
        masa_config=cfg,
        window=int(cfg["window"]),
        num_layers=sum(1 for v in proto.graph.input if v.name.startswith("k_cache_")),
        num_heads=int(cfg["n_heads"]),
        head_dim=int(cfg["d_model"]) // int(cfg["n_heads"]),
        input_dim=_input_dim(proto),
        embed_dim=int(cfg["d_model"]),
    )


def _graph_input(proto: Any, name: str) -> Any:
    for value in proto.graph.input:
        if value.name == name:
            return value
    raise BackendError(f"step model has no input {name!r}")


def _input_dim(proto: Any) -> int:
    return int(_graph_input(proto, "frame").type.tensor_type.shape.dim[1].dim_value)


def ring_ages(slots: int) -> np.ndarray:
    """``(S, S)`` int64 table: row ``p`` = the ages of ring slots ``0..S-1`` when the write
    pointer is ``p`` (slot ``p-1`` was written 1 frame ago, slot ``p``, the next to be
    overwritten, ``S`` frames ago). Same as ``StreamingEncoder.ages``."""
    p, j = np.arange(slots)[:, None], np.arange(slots)[None, :]
    return ((p - j - 1) % max(slots, 1) + 1).astype(np.int64)


def contiguous_range(slots: np.ndarray) -> tuple[int, int] | None:
    """``(a, b)`` when ``slots`` is exactly ``a, a+1, ..., b-1``; else None.

    Such a batch is a view of slot-major state: no gather, no scatter.
    """
    n = len(slots)
    if n == 0:
        return None
    a = int(slots[0])
    if int(slots[-1]) - a != n - 1:
        return None
    return (a, a + n) if n == 1 or bool(np.all(np.diff(slots) == 1)) else None


class SlotPool:
    """Slot bookkeeping shared by backends: lowest free slot first.

    Handing out the lowest free slot keeps live streams packed at the start of the state
    arrays, so a step over all of them is usually one contiguous range (a zero-copy view).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, found {capacity}")
        self.capacity = capacity
        self._used = np.zeros(capacity, dtype=bool)

    def take(self) -> int:
        free = np.flatnonzero(~self._used)
        if len(free) == 0:
            raise CapacityError(f"all {self.capacity} stream slots are in use; "
                                "close a session or start the backend with a larger capacity")
        slot = int(free[0])
        self._used[slot] = True
        return slot

    def give_back(self, slot: int) -> None:
        self.check([slot])
        self._used[slot] = False

    def check(self, slots: np.ndarray | list[int]) -> np.ndarray:
        """Slots as an int64 array, each allocated and none repeated."""
        s = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(s) and (s.min() < 0 or s.max() >= self.capacity):
            raise BackendError(f"slot out of range [0, {self.capacity}): {s.tolist()}")
        if not self._used[s].all():
            raise BackendError(f"slots not allocated: {s[~self._used[s]].tolist()}")
        if len(s) > 1 and len(np.unique(s)) != len(s):
            raise BackendError(f"repeated slots in one step: {s.tolist()}")
        return s

    @property
    def in_use(self) -> int:
        return int(self._used.sum())


class PooledSlots:
    """``allocate``/``release`` for a backend that keeps a :class:`SlotPool` in ``_pool``
    and defines ``reset(slots)`` (a fresh slot starts from an empty window)."""

    _pool: SlotPool

    def allocate(self) -> int:
        slot = self._pool.take()
        self.reset(np.array([slot]))
        return slot

    def release(self, slot: int) -> None:
        self._pool.give_back(slot)

    def reset(self, slots: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to free by hand (backends holding device resources override this)."""


def check_frames(frames: np.ndarray, n: int, input_dim: int) -> np.ndarray:
    """Frames as a C-contiguous (n, D_in) float32 array (copied only if it is not one)."""
    f = np.ascontiguousarray(frames, dtype=np.float32)
    if f.shape != (n, input_dim):
        raise BackendError(f"frames: expected shape ({n}, {input_dim}), found {f.shape}")
    return f

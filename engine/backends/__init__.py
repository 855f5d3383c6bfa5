"""Encoder backends behind one interface (:class:`~engine.backends.base.Backend`).

``get_backend(name, onnx_path, capacity, **opts)`` imports a backend only when asked for,
so the CPU server never loads torch, TensorRT or CUDA libraries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    CapacityError,
    ModelInfo,
    read_model_info,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CapacityError",
    "ModelInfo",
    "get_backend",
    "read_model_info",
]

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def get_backend(name: str, onnx_path: str | Path, capacity: int = 256, **opts: Any) -> Backend:
    """A ready backend over the exported step model at ``onnx_path``.

    ``opts`` go to the backend: ``intra_op_threads`` (onnxruntime); ``device``,
    ``cuda_graphs``, ``checkpoint`` (torch); ``cache_dir``, ``fp16`` (tensorrt).
    """
    if name == "onnxruntime":
        from engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(onnx_path, capacity, **opts)
    if name == "torch":
        from engine.backends.torch_backend import TorchBackend

        return TorchBackend(onnx_path, capacity, **opts)
    if name == "tensorrt":
        from engine.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(onnx_path, capacity, **opts)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")

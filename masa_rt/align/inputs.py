"""The public entry points' input checks: embeddings made unit rows (zero where a frame is
invalid) and the phase decoders' model inputs."""

from __future__ import annotations

import numpy as np

from masa_rt.align.compiled import CompiledReferences
from masa_rt.align.reference import EPS


def unit_rows_or_zero(embeddings: np.ndarray, valid: np.ndarray | None, dim: int,
                       who: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, d) float32 unit rows, zero where invalid, and the (B,) validity: a row is invalid
    when flagged so, or with any NaN or inf, or (near) zero."""
    q = np.asarray(embeddings, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"{who}: expected embeddings of size {dim}, found shape {q.shape}")
    norms = np.sqrt((q * q).sum(axis=1))  # NaN or inf anywhere makes the norm non-finite
    ok = np.isfinite(norms) & (norms > EPS)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    return np.where(ok[:, None], q / np.where(ok, norms, 1.0)[:, None], 0.0), ok


def decoder_inputs(model: CompiledReferences, inputs: np.ndarray | None, b: int,
                    who: str) -> np.ndarray | None:
    """(B, D) float32 model inputs for the phase decoders (NaN -> 0, as
    ``preprocess.assemble``), or None when no reference has a decoder."""
    if not model.decoders:
        return None
    if inputs is None:
        raise ValueError(f"{who}: the references carry phase decoders, which need each "
                         f"frame's model input (inputs=...)")
    x = np.asarray(inputs, dtype=np.float32).reshape(b, -1)
    if x.shape[1] != model.input_dim:
        raise ValueError(f"{who}: expected model inputs of size {model.input_dim}, found "
                         f"{x.shape[1]}")
    # np.nan_to_num's answer, without its dozen Python-level calls (a third of a step's
    # input checks for one stream).
    return np.where(np.isfinite(x), x, np.float32(0.0))

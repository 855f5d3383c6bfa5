"""Collapse diagnostics for a trained encoder (METHOD §4, §8).

Self-supervised objectives like MASA's can be solved by a constant embedding (collapse) or
by a few directions only (METHOD §8: ``tau = 1`` gave effective rank 2 of 128). Two numbers
catch both: the per-dimension standard deviation of ``U`` over frames (all near 0 =
collapse) and the effective rank of its covariance (Roy & Vetterli, 2007: exp of the
entropy of the normalised eigenvalues; 1 = one direction, ``d`` = isotropic).

Embeddings are computed exactly as served: raw joints -> ``preprocess.frame_features`` ->
``MasaModel.encode`` (no augmentation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from masa_rt.model import MasaModel
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.sequence import Dataset
from trainer.data import subsample_indices

__all__ = ["collapse_stats", "effective_rank", "encode_split"]


@torch.no_grad()
def encode_split(model: MasaModel, root: str | Path, split: str, spec: InputSpec,
                 max_len: int | None = None) -> list[np.ndarray]:
    """U (T_i, d) for every sequence of a split, one sequence at a time (no padding)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    ds = Dataset(root)
    out = []
    for seq in ds.sequences(split):
        keep = subsample_indices(seq.num_frames, max_len) if max_len else slice(None)
        feats = seq.features[keep] if seq.features is not None and spec.feature_dim else None
        x = frame_features(seq.joints[keep], spec, feats)  # (T, D)
        u = model.encode(torch.from_numpy(x)[None].to(device))[0]  # (T, d)
        out.append(u.cpu().numpy())
    model.train(was_training)
    return out


def effective_rank(u: np.ndarray) -> float:
    """exp(entropy of the normalised eigenvalues of cov(u)), u (N, d) -> [1, d]."""
    centred = u - u.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / max(len(u) - 1, 1)
    eig = np.clip(np.linalg.eigvalsh(cov.astype(np.float64)), 0, None)
    total = eig.sum()
    if total <= 0:
        return 0.0  # a constant embedding: no direction at all
    p = eig[eig > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def collapse_stats(embeddings: list[np.ndarray], max_pairs: int = 4096,
                   seed: int = 0) -> dict[str, float | int | list[float]]:
    """Per-dimension std, effective rank and mean pairwise cosine of all frames' U."""
    u = np.concatenate(embeddings).astype(np.float64)  # (N, d)
    std = u.std(axis=0)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(u), (2, max_pairs))
    unit = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    return {
        "num_frames": int(len(u)),
        "dim": int(u.shape[1]),
        "effective_rank": round(effective_rank(u), 4),
        "std_mean": round(float(std.mean()), 6),
        "std_min": round(float(std.min()), 6),
        "std_max": round(float(std.max()), 6),
        "dims_std_below_1e-3": int((std < 1e-3).sum()),
        "mean_pairwise_cosine": round(float((unit[a] * unit[b]).sum(1).mean()), 4),
        "std_per_dim": [round(float(s), 6) for s in std],
    }

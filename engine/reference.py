"""Build a reference (``masa_rt.align.Reference``) from demonstration recordings.

A reference is a demonstration embedded by one model, with its phase labels and frame
times. The embeddings come from the offline causal ``MasaModel.encode`` on the demo
resampled to the model's rate exactly as the engine resamples a live stream
(``engine.streams.Resampler``), with the same preprocessing (``frame_features``). Since the
streamed step equals the offline causal encoder (the exactness test), a user performing
the demo live produces the very embeddings stored here. Frames whose joints are all
missing are left out, as the live engine does not encode them either.

Several demos of one activity: the **first** is the reference; each further demo is
aligned to it with offline DTW and its mean cosine cost along the path is stored in
``meta["other_demos"]``, a check that the demos agree (averaging embeddings would blur
phase boundaries and give a "demo" nobody performed).

torch is imported here (it runs the model); the serving path never imports this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import masa_rt
from engine.export import resolve_checkpoint
from engine.streams import Resampler
from masa_rt.align import Reference, offline_dtw
from masa_rt.checkpoint import load_model, model_fingerprint
from masa_rt.model import MasaModel
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.sequence import Sequence as PoseSequence
from masa_rt.sequence import load_sequence

__all__ = ["ReferenceBuildError", "build_reference", "embed_demo"]

log = logging.getLogger(__name__)


class ReferenceBuildError(ValueError):
    """A demo that cannot become a reference (no phase labels, wrong layout, too short)."""


def _resampled(seq: PoseSequence, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                             np.ndarray | None]:
    """(times, joints, phases, features) on the model-rate grid, as the engine would see it.

    Phases are not interpolated: each model frame takes the label of the capture frame
    nearest in time.
    """
    n = seq.num_frames
    t = np.asarray(seq.timestamps, dtype=np.float64) if seq.timestamps is not None else (
        np.arange(n) / float(seq.fps))
    feats = seq.features if spec.feature_dim else None
    rs = Resampler(spec.fps, max_gap_s=np.inf)  # a recording has no stalls to re-anchor at
    j_shape = seq.joints.shape[1:]
    size = int(np.prod(j_shape))
    times, joints, extra = [], [], []
    for i in range(n):
        sample = seq.joints[i].reshape(-1)
        if feats is not None:
            sample = np.concatenate([sample, feats[i]])
        for tk, x in rs.push(sample, float(t[i])):
            times.append(tk)
            joints.append(x[:size].reshape(j_shape))
            extra.append(x[size:])
    times_a = np.array(times)
    phases = np.asarray(seq.phases)[_nearest(t, times_a)]
    return times_a, np.stack(joints), phases, (np.stack(extra) if feats is not None else None)


def _nearest(t: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of the stamp in sorted ``t`` nearest to each ``query`` time."""
    if len(t) == 1:
        return np.zeros(len(query), dtype=np.int64)
    right = np.clip(np.searchsorted(t, query), 1, len(t) - 1)
    left_closer = (query - t[right - 1]) <= (t[right] - query)
    return np.where(left_closer, right - 1, right)


def embed_demo(model: MasaModel, spec: InputSpec, seq: PoseSequence,
               name: str = "demo") -> dict[str, Any]:
    """Embeddings (T, d), phases, times of one demo on the model's frame grid."""
    if seq.layout != spec.layout:
        raise ReferenceBuildError(f"{name}: layout {seq.layout!r}, the model reads "
                                  f"{spec.layout!r}")
    if seq.phases is None or seq.phase_names is None:
        raise ReferenceBuildError(f"{name}: has no phase labels (phases, phase_names); a "
                                  "reference needs them")
    times, joints, phases, feats = _resampled(seq, spec)
    keep = ~np.isnan(joints).reshape(len(joints), -1).all(axis=1)  # tracking lost: skipped
    x = frame_features(joints[keep], spec, feats[keep] if feats is not None else None)
    if len(x) < 2:
        raise ReferenceBuildError(f"{name}: fewer than 2 frames with joints")
    with torch.no_grad():
        emb = model.encode(torch.from_numpy(x)[None])[0].numpy()  # (T, d), causal offline
    return {"embeddings": emb, "phases": phases[keep], "times": times[keep]}


def _compare(first: np.ndarray, other: np.ndarray) -> float:
    """Mean cosine cost along the offline DTW path between two demos' embeddings."""
    path = offline_dtw(other, first)
    a = other / np.linalg.norm(other, axis=1, keepdims=True)
    b = first / np.linalg.norm(first, axis=1, keepdims=True)
    return float(np.mean(1.0 - np.sum(a[path[:, 0]] * b[path[:, 1]], axis=1)))


def build_reference(demo_paths: Sequence[str | os.PathLike[str]],
                    checkpoint_path: str | os.PathLike[str] | None,
                    out_path: str | os.PathLike[str], *, name: str | None = None) -> Reference:
    """Embed the demos with the checkpoint's model and save the reference to ``out_path``.

    ``checkpoint_path``: a ``.pt`` file or a run folder; None uses the shipped model.
    """
    if not demo_paths:
        raise ReferenceBuildError("no demo given")
    model, _cfg, spec, meta = load_model(resolve_checkpoint(checkpoint_path))
    fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["path"])
    seqs = [load_sequence(p) for p in demo_paths]
    demos = [embed_demo(model, spec, s, str(p)) for s, p in zip(seqs, demo_paths, strict=True)]
    first, seq0 = demos[0], seqs[0]
    activity = seq0.activity or Path(demo_paths[0]).stem
    others = []
    for p, s, d in zip(demo_paths[1:], seqs[1:], demos[1:], strict=True):
        if (s.activity or activity) != activity:
            raise ReferenceBuildError(f"{p}: activity {s.activity!r}, the first demo is "
                                      f"{activity!r}; one reference per activity")
        others.append({"file": str(p), "frames": len(d["embeddings"]),
                       "dtw_cost_to_first": _compare(first["embeddings"], d["embeddings"])})
    ref = Reference(
        name=name or Path(out_path).stem, activity=activity,
        embeddings=first["embeddings"], phases=first["phases"],
        phase_names=list(seq0.phase_names), times=first["times"], fps=spec.fps,
        model_fingerprint=fingerprint,
        meta={"demo": str(demo_paths[0]), "other_demos": others,
              "checkpoint": str(meta["path"]), "input_spec": spec.to_dict(),
              "masa_rt_version": masa_rt.__version__, "policy": "first demo"},
    )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ref.save(out_path)
    log.info("reference %s: %s, %d frames, model %s", out_path, activity, len(ref), fingerprint)
    return ref

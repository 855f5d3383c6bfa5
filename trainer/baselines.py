"""Embedders: anything that turns a sequence into one vector per frame.

The evaluation (``trainer.evaluate``) scores every embedder through the same interface,
``embed(sequence) -> (T, d) float array``, so a trained model and its baselines are measured
by literally the same code:

- :class:`ModelEmbedder` -- a trained MASA encoder (a checkpoint), what we report;
- :class:`RawKeypointsEmbedder` -- the normalised, flattened keypoints themselves: what the
  pose already gives without any learning;
- :class:`RandomEncoderEmbedder` -- the same architecture, randomly initialised: the gap to
  the trained model is what training adds (a random transformer is not a weak baseline);
- :class:`ClockEmbedder` -- ``[t / T]``, no pose at all: what Kendall's tau gives for free.

Every embedder sees the *unaugmented* sequence preprocessed by
:func:`masa_rt.preprocess.frame_features`, the one function the engine serves with.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from masa_rt.checkpoint import default_model_path, load_model
from masa_rt.metrics import clock_embeddings
from masa_rt.model import MasaConfig, MasaModel
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.sequence import Sequence

__all__ = [
    "BASELINES",
    "ClockEmbedder",
    "Embedder",
    "ModelEmbedder",
    "RandomEncoderEmbedder",
    "RawKeypointsEmbedder",
    "resolve_checkpoint",
]

BASELINES = ("raw", "random", "clock")
RUN_CHECKPOINT = "last.pt"


class Embedder(Protocol):
    """One vector per frame; ``describe()`` says what produced them (written to reports)."""

    name: str

    def embed(self, seq: Sequence) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def resolve_checkpoint(path: str | os.PathLike[str] | None) -> Path:
    """A ``.pt`` file, a run folder (its ``last.pt``) or ``None`` (the shipped model)."""
    if path is None:
        return default_model_path()
    p = Path(path)
    return p / RUN_CHECKPOINT if p.is_dir() else p


def _encode(model: MasaModel, x: np.ndarray) -> np.ndarray:
    """(T, D) model input -> (T, d) embeddings, the whole sequence in one pass.

    One pass, no windows: a causal model sees exactly the frames it would see live, and a
    full-attention model sees the whole clip, as in the paper's evaluation.
    """
    with torch.inference_mode():
        u = model.encode(torch.from_numpy(np.ascontiguousarray(x))[None])  # (1, T, d)
    return u[0].numpy().astype(np.float64)


class ModelEmbedder:
    """A trained checkpoint (``.pt`` or run folder; default: the shipped model)."""

    name = "model"

    def __init__(self, checkpoint: str | os.PathLike[str] | None = None) -> None:
        self.path = resolve_checkpoint(checkpoint)
        self.model, self.cfg, self.spec, self.meta = load_model(self.path)

    def embed(self, seq: Sequence) -> np.ndarray:
        return _encode(self.model, frame_features(seq.joints, self.spec, seq.features))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": str(self.path), "config": self.cfg.to_dict(),
                "input_spec": self.spec.to_dict(),
                "model_fingerprint": self.meta.get("model_fingerprint", ""),
                "epoch": self.meta.get("epoch"), "step": self.meta.get("step")}


class RawKeypointsEmbedder:
    """Normalised flattened keypoints (NaN -> 0): the pose itself as the embedding."""

    name = "raw"

    def __init__(self, spec: InputSpec) -> None:
        # Skeleton only: the baseline is "what the keypoints give", whatever the model reads.
        self.spec = replace(spec, input_kind="skeleton", feature_dim=0)

    def embed(self, seq: Sequence) -> np.ndarray:
        return frame_features(seq.joints, self.spec).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input_spec": self.spec.to_dict()}


class RandomEncoderEmbedder:
    """The MASA architecture with random weights (seeded): the floor training must beat."""

    name = "random"

    def __init__(self, cfg: MasaConfig, spec: InputSpec, seed: int = 0) -> None:
        self.cfg, self.spec, self.seed = cfg, spec, seed
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.model = MasaModel(cfg).eval()
        finally:  # do not disturb the caller's random stream
            torch.random.set_rng_state(gen_state)

    def embed(self, seq: Sequence) -> np.ndarray:
        return _encode(self.model, frame_features(seq.joints, self.spec, seq.features))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "config": self.cfg.to_dict(),
                "input_spec": self.spec.to_dict()}


class ClockEmbedder:
    """``[t / T]``: each frame's relative time; knows no pose (EVALUATION.md's clock row)."""

    name = "clock"

    def embed(self, seq: Sequence) -> np.ndarray:
        return clock_embeddings([seq.num_frames])[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

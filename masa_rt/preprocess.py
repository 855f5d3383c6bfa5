"""Frame preprocessing shared by training, reference building and the live engine.

One function, :func:`frame_features`, turns raw joints (plus optional per-frame features)
into the model's input vector. The trainer, ``engine.reference`` and the serving engine all
call it, and the :class:`InputSpec` that parametrises it travels inside every checkpoint,
so the input a model sees when served is computed exactly as when it was trained: there is
no second implementation that could drift (train/serve skew).

Numpy only: the serving path imports this module and must never import torch.

Steps (METHOD.md §1, architecture.md "Inference input"):

1. :func:`normalise_joints`: ``skeleton.normalise`` with the spec's ``root_mode``. The
   default is ``per_frame`` (each frame centred on its own root, scaled by its own reference
   bone) because a live stream has no first frame to anchor to.
2. :func:`assemble`: flatten ``J x C`` to ``J*C``, NaN -> 0 (a missing joint then adds
   nothing to the first linear layer), and concatenate the per-frame features according to
   ``input_kind`` (``skeleton`` | ``features`` | ``both``; multimodal = frame-wise concat).

The trainer augments between the two steps (see ``trainer.data``), on root-centred joints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from masa_rt.layout_file import declaration_of, declare, is_declared
from masa_rt.skeleton import flatten_frames, get_layout, normalise

__all__ = [
    "INPUT_KINDS",
    "ROOT_MODES",
    "InputSpec",
    "assemble",
    "raw_embedding",
    "frame_features",
    "normalise_joints",
]

INPUT_KINDS = ("skeleton", "features", "both")
ROOT_MODES = ("per_frame", "first_frame")


@dataclass(frozen=True)
class InputSpec:
    """Everything needed to turn raw frames into model input; saved with the weights.

    ``fps`` is the frame rate the model was trained at: the engine resamples live streams
    to it (METHOD.md §3, "Frame rate"). ``feature_dim`` is 0 for skeleton-only input.
    ``layout_declaration``: a declared layout's declaration (``masa_rt.layout_file``),
    filled in from this process's registry when not given, so a model of a declared
    layout carries it into its checkpoint, ONNX metadata and references, and whoever
    loads the model knows the layout without the file; None for a built-in layout.
    """

    layout: str
    fps: float
    root_mode: str = "per_frame"
    input_kind: str = "skeleton"
    feature_dim: int = 0
    layout_declaration: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.layout_declaration is not None:
            where = f"input spec (layout {self.layout!r})"
            if declare(self.layout_declaration, where, strict=False).name != self.layout:
                raise ValueError(f"InputSpec: layout_declaration declares "
                                 f"{self.layout_declaration.get('name')!r}, not {self.layout!r}")
        get_layout(self.layout)  # fail early, naming the known layouts
        if self.layout_declaration is None and is_declared(self.layout):
            object.__setattr__(self, "layout_declaration", declaration_of(self.layout))
        if self.root_mode not in ROOT_MODES:
            raise ValueError(f"InputSpec: root_mode: expected one of {ROOT_MODES}, "
                             f"found {self.root_mode!r}")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"InputSpec: input_kind: expected one of {INPUT_KINDS}, "
                             f"found {self.input_kind!r}")
        needs_features = self.input_kind in ("features", "both")
        if needs_features != (self.feature_dim > 0):
            raise ValueError(f"InputSpec: feature_dim: expected > 0 exactly when input_kind "
                             f"uses features, found {self.feature_dim} for {self.input_kind!r}")
        if not self.fps > 0:
            raise ValueError(f"InputSpec: fps: expected > 0, found {self.fps}")

    @property
    def num_joints(self) -> int:
        return get_layout(self.layout).num_joints

    @property
    def joint_dims(self) -> int:
        return get_layout(self.layout).dims

    @property
    def uses_joints(self) -> bool:
        return self.input_kind in ("skeleton", "both")

    @property
    def input_dim(self) -> int:
        """Length of one frame's model input vector."""
        skeleton = self.num_joints * self.joint_dims if self.uses_joints else 0
        return skeleton + self.feature_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["layout_declaration"] is None:  # built-in layouts: the dict models always had
            del d["layout_declaration"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"InputSpec: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def normalise_joints(joints: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(..., J, C) raw joints -> (..., J, C) float32, root-centred and bone-scaled."""
    return normalise(joints, spec.layout, root_mode=spec.root_mode).astype(np.float32)


def assemble(joints: np.ndarray | None, spec: InputSpec,
             features: np.ndarray | None = None) -> np.ndarray:
    """(..., J, C) normalised joints (+ (..., F) features) -> (..., D) float32 input.

    Missing values (NaN joints, NaN features) become 0 so one lost joint never poisons a
    frame. ``joints`` may be ``None`` for ``input_kind="features"``.
    """
    parts = []
    if spec.uses_joints:
        if joints is None:
            raise ValueError(f"frame_features: joints: required for input_kind "
                             f"{spec.input_kind!r}")
        parts.append(flatten_frames(joints))
    if spec.feature_dim:
        if features is None:
            raise ValueError(f"frame_features: features: required for input_kind "
                             f"{spec.input_kind!r} (feature_dim {spec.feature_dim})")
        f = np.asarray(features, dtype=np.float32)
        if f.shape[-1] != spec.feature_dim:
            raise ValueError(f"frame_features: features: expected last dim "
                             f"{spec.feature_dim}, found {f.shape}")
        parts.append(np.where(np.isfinite(f), f, 0).astype(np.float32))
    if len(parts) == 2 and parts[0].shape[:-1] != parts[1].shape[:-1]:
        raise ValueError(f"frame_features: joints and features disagree on leading dims: "
                         f"{parts[0].shape[:-1]} vs {parts[1].shape[:-1]}")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def frame_features(joints: np.ndarray | None, spec: InputSpec,
                   features: np.ndarray | None = None) -> np.ndarray:
    """Raw joints (..., J, C) [+ features (..., F)] -> model input (..., D) float32.

    With ``root_mode="per_frame"`` this works on a single frame ``(J, C)`` as well as on a
    whole sequence, and gives the same row for a frame either way.
    """
    normed = normalise_joints(joints, spec) if spec.uses_joints and joints is not None else None
    return assemble(normed, spec, features)


def raw_embedding(x: np.ndarray) -> np.ndarray:
    """Model input rows (T, D), L2-normalised: the raw-keypoint baseline's "embedding",
    compared by cosine as the learned embeddings are (what the encoder adds is measured
    against it)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)

"""Training data: sequences in memory, shuffled batches, and the two augmented views.

The order of operations for one training view is fixed, and documented here because it is
what makes training and serving compute the same input:

1. at load: ``preprocess.normalise_joints`` (root-centred, bone-scaled, ``spec.root_mode``)
   and temporal subsampling of clips longer than ``max_len`` (integer stride, METHOD §8);
2. per step: ``augment.dual_augment`` on the normalised ``(T, J, C)`` joints, so rotation
   and mirroring turn about the root and noise/translation are in bone-length units;
3. ``preprocess.frame_features`` on each view, the very function the engine runs on live
   frames: normalise again (a no-op for rotation/mirror; it cancels translation and scale
   under ``per_frame``, which the engine would cancel too), flatten, NaN -> 0, concat
   features. The model therefore never sees an input the engine could not produce.

Randomness is derived, not carried: the batch order of epoch ``e`` comes from
``default_rng([seed, e])`` and the augmentation of global step ``s`` on rank ``r`` from
``default_rng([seed, r, s])``. A resumed run (or another rank) reproduces exactly the same
batches and views from the step counter alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from masa_rt.augment import AugmentConfig, dual_augment
from masa_rt.preprocess import InputSpec, frame_features, normalise_joints
from masa_rt.sequence import Dataset
from masa_rt.skeleton import get_layout

__all__ = [
    "Batch",
    "SequenceSet",
    "epoch_batches",
    "load_sequences",
    "make_batch",
    "subsample_indices",
]


@dataclass
class SequenceSet:
    """A split held in memory: normalised joints (T_i, J, C) and optional features (T_i, F)."""

    joints: list[np.ndarray]
    features: list[np.ndarray | None]
    names: list[str]
    activities: list[str]
    layout: str
    fps: float
    strides: list[int]  # temporal subsampling stride of each clip (1 = every frame)

    def __len__(self) -> int:
        return len(self.joints)

    @property
    def feature_dim(self) -> int:
        """Per-frame feature width, 0 unless every sequence has features of one width."""
        dims = {None if f is None else f.shape[-1] for f in self.features}
        return dims.pop() if len(dims) == 1 and None not in dims else 0

    @property
    def num_frames(self) -> int:
        return int(sum(len(j) for j in self.joints))


@dataclass
class Batch:
    """One training step's input: both views as model tensors plus what the loss needs."""

    x1: torch.Tensor  # (B, M, D) float32
    m1: torch.Tensor  # (B, M) bool
    g1: torch.Tensor  # (B, M) int64, original frame index, -1 on padding
    x2: torch.Tensor  # (B, N, D)
    m2: torch.Tensor  # (B, N)
    g2: torch.Tensor  # (B, N)
    T: torch.Tensor  # (B,) float32, original (subsampled) sequence lengths

    def loss_inputs(self) -> dict[str, torch.Tensor]:
        return dict(g1=self.g1, g2=self.g2, m1=self.m1, m2=self.m2, T=self.T)

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(t.to(device) for t in vars(self).values()))


def subsample_indices(T: int, max_len: int) -> np.ndarray:
    """Frame indices keeping a clip at most ``max_len`` long with one integer stride.

    An integer stride keeps frames evenly spaced in time (a uniform lower frame rate), where
    ``linspace`` rounding would jitter the spacing.
    """
    stride = max(1, -(-T // max_len))  # ceil(T / max_len)
    return np.arange(0, T, stride)


def load_sequences(root: str | Path, split: str, spec: InputSpec,
                   max_len: int | None = None) -> SequenceSet:
    """Load a split into memory, normalised (step 1 of the module docstring)."""
    ds = Dataset(root)
    joints, features, names, activities, strides = [], [], [], [], []
    for entry in ds.entries(split):
        seq = ds.load(entry)
        keep = subsample_indices(seq.num_frames, max_len or seq.num_frames)
        strides.append(int(keep[1] - keep[0]) if len(keep) > 1 else 1)
        joints.append(normalise_joints(seq.joints[keep], spec))
        feats = seq.features[keep] if seq.features is not None else None
        features.append(None if feats is None else feats.astype(np.float32))
        names.append(entry.file)
        activities.append(entry.activity)
    return SequenceSet(joints, features, names, activities, ds.manifest.layout,
                       float(ds.manifest.fps), strides)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This rank's batches of sequence indices for ``epoch`` (shuffled by ``(seed, epoch)``).

    Every rank draws the same permutation and takes every ``world_size``-th batch. All ranks
    must run the same number of steps (each step is a collective all-reduce), so the batch
    count is trimmed to a multiple of ``world_size`` (wrapping around when there are fewer
    batches than ranks).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) < world_size:
        batches = [batches[i % len(batches)] for i in range(world_size)]
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def _pad(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (T_i, ...) arrays -> zero-padded (B, T, ...) and lengths (B,)."""
    lengths = np.array([len(a) for a in arrays], np.int64)
    out = np.zeros((len(arrays), lengths.max()) + arrays[0].shape[1:], np.float32)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out, lengths


def _identity_view(x: np.ndarray, lengths: np.ndarray, feats: np.ndarray | None) -> dict:
    """The unaugmented sequence as a 'view' (the no-dual-augmentation ablation)."""
    g = np.where(np.arange(x.shape[1])[None] < lengths[:, None], np.arange(x.shape[1]), -1)
    return dict(joints=x, features=feats, mask=g >= 0, g=g)


def _view_tensors(view: dict, spec: InputSpec) -> tuple[torch.Tensor, ...]:
    """A view dict -> (x (B, M, D), mask, g) through frame_features (step 3)."""
    joints = view["joints"] if spec.uses_joints else None
    x = frame_features(joints, spec, view["features"] if spec.feature_dim else None)
    mask = np.asarray(view["mask"], bool)
    x = np.where(mask[..., None], x, 0).astype(np.float32)  # padding is exactly 0
    return (torch.from_numpy(x), torch.from_numpy(mask),
            torch.from_numpy(np.asarray(view["g"], np.int64)))


def random_windows(lengths: list[int], clip_len: int | None,
                   rng: np.random.Generator) -> list[slice]:
    """One random contiguous window of at most ``clip_len`` frames per clip (all if None)."""
    if clip_len is None:
        return [slice(0, n) for n in lengths]
    starts = [int(rng.integers(0, n - clip_len + 1)) if n > clip_len else 0 for n in lengths]
    return [slice(s, s + min(n, clip_len)) for s, n in zip(starts, lengths, strict=True)]


def make_batch(data: SequenceSet, idx: np.ndarray, spec: InputSpec, cfg: AugmentConfig,
               rng: np.random.Generator, clip_len: int | None = None) -> Batch:
    """Pad the chosen sequences, draw two augmented views, and build model tensors."""
    windows = random_windows([len(data.joints[i]) for i in idx], clip_len, rng)
    x, lengths = _pad([data.joints[i][w] for i, w in zip(idx, windows, strict=True)])
    feats = (_pad([data.features[i][w] for i, w in zip(idx, windows, strict=True)])[0]
             if spec.feature_dim else None)
    layout = get_layout(data.layout)
    v1, v2 = dual_augment(x, lengths, rng, cfg, mirror_index=np.array(layout.mirror),
                          up_axis=layout.up_axis, features=feats)
    if not getattr(cfg, "dual", True):
        v2 = _identity_view(x, lengths, feats)
    x1, m1, g1 = _view_tensors(v1, spec)
    x2, m2, g2 = _view_tensors(v2, spec)
    return Batch(x1, m1, g1, x2, m2, g2, torch.from_numpy(lengths.astype(np.float32)))

"""Dual augmentation: two views of each sequence plus their index maps g', g''.

Paper: "Multi Activity Sequence Alignment via Implicit Clustering", Sec. 3.1 (dual
augmentation, trimming only for RGB with one shared range); ``shared/METHOD.md`` §2 and §8
(independent per-view crops keeping >= 60% of the clip). Spatial augmentation stands in for
the paper's angle/flip/translation/VPoser augmentations (VPoser needs a body model we do not
ship): rotation about the up axis, small tilts, mirror, scale, translation, joint noise.

Works on plain arrays: joints (B, T, J, C) with NaN = missing joint (kept NaN; the model reads
NaN as 0), optional features (B, T, F), and a mirror index (J,) (the layout's left/right map).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

CROPS = ("off", "shared", "independent")
TEMPORALS = ("drop", "warp")


@dataclass
class AugmentConfig:
    """Augmentation settings; defaults follow the paper for skeletons (no trimming)."""

    crop: str = "off"  # "off" | "shared" (paper, RGB) | "independent" (METHOD §8)
    crop_min_ratio: float = 0.6  # a crop keeps at least this fraction of the clip
    keep_ratio: tuple[float, float] = (0.5, 1.0)  # fraction of the crop each view keeps
    rotate_max_deg: float = 180.0  # about the up axis
    tilt_max_deg: float = 10.0  # about the two horizontal axes
    mirror_prob: float = 0.5
    translate_std: float = 0.1  # in the normalised units (reference bone lengths)
    scale_range: tuple[float, float] = (0.8, 1.2)
    joint_noise_std: float = 0.01
    feature_noise_std: float = 0.0
    min_frames: int = 8  # each view keeps at least min(min_frames, T) frames
    # Missing joints (not in the paper: 0 = off). Per view, each (frame, joint) is set to
    # NaN with this probability, and with the same probability per frame one whole side
    # (a hand: the joints the mirror map sends to a higher index, or those it sends to a
    # lower one) is NaN, so the model learns to read through tracking dropouts.
    joint_dropout: float = 0.0
    # Temporal augmentation (not in the paper beyond "drop"). "drop": the paper's random frame
    # drop (keep_ratio), so a view is only ever sped up, uniformly. "warp": the same drop, then
    # a piecewise speed profile over the kept frames (a few segments, each with a speed drawn
    # log-uniformly in [speed_min, speed_max]) and, with probability pause_prob, a pause
    # (one frame held for 1..pause_max_frames output frames). Slowed and paused views read
    # the same original frame several times: index maps may repeat indices.
    temporal: str = "drop"  # "drop" | "warp"
    speed_min: float = 0.5
    speed_max: float = 2.0
    warp_segments: int = 3  # each view draws 1..warp_segments speed segments
    pause_prob: float = 0.3
    pause_max_frames: int = 30
    warp_max_ratio: float = 2.0  # a warped view has at most this x its crop's length frames
    # Part jitter (not in the paper: 0 = off). Subjects differ in *where* each phase ends
    # (their own key poses), which no rigid augmentation imitates. Per view, each side of
    # the mirror map (a hand; the whole skeleton without one) is moved by a rigid offset
    # about its centroid: a translation (std part_jitter_std, normalised units) and a
    # rotation (std part_jitter_deg per axis; 3-D layouts only), drawn anew every
    # part_jitter_every frames and interpolated linearly between, so the pose targets
    # drift as another subject's would.
    # Measured (docs/results.md, fourth round): invariance to key poses rises, precision
    # falls; net +0.7 points on the harness's clean streams, so the shipped model has none.
    part_jitter_std: float = 0.0
    part_jitter_deg: float = 0.0
    part_jitter_every: int = 30

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}; expected one of {CROPS}")
        self.keep_ratio = tuple(self.keep_ratio)
        self.scale_range = tuple(self.scale_range)
        if not 0 < self.keep_ratio[0] <= self.keep_ratio[1] <= 1:
            raise ValueError(f"keep_ratio={self.keep_ratio} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.crop_min_ratio <= 1:
            raise ValueError(f"crop_min_ratio={self.crop_min_ratio} must be in (0, 1]")
        if not 0 <= self.joint_dropout < 1:
            raise ValueError(f"joint_dropout={self.joint_dropout} must be in [0, 1)")
        if self.temporal not in TEMPORALS:
            raise ValueError(f"temporal={self.temporal!r}; expected one of {TEMPORALS}")
        if not 0 < self.speed_min <= self.speed_max:
            raise ValueError(f"speed_min={self.speed_min}, speed_max={self.speed_max} must "
                             "satisfy 0 < speed_min <= speed_max")
        if self.warp_segments < 1 or self.pause_max_frames < 0 or not 0 <= self.pause_prob <= 1:
            raise ValueError("need warp_segments >= 1, pause_max_frames >= 0, "
                             "0 <= pause_prob <= 1")
        if not self.warp_max_ratio >= 1:
            raise ValueError(f"warp_max_ratio={self.warp_max_ratio} must be >= 1")
        if self.part_jitter_std < 0 or self.part_jitter_deg < 0 or self.part_jitter_every < 1:
            raise ValueError("need part_jitter_std >= 0, part_jitter_deg >= 0, "
                             "part_jitter_every >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AugmentConfig keys: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- temporal


def _crop(rng: np.random.Generator, T: int, cfg: AugmentConfig) -> tuple[int, int]:
    """A random range [a, b) of a length-T clip; the whole clip when cropping is off."""
    if cfg.crop == "off":
        return 0, T
    lo = max(int(np.ceil(cfg.crop_min_ratio * T)), min(cfg.min_frames, T))
    length = int(rng.integers(lo, T + 1))
    a = int(rng.integers(0, T - length + 1))
    return a, a + length


def _keep(rng: np.random.Generator, a: int, b: int, cfg: AugmentConfig) -> np.ndarray:
    """Sorted random subset of [a, b) (a temporal augmentation): strictly increasing ints."""
    L = b - a
    n = int(round(rng.uniform(*cfg.keep_ratio) * L))
    n = min(max(n, min(cfg.min_frames, L)), L)
    return a + np.sort(rng.choice(L, size=n, replace=False))


def _warp_positions(
    rng: np.random.Generator, L: int, cfg: AugmentConfig, lo: int, cap: int
) -> np.ndarray:  # fmt: skip
    """Non-decreasing float positions into L frames, from 0 to L - 1: a speed profile.

    The span [0, L-1] is cut at random into 1..warp_segments segments; segment i is read at
    speed s_i (source frames per output frame, log-uniform in [speed_min, speed_max]), so it
    lasts len_i / s_i output frames. Then, with probability pause_prob, one position is held
    for 1..pause_max_frames more frames. Finally the count is brought into [lo, cap] by
    resampling the positions uniformly (first and last kept): a cap only speeds a view up.
    """
    if L == 1:
        pos = np.zeros(1)
    else:
        span = float(L - 1)
        n_seg = int(rng.integers(1, cfg.warp_segments + 1))
        edges = np.concatenate([[0.0], np.sort(rng.uniform(0.0, span, n_seg - 1)), [span]])
        speeds = np.exp(rng.uniform(np.log(cfg.speed_min), np.log(cfg.speed_max), n_seg))
        times = np.concatenate([[0.0], np.cumsum(np.diff(edges) / speeds)])  # output time
        pos = np.interp(np.arange(int(np.floor(times[-1])) + 1, dtype=np.float64), times, edges)
        if pos[-1] < span:  # end on the last frame (a last step shorter than its speed)
            pos = np.append(pos, span)
    if cfg.pause_max_frames > 0 and rng.random() < cfg.pause_prob:
        k = int(rng.integers(0, len(pos)))
        hold = int(rng.integers(1, cfg.pause_max_frames + 1))
        pos = np.insert(pos, k, np.full(hold, pos[k]))
    n = min(max(len(pos), lo), cap)
    if n != len(pos):
        pos = np.interp(np.linspace(0.0, len(pos) - 1, n), np.arange(len(pos)), pos)
    return pos


def _warp(rng: np.random.Generator, kept: np.ndarray, a: int, b: int,
          cfg: AugmentConfig) -> np.ndarray:
    """Warp the kept frames of [a, b) (``_keep``'s output): non-decreasing ints in [a, b).

    Output frame k reads ``kept[round(position_k)]``: a slowed segment or a pause repeats
    an original frame, a fast one skips frames. Repeating is what a live user slower than the
    demonstration looks like at a fixed 30 fps (consecutive frames that barely differ); the
    losses take repeated indices as they are (Eq. 3 regresses the original index, Eq. 8 pairs
    equal indices). Drop-then-warp keeps the paper's irregular frame drop (live streams drop
    frames too) and adds only what it lacks, slow-downs, pauses and uneven speed, in one step.
    Caveat: the trainer feeds g as the model's positions, so repeated frames share a position
    and the causal band still spans W source frames; a live stream's positions are its frame
    count (see configs/hands_causal_warp.yaml for what that cost in measurement).
    """
    lo = min(cfg.min_frames, b - a)
    cap = max(lo, int(cfg.warp_max_ratio * (b - a)))
    pos = _warp_positions(rng, len(kept), cfg, lo, cap)
    return kept[np.clip(np.round(pos).astype(np.int64), 0, len(kept) - 1)]


def _view_map(rng: np.random.Generator, a: int, b: int, cfg: AugmentConfig) -> np.ndarray:
    """One view's index map over the crop [a, b) under ``cfg.temporal``."""
    kept = _keep(rng, a, b, cfg)
    return kept if cfg.temporal == "drop" else _warp(rng, kept, a, b, cfg)


def _index_maps(
    rng: np.random.Generator, lengths: np.ndarray, cfg: AugmentConfig
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Index maps and crop ranges (B, 2) of both views; a shared crop is drawn once."""
    maps1, maps2, crops1, crops2 = [], [], [], []
    for T in lengths:
        c1 = _crop(rng, int(T), cfg)
        c2 = c1 if cfg.crop != "independent" else _crop(rng, int(T), cfg)
        maps1.append(_view_map(rng, *c1, cfg))
        maps2.append(_view_map(rng, *c2, cfg))
        crops1.append(c1)
        crops2.append(c2)
    return maps1, maps2, np.array(crops1, np.int64), np.array(crops2, np.int64)


def _pad_maps(maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged index maps -> g (B, M) int64 padded with -1, mask (B, M) bool."""
    M = max(len(g) for g in maps)
    g = np.full((len(maps), M), -1, np.int64)
    for i, gi in enumerate(maps):
        g[i, : len(gi)] = gi
    return g, g >= 0


def _gather(x: np.ndarray, g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x (B, T, ...) at g (B, M) -> (B, M, ...); padded frames are 0."""
    idx = np.where(mask, g, 0)
    out = x[np.arange(len(x))[:, None], idx]  # (B, M, ...)
    pad = ~mask.reshape(mask.shape + (1,) * (out.ndim - 2))
    return np.where(pad, 0.0, out).astype(np.float32)


# ----------------------------------------------------------------------------- spatial


def rotation_matrix(axis: int, angle: np.ndarray) -> np.ndarray:
    """Rotations (B, 3, 3) by ``angle`` (B,) radians about coordinate ``axis``."""
    i, j = [k for k in range(3) if k != axis]
    R = np.zeros((len(angle), 3, 3))
    R[:, axis, axis] = 1.0
    R[:, i, i] = R[:, j, j] = np.cos(angle)
    R[:, i, j], R[:, j, i] = -np.sin(angle), np.sin(angle)
    return R


def mirror_joints(joints: np.ndarray, mirror_index: np.ndarray, lateral_axis: int) -> np.ndarray:
    """Mirror flip (..., J, C): negate the lateral coordinate, swap left/right joints."""
    out = joints[..., mirror_index, :].copy()
    out[..., lateral_axis] *= -1
    return out


def _check_mirror(mirror_index: np.ndarray, J: int) -> np.ndarray:
    mi = np.asarray(mirror_index, np.int64)
    if mi.shape != (J,) or not np.array_equal(np.sort(mi), np.arange(J)):
        raise ValueError(f"mirror_index must be a permutation of range({J})")
    if not np.array_equal(mi[mi], np.arange(J)):
        raise ValueError("mirror_index must be its own inverse (left <-> right pairs)")
    return mi


def _random_rotation(
    rng: np.random.Generator, B: int, C: int, up_axis: int, cfg: AugmentConfig
) -> np.ndarray:
    """R (B, C, C): yaw about ``up_axis`` then small tilts; 2D gets an in-plane tilt only."""
    tilt = np.deg2rad(cfg.tilt_max_deg)
    if C == 2:  # a yaw needs depth; a 2D skeleton is only tilted in the image plane
        a = rng.uniform(-tilt, tilt, B)
        return np.stack([np.cos(a), -np.sin(a), np.sin(a), np.cos(a)], -1).reshape(B, 2, 2)
    yaw = np.deg2rad(cfg.rotate_max_deg)
    R = rotation_matrix(up_axis, rng.uniform(-yaw, yaw, B))
    for axis in (k for k in range(3) if k != up_axis):
        R = rotation_matrix(axis, rng.uniform(-tilt, tilt, B)) @ R
    return R


def _spatial(
    rng: np.random.Generator, joints: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
    mirror_index: np.ndarray | None, up_axis: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """One view's spatial augmentation, batched: s * R @ mirror(x) + t + noise."""
    B, M, J, C = joints.shape
    lateral = next(k for k in range(C) if k != up_axis)
    mirrored = rng.random(B) < cfg.mirror_prob if mirror_index is not None else np.zeros(B, bool)
    if cfg.part_jitter_std > 0 or cfg.part_jitter_deg > 0:
        joints = _part_jitter(rng, joints, cfg, mirror_index)
    if mirror_index is not None:
        flipped = mirror_joints(joints, mirror_index, lateral)
        joints = np.where(mirrored[:, None, None, None], flipped, joints)
    R = _random_rotation(rng, B, C, up_axis, cfg)  # (B, C, C)
    scale = rng.uniform(*cfg.scale_range, B)  # (B,)
    shift = rng.normal(0.0, cfg.translate_std, (B, C))  # (B, C)
    # x @ R^T rather than einsum: a batched matmul, several times faster on these shapes.
    y = scale[:, None, None, None] * (joints @ np.swapaxes(R, -1, -2)[:, None])
    y = y + shift[:, None, None, :]
    if cfg.joint_noise_std > 0:
        y = y + rng.normal(0.0, cfg.joint_noise_std, y.shape)
    y = np.where(mask[:, :, None, None], y, 0.0).astype(np.float32)
    params = dict(rotation=R.astype(np.float32), scale=scale.astype(np.float32),
                  translation=shift.astype(np.float32), mirrored=mirrored)  # fmt: skip
    return y, params


def _sides(J: int, mirror_index: np.ndarray | None) -> list[np.ndarray]:
    """The two sides of the mirror map (a hand each: the joints it sends to a higher
    index, and those it sends to a lower one) as (J,) masks; [] without sides."""
    if mirror_index is None:
        return []
    sides = [mirror_index > np.arange(J), mirror_index < np.arange(J)]
    return sides if sides[0].any() else []


def axis_angle(v: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of rotation vectors (..., 3) (Rodrigues)."""
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    k = v / np.maximum(angle, 1e-12)
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - np.swapaxes(K, -1, -2)
    a = angle[..., None]
    return np.eye(3) + np.sin(a) * K + (1.0 - np.cos(a)) * (K @ K)


def _part_jitter(
    rng: np.random.Generator, joints: np.ndarray, cfg: AugmentConfig,
    mirror_index: np.ndarray | None,
) -> np.ndarray:  # fmt: skip
    """Slowly drifting rigid offsets of each part (AugmentConfig.part_jitter_*)."""
    B, M, J, C = joints.shape
    n_knots = M // cfg.part_jitter_every + 2
    at = np.arange(M) / cfg.part_jitter_every  # frame -> knot coordinate
    lo = np.floor(at).astype(np.int64)
    w = (at - lo)[None, :, None]

    def drift(std: float, dims: int) -> np.ndarray:  # (B, M, dims), linear between knots
        knots = rng.normal(0.0, std, (B, n_knots, dims))
        return (1.0 - w) * knots[:, lo] + w * knots[:, lo + 1]

    out = joints.copy()
    for part in _sides(J, mirror_index) or [np.ones(J, dtype=bool)]:
        x = joints[:, :, part]  # (B, M, j, C)
        seen = np.isfinite(x).all(axis=-1, keepdims=True)  # (B, M, j, 1)
        n = np.maximum(seen.sum(axis=2, keepdims=True), 1)
        centre = np.where(seen, x, 0.0).sum(axis=2, keepdims=True) / n  # NaN joints: stay NaN
        y = x - centre
        if C == 3 and cfg.part_jitter_deg > 0:
            R = axis_angle(drift(np.radians(cfg.part_jitter_deg), 3))  # (B, M, 3, 3)
            y = y @ np.swapaxes(R, -1, -2)  # per frame: (B, M, j, C) @ (B, M, C, C)
        out[:, :, part] = y + centre + drift(cfg.part_jitter_std, C)[:, :, None, :]
    return out


def _drop_joints(
    rng: np.random.Generator, joints: np.ndarray, mask: np.ndarray, p: float,
    mirror_index: np.ndarray | None,
) -> np.ndarray:  # fmt: skip
    """Set random joints (B, M, J, C) of real frames to NaN: each with probability ``p``,
    and per frame, with probability ``p``, one whole side of the mirror map (a hand)."""
    B, M, J, _ = joints.shape
    drop = rng.random((B, M, J)) < p
    sides = _sides(J, mirror_index)
    if sides:
        hit = rng.random((B, M)) < p
        pick = rng.random((B, M)) < 0.5
        side = np.where(pick[..., None], sides[0], sides[1])  # (B, M, J)
        drop |= hit[..., None] & side
    drop &= mask[..., None]  # padding stays exactly 0
    return np.where(drop[..., None], np.float32(np.nan), joints).astype(np.float32)


# ----------------------------------------------------------------------------- API


def dual_augment(
    x: Any,
    lengths: Any,
    rng: np.random.Generator,
    cfg: AugmentConfig | None = None,
    mirror_index: np.ndarray | None = None,
    up_axis: int = 1,
    features: Any | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two independently augmented views of a padded batch (METHOD §2).

    ``x`` (B, T, J, C) float (numpy or torch), ``lengths`` (B,) real frames per sample,
    ``features`` (B, T, F) or None. Each view is a dict: ``joints`` (B, M, J, C) float32,
    ``features`` (B, M, F) or None, ``mask`` (B, M) bool, ``g`` (B, M) int64 original frame
    indices (strictly increasing with ``temporal="drop"``, non-decreasing with "warp"; -1 on
    padding), ``lengths`` (B,) int64, ``crop`` (B, 2)
    the [a, b) range it was drawn from, and the spatial parameters ``rotation`` (B, C, C),
    ``scale`` (B,), ``translation`` (B, C), ``mirrored`` (B,) bool, so that
    ``joints = scale * rotation @ mirror?(x[g]) + translation + noise``.
    Outputs are torch tensors when ``x`` is one, numpy arrays otherwise.
    """
    cfg = cfg or AugmentConfig()
    x, feats, lengths, mi, is_torch = _checked_batch(x, lengths, features, mirror_index,
                                                     up_axis)
    maps1, maps2, crops1, crops2 = _index_maps(rng, lengths, cfg)
    views = [_view(rng, x, feats, maps, crops, cfg, mi, up_axis, is_torch)
             for maps, crops in ((maps1, crops1), (maps2, crops2))]
    return views[0], views[1]


def augment_view(
    x: Any,
    lengths: Any,
    rng: np.random.Generator,
    cfg: AugmentConfig | None = None,
    mirror_index: np.ndarray | None = None,
    up_axis: int = 1,
    features: Any | None = None,
) -> dict[str, Any]:
    """One augmented view of a padded batch, for callers that need no pair (a reference's
    phase decoder): the same transform and dict as a view of :func:`dual_augment`, at
    half its cost."""
    cfg = cfg or AugmentConfig()
    x, feats, lengths, mi, is_torch = _checked_batch(x, lengths, features, mirror_index,
                                                     up_axis)
    crops = [_crop(rng, int(T), cfg) for T in lengths]
    maps = [_view_map(rng, a, b, cfg) for a, b in crops]
    return _view(rng, x, feats, maps, np.array(crops, np.int64).reshape(-1, 2), cfg, mi,
                 up_axis, is_torch)


def _checked_batch(
    x: Any, lengths: Any, features: Any | None, mirror_index: np.ndarray | None, up_axis: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, bool]:  # fmt: skip
    """The batch as numpy, checked: x, features, lengths, mirror index, whether x was torch."""
    is_torch = type(x).__module__.startswith("torch")
    x = _numpy(x)
    feats = None if features is None else _numpy(features)
    lengths = np.asarray(_numpy(lengths), np.int64)
    B, T, J, C = x.shape
    if np.any(lengths < 1) or np.any(lengths > T):
        raise ValueError(f"lengths must be in [1, {T}], got {lengths}")
    if C not in (2, 3) or not 0 <= up_axis < C:
        raise ValueError(f"need 2D or 3D joints and 0 <= up_axis < C; got C={C}, up_axis={up_axis}")
    mi = None if mirror_index is None else _check_mirror(_numpy(mirror_index), J)
    return x, feats, lengths, mi, is_torch


def _view(
    rng: np.random.Generator, x: np.ndarray, feats: np.ndarray | None,
    maps: list[np.ndarray], crops: np.ndarray, cfg: AugmentConfig,
    mi: np.ndarray | None, up_axis: int, is_torch: bool,
) -> dict[str, Any]:  # fmt: skip
    """One view from its index maps: gather, spatial transform, dropout, features."""
    g, mask = _pad_maps(maps)
    joints, params = _spatial(rng, _gather(x, g, mask), mask, cfg, mi, up_axis)
    if cfg.joint_dropout > 0:
        joints = _drop_joints(rng, joints, mask, cfg.joint_dropout, mi)
    f = None
    if feats is not None:
        f = _gather(feats, g, mask)
        if cfg.feature_noise_std > 0:
            noise = rng.normal(0.0, cfg.feature_noise_std, f.shape)
            f = np.where(mask[..., None], f + noise, 0.0).astype(np.float32)
    view = dict(joints=joints, features=f, mask=mask, g=g, lengths=mask.sum(1),
                crop=crops, **params)  # fmt: skip
    return _to_torch(view) if is_torch else view


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _to_torch(view: dict[str, Any]) -> dict[str, Any]:
    import torch  # only when the caller works in torch

    return {k: None if v is None else torch.from_numpy(np.ascontiguousarray(v))
            for k, v in view.items()}  # fmt: skip

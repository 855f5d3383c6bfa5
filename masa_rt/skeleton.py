"""Joint layouts and the geometry every consumer of skeletons shares.

A *layout* names the joints of a skeleton, their bone tree, the left/right counterpart of
each joint (for mirror augmentation), which joints define the root and which bones define
the scale. Layouts are data carried in every sequence file (by name), never guessed from a
joint count.

All operations take ``joints`` of shape ``(..., J, C)`` (any leading dims, e.g. ``(T, J, C)``
or ``(B, T, J, C)``) and are NaN-safe: NaN marks a missing joint, which stays NaN and never
poisons the other joints; an all-NaN frame stays all-NaN. Nothing here raises or warns on
missing data, because live headsets lose hands all the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LAYOUTS",
    "Layout",
    "UnknownLayoutError",
    "UnsupportedConversionError",
    "apply_map",
    "conversion_map",
    "convert",
    "flatten_frames",
    "get_layout",
    "mirror",
    "normalise",
    "register_layout",
    "rotate",
    "rotation_2d",
    "rotation_about",
    "topological_order",
    "valid_mask",
]


class UnknownLayoutError(ValueError):
    """A layout name that is not in :data:`LAYOUTS`."""


class UnsupportedConversionError(ValueError):
    """``convert`` was asked for a pair of layouts it has no joint mapping for."""


@dataclass(frozen=True)
class Layout:
    """A named skeleton.

    ``parents`` lists the bone tree (-1 for a tree root). The built-in tables list it in
    topological order (parent index < joint index), so the first joint of each connected
    part is a root even where anatomy would root elsewhere (e.g. ``body25`` starts at the
    nose); a declared layout (``masa_rt.layout_file``) keeps its tracker's joint order, so
    its parents may come after their children: walk bones in :func:`topological_order`.
    ``mirror[i]`` is the left/right counterpart of joint ``i`` (``i`` itself on the midline).
    The root is the nan-mean of the ``root`` joints; the scale is the nan-mean length of
    the ``ref_bone`` pairs. ``up_axis`` is the vertical coordinate (rotation augmentation
    turns about it).
    """

    name: str
    joint_names: tuple[str, ...]
    parents: tuple[int, ...]
    mirror: tuple[int, ...]
    root: tuple[int, ...]
    ref_bone: tuple[tuple[int, int], ...]
    dims: int
    up_axis: int = 1

    def __post_init__(self) -> None:
        # Layouts are hand-written tables: catch a typo at import time, not in training.
        j = len(self.joint_names)
        for field in ("parents", "mirror"):
            if len(getattr(self, field)) != j:
                raise ValueError(f"layout {self.name}: {field}: expected {j} entries, "
                                 f"found {len(getattr(self, field))}")
        for i, p in enumerate(self.parents):
            if not (p == -1 or 0 <= p < j) or p == i:
                raise ValueError(f"layout {self.name}: parents[{i}]: expected -1 or another "
                                 f"joint's index in [0, {j}), found {p}")
        topological_order(self.parents, self.name)  # a cycle is an error
        for i, m in enumerate(self.mirror):
            if not (0 <= m < j and self.mirror[m] == i):
                raise ValueError(f"layout {self.name}: mirror[{i}]: expected an involution, "
                                 f"found {m}")
        used = list(self.root) + [k for pair in self.ref_bone for k in pair]
        if not self.root or not self.ref_bone or any(not 0 <= k < j for k in used):
            raise ValueError(f"layout {self.name}: root/ref_bone: expected joint indices "
                             f"in [0, {j}), found {self.root} / {self.ref_bone}")
        if self.dims not in (2, 3) or not 0 <= self.up_axis < self.dims:
            raise ValueError(f"layout {self.name}: dims/up_axis: expected dims in {{2, 3}} "
                             f"and up_axis < dims, found {self.dims} / {self.up_axis}")

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def index(self, joint_name: str) -> int:
        """Index of a joint by name (``ValueError`` naming the layout if absent)."""
        try:
            return self.joint_names.index(joint_name)
        except ValueError:
            raise ValueError(f"layout {self.name}: no joint named {joint_name!r}") from None


def topological_order(parents: tuple[int, ...] | list[int], name: str = "") -> list[int]:
    """Joint indices with every parent before its children (stable: joint order where it
    already is one). A cycle raises ``ValueError`` naming the layout and a joint on it."""
    order: list[int] = []
    placed = [False] * len(parents)
    for start in range(len(parents)):
        chain, j = [], start
        while j != -1 and not placed[j]:  # climb to a placed joint or a tree root
            if j in chain:
                raise ValueError(f"layout {name}: parents: a cycle through joint {j}")
            chain.append(j)
            j = parents[j]
        for k in reversed(chain):
            placed[k] = True
            order.append(k)
    return order


# ---------------------------------------------------------------------------------------
# Layout tables
# ---------------------------------------------------------------------------------------

_FINGERS = ("thumb", "index", "middle", "ring", "pinky")


def _chain_parents(start: int, lengths: tuple[int, ...], base: int) -> list[int]:
    """Parents for fingers that hang off joint ``base``, each a chain of ``lengths[k]``."""
    parents, i = [], start
    for n in lengths:
        parents += [base] + [i + k for k in range(n - 1)]
        i += n
    return parents


def _two_hands(name: str, one: list[str], one_parents: list[int], root: int,
               bone_end: int, dims: int = 3) -> Layout:
    """Left hand then right hand of the same single-hand table; mirror swaps the hands."""
    n = len(one)
    names = [f"l_{s}" for s in one] + [f"r_{s}" for s in one]
    parents = one_parents + [p + n if p >= 0 else -1 for p in one_parents]
    mirror_map = [i + n for i in range(n)] + list(range(n))
    return Layout(name, tuple(names), tuple(parents), tuple(mirror_map),
                  root=(root, root + n), ref_bone=((root, bone_end), (root + n, bone_end + n)),
                  dims=dims)


def _mano_hand() -> tuple[list[str], list[int]]:
    # MANO / H2O order: wrist, then per finger 4 joints from the base (thumb CMC, other
    # fingers MCP) to the tip.
    names = ["wrist"] + [f"{f}{k}" for f in _FINGERS for k in range(1, 5)]
    return names, [-1] + _chain_parents(1, (4,) * 5, base=0)


def _mediapipe_hand() -> tuple[list[str], list[int]]:
    names = ["wrist", "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip"]
    for f in _FINGERS[1:]:
        names += [f"{f}_mcp", f"{f}_pip", f"{f}_dip", f"{f}_tip"]
    return names, [-1] + _chain_parents(1, (4,) * 5, base=0)


def _openxr_hand() -> tuple[list[str], list[int]]:
    # XR_EXT_hand_tracking order. The palm comes first in that enum, so with parents in
    # topological order the palm is the tree root and the wrist hangs off it.
    names = ["palm", "wrist", "thumb_metacarpal", "thumb_proximal", "thumb_distal", "thumb_tip"]
    for f in ("index", "middle", "ring", "little"):
        names += [f"{f}_{s}" for s in ("metacarpal", "proximal", "intermediate", "distal", "tip")]
    return names, [-1, 0] + _chain_parents(2, (4, 5, 5, 5, 5), base=1)


def _webxr_hand() -> tuple[list[str], list[int]]:
    # WebXR Hand Input's XRHandJoint names, in the spec's order: the wrist, the thumb's 4
    # joints, then 5 per finger (metacarpal, phalanx-proximal/-intermediate/-distal, tip).
    # The names are the spec's own strings, so a page can index joints by them directly.
    names = ["wrist", "thumb-metacarpal", "thumb-phalanx-proximal", "thumb-phalanx-distal",
             "thumb-tip"]
    for f in ("index", "middle", "ring", "pinky"):
        names += [f"{f}-finger-{s}" for s in ("metacarpal", "phalanx-proximal",
                                              "phalanx-intermediate", "phalanx-distal", "tip")]
    return names, [-1] + _chain_parents(1, (4, 5, 5, 5, 5), base=0)


def _h2o_hands() -> Layout:
    names, parents = _mano_hand()
    return _two_hands("h2o_hands", names, parents, root=0, bone_end=names.index("middle1"))


def _mediapipe_hand21() -> Layout:
    names, parents = _mediapipe_hand()
    return Layout("mediapipe_hand21", tuple(names), tuple(parents), tuple(range(21)),
                  root=(0,), ref_bone=((0, names.index("middle_mcp")),), dims=3)


def _openxr_hands26() -> Layout:
    names, parents = _openxr_hand()
    # Scale bone = wrist -> middle proximal (the MCP), the same bone as h2o_hands uses.
    return _two_hands("openxr_hands26", names, parents, root=names.index("wrist"),
                      bone_end=names.index("middle_proximal"))


def _webxr_hands25() -> Layout:
    names, parents = _webxr_hand()
    # Scale bone = wrist -> middle phalanx-proximal (the MCP), as for the other hands.
    return _two_hands("webxr_hands25", names, parents, root=names.index("wrist"),
                      bone_end=names.index("middle-finger-phalanx-proximal"))


_BODY25_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
    "MidHip", "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar",
    "LEar", "LBigToe", "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel",
)
# OpenPose's limb list, rooted at the nose so that parent index < joint index.
_BODY25_PARENTS = (-1, 0, 1, 2, 3, 1, 5, 6, 1, 8, 9, 10, 8, 12, 13, 0, 0, 15, 16, 14, 19, 14,
                   11, 22, 11)


def _mirror_by_prefix(names: tuple[str, ...], left: str, right: str) -> tuple[int, ...]:
    """Counterpart of each joint: the same name with the side prefix swapped."""
    def other(n: str) -> str:
        if n.startswith(left):
            return right + n[len(left):]
        if n.startswith(right):
            return left + n[len(right):]
        return n
    return tuple(names.index(other(n)) for n in names)


def _body25() -> Layout:
    n = _BODY25_NAMES
    return Layout("body25", n, _BODY25_PARENTS, _mirror_by_prefix(n, "L", "R"),
                  root=(n.index("MidHip"),), ref_bone=((n.index("Neck"), n.index("MidHip")),),
                  dims=3)


_PENN13_NAMES = (
    "head", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist", "l_hip",
    "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)


def _penn13() -> Layout:
    n = _PENN13_NAMES
    # Image coordinates: up_axis = 1 is the image y axis, which points *down*; only the
    # axis matters for augmentation, not its sign.
    return Layout("penn13", n, (-1, 0, 0, 1, 2, 3, 4, 1, 2, 7, 8, 9, 10),
                  _mirror_by_prefix(n, "l_", "r_"), root=(7, 8), ref_bone=((1, 7), (2, 8)),
                  dims=2, up_axis=1)


_COCO17_NAMES = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow",
    "r_elbow", "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle",
    "r_ankle",
)


def _coco17() -> Layout:
    """COCO's 17 keypoints (most 2D pose detectors: OpenPifPaf, YOLO-pose, RTMPose, ...),
    image coordinates. Trees rooted at the nose (face) and at each shoulder and hip, in
    topological order; root the hips, scale the shoulder-hip bones as penn13 does."""
    n = _COCO17_NAMES
    parents = (-1, 0, 0, 1, 2, -1, -1, 5, 6, 7, 8, 5, 6, 11, 12, 13, 14)
    return Layout("coco17", n, parents, _mirror_by_prefix(n, "l_", "r_"), root=(11, 12),
                  ref_bone=((5, 11), (6, 12)), dims=2, up_axis=1)


_MEDIAPIPE_POSE33_NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
    "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index", "left_thumb",
    "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)


def _mediapipe_pose33() -> Layout:
    """MediaPipe Pose's 33 landmarks, their image x, y (the z MediaPipe adds is relative
    depth, not a third coordinate of the same scale). Face rooted at the nose, arms at
    the shoulders, legs at the hips; left/right as MediaPipe names them (the person's)."""
    n = _MEDIAPIPE_POSE33_NAMES
    parents = (-1, 0, 1, 2, 0, 4, 5, 3, 6, 0, 0, -1, -1, 11, 12, 13, 14, 15, 16, 15, 16,
               15, 16, 11, 12, 23, 24, 25, 26, 27, 28, 27, 28)
    swap = {"left": "right", "right": "left"}
    mirror = tuple(n.index("_".join(swap.get(w, w) for w in name.split("_"))) for name in n)
    return Layout("mediapipe_pose33", n, parents, mirror, root=(23, 24),
                  ref_bone=((11, 23), (12, 24)), dims=2, up_axis=1)


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (_h2o_hands(), _mediapipe_hand21(), _openxr_hands26(), _webxr_hands25(),
                _body25(), _penn13(), _coco17(), _mediapipe_pose33())
}


def register_layout(layout: Layout, maps: dict[str, np.ndarray] | None = None) -> None:
    """Add a declared layout (``masa_rt.layout_file``, which checks names and conflicts)
    to :data:`LAYOUTS`, with its joint maps to other layouts (``dst`` name -> for each
    ``dst`` joint, the ``layout`` joint it copies, -1: missing), used by
    :func:`conversion_map` like the built-in ones."""
    LAYOUTS[layout.name] = layout
    for dst, m in (maps or {}).items():
        frozen = np.array(m, dtype=np.int64)
        _DIRECT[(layout.name, dst)] = frozen.copy  # a fresh array per call, like the others


def get_layout(name: str | Layout) -> Layout:
    """The registered layout called ``name`` (a ``Layout`` passes through)."""
    if isinstance(name, Layout):
        return name
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise UnknownLayoutError(
            f"unknown layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}"
        ) from None


# ---------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------

def _as_joints(joints: np.ndarray, layout: Layout | None = None) -> np.ndarray:
    """Float array of shape (..., J, C), checked against ``layout`` when given."""
    x = np.asarray(joints)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.ndim < 2:
        raise ValueError(f"joints: expected shape (..., J, C), found {x.shape}")
    if layout is not None and x.shape[-2:] != (layout.num_joints, layout.dims):
        raise ValueError(f"joints: expected (..., {layout.num_joints}, {layout.dims}) for "
                         f"layout {layout.name}, found {x.shape}")
    return x


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without the 'Mean of empty slice' warning: empty slices give NaN."""
    present = ~np.isnan(x)
    count = present.sum(axis=axis)
    total = np.where(present, x, 0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(x.dtype)


def _root(x: np.ndarray, layout: Layout) -> np.ndarray:
    """(..., C): per-coordinate nan-mean of the root joints."""
    return _nanmean(x[..., list(layout.root), :], axis=-2)


def _scale(x: np.ndarray, layout: Layout) -> np.ndarray:
    """(...,): nan-mean reference bone length; NaN where no reference bone is visible."""
    a, b = (list(side) for side in zip(*layout.ref_bone, strict=True))
    lengths = np.linalg.norm(x[..., a, :] - x[..., b, :], axis=-1)
    return _nanmean(lengths, axis=-1)


def _first_valid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Along the time axis (the last of ``valid``), the value at the first valid frame.

    ``values`` is (..., T) or (..., T, C); where no frame is valid the first frame's value
    is taken, which is then invalid too (NaN), as wanted.
    """
    first = np.argmax(valid, axis=-1)[..., None]
    if values.ndim == valid.ndim + 1:
        return np.take_along_axis(values, first[..., None], axis=-2)[..., 0, :]
    return np.take_along_axis(values, first, axis=-1)[..., 0]


def normalise(joints: np.ndarray, layout: Layout | str,
              root_mode: str = "per_frame") -> np.ndarray:
    """Centre on the root and divide by the reference bone length.

    ``root_mode="per_frame"``: every frame uses its own root and scale, so the output is
    invariant to per-frame translation and positive scale. ``"first_frame"`` (needs
    ``(..., T, J, C)``): root and scale are taken from the first frame where each is valid,
    so global motion over the sequence is kept; that choice is causal and works on a live
    stream. A zero, NaN or infinite scale is replaced by 1 instead of producing inf.
    """
    layout = get_layout(layout)
    x = _as_joints(joints, layout)
    root, scale = _root(x, layout), _scale(x, layout)
    if root_mode == "first_frame":
        if x.ndim < 3:
            raise ValueError(f"normalise: root_mode 'first_frame': expected joints "
                             f"(..., T, J, C), found {x.shape}")
        root = _first_valid(root, np.isfinite(root).all(axis=-1))[..., None, :]
        ok = np.isfinite(scale) & (scale > 0)
        scale = _first_valid(scale, ok)[..., None]
    elif root_mode != "per_frame":
        raise ValueError(f"normalise: root_mode: expected 'per_frame' or 'first_frame', "
                         f"found {root_mode!r}")
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1).astype(x.dtype)
    return (x - root[..., None, :]) / scale[..., None, None]


def mirror(joints: np.ndarray, layout: Layout | str, axis: int = 0) -> np.ndarray:
    """Reflect across the plane ``coordinate[axis] = 0`` and swap left/right joints.

    Both steps are needed: negating a coordinate alone turns a left hand into a right hand
    *shape* that still sits in the left hand's slots.
    """
    layout = get_layout(layout)
    x = _as_joints(joints, layout)
    if not 0 <= axis < layout.dims:
        raise ValueError(f"mirror: axis: expected 0..{layout.dims - 1}, found {axis}")
    out = x[..., list(layout.mirror), :]  # fancy indexing copies: safe to negate in place
    out[..., axis] *= -1
    return out


def rotate(joints: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Apply rotation(s) ``R`` (``(C, C)`` or ``(..., C, C)``, broadcast over leading dims).

    A frame's ``(J, C)`` joints are row vectors, so the result is ``joints @ R.T``; a NaN
    joint stays NaN without touching the other joints of its frame.
    """
    x = _as_joints(joints)
    R = np.asarray(R)
    c = x.shape[-1]
    if R.ndim < 2 or R.shape[-2:] != (c, c):
        raise ValueError(f"rotate: R: expected shape (..., {c}, {c}), found {R.shape}")
    return np.matmul(x, np.swapaxes(R, -1, -2).astype(x.dtype, copy=False))


def rotation_about(axis: int, angle: float | np.ndarray) -> np.ndarray:
    """3D right-handed rotation matrices about coordinate ``axis``: ``angle`` (...,) in
    radians gives ``(..., 3, 3)``. E.g. ``rotation_about(layout.up_axis, yaw)``."""
    if axis not in (0, 1, 2):
        raise ValueError(f"rotation_about: axis: expected 0, 1 or 2, found {axis}")
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    R = np.zeros(angle.shape + (3, 3))
    i, j = (axis + 1) % 3, (axis + 2) % 3
    R[..., axis, axis] = 1.0
    R[..., i, i], R[..., i, j] = c, -s
    R[..., j, i], R[..., j, j] = s, c
    return R


def rotation_2d(angle: float | np.ndarray) -> np.ndarray:
    """In-plane rotation matrices ``(..., 2, 2)`` for 2D layouts (the image-normal axis)."""
    return rotation_about(2, angle)[..., :2, :2]


def valid_mask(joints: np.ndarray) -> np.ndarray:
    """(..., J) bool: the joint has all coordinates finite."""
    return np.isfinite(_as_joints(joints)).all(axis=-1)


def flatten_frames(joints: np.ndarray) -> np.ndarray:
    """(..., J, C) -> (..., J * C) float32 model input, missing (non-finite) values -> 0."""
    x = _as_joints(joints)
    flat = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    return np.where(np.isfinite(flat), flat, 0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Conversion between layouts
# ---------------------------------------------------------------------------------------
# Every hand layout maps to h2o_hands (the hub); other hand pairs go through it.
# A map is an int array over the *destination* joints: the source joint to copy, or -1
# for a joint the source does not have (filled with NaN).

def _openxr_to_h2o() -> np.ndarray:
    """h2o_hands joint <- openxr_hands26 joint.

    MANO's wrist is OpenXR's wrist. MANO's finger joints start at the joint the finger
    bends at (thumb CMC, other fingers MCP), which is where OpenXR's thumb *metacarpal*
    and the other fingers' *proximal* joints sit. So thumb1..4 <- thumb metacarpal,
    proximal, distal, tip and index1..4 <- index proximal, intermediate, distal, tip
    (likewise middle, ring, pinky <- little). OpenXR's palm and the four finger
    metacarpals have no MANO counterpart and are dropped.
    """
    oxr = LAYOUTS["openxr_hands26"]
    one = [oxr.index("l_wrist")]
    one += [oxr.index(f"l_thumb_{s}") for s in ("metacarpal", "proximal", "distal", "tip")]
    for f in ("index", "middle", "ring", "little"):
        one += [oxr.index(f"l_{f}_{s}") for s in ("proximal", "intermediate", "distal", "tip")]
    return np.array(one + [i + 26 for i in one])


def _webxr_to_h2o() -> np.ndarray:
    """h2o_hands joint <- webxr_hands25 joint, on the same anatomy as :func:`_openxr_to_h2o`
    (WebXR's joints are OpenXR's without the palm): thumb1..4 <- thumb metacarpal,
    phalanx-proximal, phalanx-distal, tip; index1..4 <- index phalanx-proximal,
    -intermediate, -distal, tip (likewise middle, ring, pinky). The four finger
    metacarpals have no MANO counterpart and are dropped.
    """
    wxr = LAYOUTS["webxr_hands25"]
    one = [wxr.index("l_wrist")]
    one += [wxr.index(f"l_thumb-{s}") for s in ("metacarpal", "phalanx-proximal",
                                                "phalanx-distal", "tip")]
    for f in ("index", "middle", "ring", "pinky"):
        one += [wxr.index(f"l_{f}-finger-{s}") for s in ("phalanx-proximal",
                                                         "phalanx-intermediate",
                                                         "phalanx-distal", "tip")]
    return np.array(one + [i + 25 for i in one])


def _single_to_h2o(hand: str | None) -> np.ndarray:
    """h2o_hands joint <- single-hand joint (same 21-joint order); other hand missing."""
    if hand not in ("left", "right"):
        raise ValueError(f"convert: hand: expected 'left' or 'right' for a single-hand "
                         f"layout, found {hand!r}")
    m = np.full(42, -1)
    offset = 0 if hand == "left" else 21
    m[offset:offset + 21] = np.arange(21)
    return m


def _to_hub(name: str, hand: str | None) -> np.ndarray:
    if name == "h2o_hands":
        return np.arange(42)
    if name == "openxr_hands26":
        return _openxr_to_h2o()
    if name == "webxr_hands25":
        return _webxr_to_h2o()
    if name == "mediapipe_hand21":
        return _single_to_h2o(hand)
    raise KeyError(name)


def _invert(m: np.ndarray, size: int) -> np.ndarray:
    """Inverse of an injective map: for each of ``size`` joints, where it went (or -1)."""
    inv = np.full(size, -1)
    has = m >= 0
    inv[m[has]] = np.nonzero(has)[0]
    return inv


def _coco17_to_penn13() -> np.ndarray:
    """penn13 joint <- coco17 joint: the same joints by name, Penn's head <- COCO's nose.

    Names are copied as they are; Penn Action's own left/right look viewer-relative in
    front views (masa_rt.penn), COCO's are the person's: models trained with mirror
    augmentation see both."""
    coco = LAYOUTS["coco17"].joint_names
    return np.array([coco.index("nose" if j == "head" else j) for j in _PENN13_NAMES])


def _mediapipe_pose33_to_penn13() -> np.ndarray:
    """penn13 joint <- mediapipe_pose33 landmark: Penn's head <- the nose, the rest by
    name (``l_`` <- ``left_``); hands, feet and face details dropped."""
    mp = LAYOUTS["mediapipe_pose33"].joint_names
    return np.array([mp.index("nose" if j == "head" else
                              j.replace("l_", "left_", 1) if j.startswith("l_") else
                              j.replace("r_", "right_", 1)) for j in _PENN13_NAMES])


# Direct (src, dst) maps outside the hand hub: dst joint <- src joint, -1 = missing.
_DIRECT = {("coco17", "penn13"): _coco17_to_penn13,
           ("mediapipe_pose33", "penn13"): _mediapipe_pose33_to_penn13}


def conversion_map(src: Layout | str, dst: Layout | str, hand: str | None = None
                   ) -> np.ndarray:
    """For each ``dst`` joint, the ``src`` joint it copies (-1: missing, NaN). Raises
    :class:`UnsupportedConversionError` for a pair with no mapping, or a single hand
    without ``hand``."""
    src, dst = get_layout(src), get_layout(dst)
    if src.name == dst.name:
        return np.arange(src.num_joints)
    if (src.name, dst.name) in _DIRECT:
        return _DIRECT[(src.name, dst.name)]()
    try:
        return _conversion_map(src, dst, hand)
    except ValueError as exc:  # a single hand without saying which
        if isinstance(exc, UnsupportedConversionError):
            raise
        raise UnsupportedConversionError(str(exc)) from None


def _conversion_map(src: Layout, dst: Layout, hand: str | None) -> np.ndarray:
    try:
        src_to_hub = _to_hub(src.name, hand)   # hub joint <- src joint
        dst_to_hub = _to_hub(dst.name, hand)   # hub joint <- dst joint
    except KeyError:
        raise UnsupportedConversionError(
            f"convert: no joint mapping from {src.name} to {dst.name}; supported: "
            f"identity, between h2o_hands, openxr_hands26, webxr_hands25, "
            f"mediapipe_hand21, and "
            f"{', '.join(f'{a} -> {b}' for a, b in _DIRECT)}"
        ) from None
    hub_to_dst = _invert(dst_to_hub, dst.num_joints)  # dst joint <- hub joint
    return np.where(hub_to_dst >= 0, src_to_hub[np.maximum(hub_to_dst, 0)], -1)


def convert(joints: np.ndarray, src: Layout | str, dst: Layout | str,
            hand: str | None = None) -> np.ndarray:
    """Re-index joints from layout ``src`` to layout ``dst``; shared joints are copied
    exactly, joints ``src`` lacks become NaN.

    Supported: any pair among ``h2o_hands``, ``openxr_hands26`` and ``mediapipe_hand21``
    (see :func:`_openxr_to_h2o` for the OpenXR mapping), ``coco17 -> penn13``, and
    ``src == dst``. A single
    hand (``mediapipe_hand21``) needs ``hand="left"|"right"``: which hand of a two-hand
    layout it is or comes from. Other pairs raise :class:`UnsupportedConversionError`.
    """
    src, dst = get_layout(src), get_layout(dst)
    x = _as_joints(joints, src)
    if src.name == dst.name:
        return x.copy()
    return apply_map(x, conversion_map(src, dst, hand))


def apply_map(joints: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``joints`` (..., J_src, C) re-indexed by a :func:`conversion_map` (NaN where -1)."""
    x = np.asarray(joints)
    out = x[..., np.maximum(m, 0), :]  # a copy (fancy indexing)
    out[..., m < 0, :] = np.nan
    return out

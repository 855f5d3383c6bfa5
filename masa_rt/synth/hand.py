"""Forward kinematics of a 21-joint hand (MANO / H2O joint order), vectorised over frames.

Joint order: wrist, then thumb, index, middle, ring, pinky with 4 joints each from the
base (thumb CMC, other fingers MCP) to the tip -- the order of one hand in ``h2o_hands``.

The hand frame (right hand): origin at the wrist, ``x`` radial (towards the thumb), ``y``
distal (towards the fingertips), ``z`` palmar (out of the palm); this triple is
right-handed. A left hand is the same geometry with local ``x`` negated, so one wrist
rotation places both hands symmetrically and a mirrored world (``skeleton.mirror``) of a
right hand is exactly a left hand.

Fingers bend in the plane spanned by their (slightly splayed) axis and the palm normal;
one *curl* value in [0, 1] per finger drives all three of its joints, which is how grasps
look at the resolution hand trackers report. The thumb additionally *opposes*: it turns
about the distal axis out of the palm plane, and its flexion bends it towards a point in
front of the palm, so a closed thumb ends up facing the fingers rather than lying on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from masa_rt.skeleton import rotation_about as _rot

FINGERS = ("thumb", "index", "middle", "ring", "pinky")
JOINT_NAMES = ("wrist",) + tuple(f"{f}{k}" for f in FINGERS for k in range(1, 5))

# Finger shape: (thumb, index, middle, ring, pinky) curls in [0, 1], then thumb opposition.
GRASPS: dict[str, tuple[float, ...]] = {
    "open": (0.0, 0.0, 0.0, 0.0, 0.0, 0.1),
    "flat": (0.0, 0.05, 0.05, 0.05, 0.05, 0.0),
    "relaxed": (0.2, 0.25, 0.3, 0.35, 0.4, 0.3),
    "power": (0.6, 0.75, 0.8, 0.85, 0.85, 0.8),   # around a carton, cup or bottle
    "pinch": (0.55, 0.45, 0.65, 0.75, 0.8, 0.9),   # thumb tip to index tip
    "tripod": (0.5, 0.45, 0.45, 0.7, 0.8, 0.85),   # thumb, index, middle: a cap or spoon
    "claw": (0.4, 0.45, 0.45, 0.45, 0.45, 0.7),    # over a lid, on a cloth
    "point": (0.6, 0.0, 0.9, 0.9, 0.9, 0.6),
}

# Base joints in the right-hand frame (metres): thumb CMC, then index..pinky MCP.
_BASES = np.array([
    [0.020, 0.025, 0.008],
    [0.024, 0.088, 0.000],
    [0.004, 0.092, 0.000],
    [-0.015, 0.087, 0.000],
    [-0.032, 0.078, 0.000],
])
# Bone lengths per finger: base->2, 2->3, 3->tip (an adult hand of about 19 cm).
_PHALANGES = np.array([
    [0.045, 0.032, 0.027],
    [0.040, 0.024, 0.020],
    [0.045, 0.028, 0.021],
    [0.042, 0.027, 0.021],
    [0.033, 0.020, 0.019],
])
# Splay of the four fingers about the palm normal (degrees, + = radial).
_SPLAY = np.radians([6.0, 0.0, -5.0, -11.0])
# Joint flexion at curl 1 (degrees): MCP, PIP, DIP for fingers; CMC, MCP, IP for the thumb.
_FINGER_FLEX = np.radians([80.0, 100.0, 70.0])
_THUMB_FLEX = np.radians([20.0, 45.0, 65.0])
# The same per finger, thumb first: how far one unit of curl bends each joint (read by
# trainer.demo_replay.vary_fingers, which jitters a recorded hand's curls in these units).
FLEX_PER_CURL = np.stack([_THUMB_FLEX] + [_FINGER_FLEX] * 4)  # (5, 3) radians
_THUMB_AXIS = np.array([0.8, 0.6, 0.25]) / np.linalg.norm([0.8, 0.6, 0.25])
_THUMB_OPPOSITION = np.radians(60.0)
_THUMB_TARGET = np.array([0.005, 0.060, 0.040])  # where a flexing thumb heads: over the palm

# A right hand, palm down, fingers pointing forward (-z), thumb towards the body midline.
REST_ROTATION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class HandShape:
    """Bone geometry of one subject's hands (both hands share it)."""

    bases: np.ndarray      # (5, 3) thumb CMC and finger MCPs in the right-hand frame
    phalanges: np.ndarray  # (5, 3) bone lengths from the base joint to the tip

    @classmethod
    def default(cls) -> HandShape:
        return cls(_BASES.copy(), _PHALANGES.copy())

    def varied(self, rng: np.random.Generator, scale: float, jitter: float) -> HandShape:
        """This shape scaled by ``scale`` with every bone independently within +-jitter."""
        metacarpal = 1 + rng.uniform(-jitter, jitter, size=(5, 1))
        phalanx = 1 + rng.uniform(-jitter, jitter, size=(5, 3))
        return HandShape(self.bases * metacarpal * scale, self.phalanges * phalanx * scale)


@dataclass(frozen=True)
class HandPose:
    """Target of one hand at the end of a phase.

    ``rot`` = (yaw, pitch, roll) in degrees applied as ``Ry(yaw) Rx(pitch) Rz(roll)`` to the
    rest orientation (palm down, fingers forward): yaw turns about the vertical, pitch
    tips the fingers up (+) or down (-), roll turns about the forearm.
    """

    pos: tuple[float, float, float]
    rot: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grasp: str = "relaxed"

    def mirrored(self) -> HandPose:
        """The same pose for the other hand, reflected across the body midline (x = 0)."""
        x, y, z = self.pos
        yaw, pitch, roll = self.rot
        return HandPose((-x, y, z), (-yaw, pitch, -roll), self.grasp)

    def vector(self) -> np.ndarray:
        """(12,) = position (3), rotation in degrees (3), five curls and opposition (6)."""
        if self.grasp not in GRASPS:
            raise ValueError(f"hand pose: grasp: expected one of {', '.join(GRASPS)}, "
                             f"found {self.grasp!r}")
        return np.concatenate([self.pos, self.rot, GRASPS[self.grasp]]).astype(np.float64)


POSE_DIM = 12


def wrist_rotation(rot_deg: np.ndarray) -> np.ndarray:
    """(T, 3) yaw/pitch/roll in degrees -> (T, 3, 3) hand-frame-to-world rotations."""
    a = np.radians(rot_deg)
    return _rot(1, a[:, 0]) @ _rot(0, a[:, 1]) @ _rot(2, a[:, 2]) @ REST_ROTATION


def _chain(base: np.ndarray, axis: np.ndarray, bend: np.ndarray, lengths: np.ndarray,
           angles: np.ndarray) -> np.ndarray:
    """Joints of one planar finger chain: (T, 4, 3) from the base to the tip.

    Segment k points along ``cos(A_k) axis + sin(A_k) bend`` with ``A_k`` the cumulative
    flexion, so every bone keeps its length whatever the curl.
    """
    cum = np.cumsum(angles, axis=1)[..., None]                       # (T, 3, 1)
    dirs = np.cos(cum) * axis[:, None, :] + np.sin(cum) * bend[:, None, :]  # (T, 3, 3)
    tips = base + np.cumsum(lengths[None, :, None] * dirs, axis=1)
    return np.concatenate([np.broadcast_to(base, (len(cum), 1, 3)), tips], axis=1)


def _fingers_local(curl: np.ndarray, shape: HandShape) -> np.ndarray:
    """(T, 20, 3) finger joints of a right hand in its own frame, from (T, 6) curls."""
    t = len(curl)
    curl = np.clip(curl, 0.0, 1.0)
    palmar = np.broadcast_to([0.0, 0.0, 1.0], (t, 3))
    out = [_thumb_local(curl[:, 0], curl[:, 5], shape)]
    for f in range(1, 5):
        s = _SPLAY[f - 1]
        axis = np.broadcast_to([np.sin(s), np.cos(s), 0.0], (t, 3))
        angles = curl[:, f, None] * _FINGER_FLEX
        out.append(_chain(shape.bases[f], axis, palmar, shape.phalanges[f], angles))
    return np.concatenate(out, axis=1)


def _thumb_local(curl: np.ndarray, opposition: np.ndarray, shape: HandShape) -> np.ndarray:
    """(T, 4, 3) thumb joints: opposition turns its axis about ``y`` towards the palm."""
    phi = np.clip(opposition, 0.0, 1.0) * _THUMB_OPPOSITION
    # Turn about the distal axis y, taking radial +x towards palmar +z.
    ax = np.stack([_THUMB_AXIS[0] * np.cos(phi) - _THUMB_AXIS[2] * np.sin(phi),
                   np.full_like(phi, _THUMB_AXIS[1]),
                   _THUMB_AXIS[0] * np.sin(phi) + _THUMB_AXIS[2] * np.cos(phi)], axis=1)
    to_target = _THUMB_TARGET - shape.bases[0]
    bend = to_target - (ax @ to_target)[:, None] * ax
    bend /= np.linalg.norm(bend, axis=1, keepdims=True)
    angles = curl[:, None] * _THUMB_FLEX
    return _chain(shape.bases[0], ax, bend, shape.phalanges[0], angles)


def hand_fk(pose: np.ndarray, shape: HandShape, side: str) -> np.ndarray:
    """(T, 12) pose vectors (see :meth:`HandPose.vector`) -> (T, 21, 3) world joints."""
    if side not in ("left", "right"):
        raise ValueError(f"hand_fk: side: expected 'left' or 'right', found {side!r}")
    local = _fingers_local(pose[:, 6:12], shape)                    # (T, 20, 3)
    if side == "left":
        local = local * np.array([-1.0, 1.0, 1.0])
    R = wrist_rotation(pose[:, 3:6])                                 # (T, 3, 3)
    wrist = pose[:, None, 0:3]                                       # (T, 1, 3)
    fingers = wrist + local @ np.swapaxes(R, 1, 2)
    return np.concatenate([wrist, fingers], axis=1)


def two_hand_fk(params: np.ndarray, shape: HandShape) -> np.ndarray:
    """(T, 24) = left then right pose vectors -> (T, 42, 3) ``h2o_hands`` joints."""
    left = hand_fk(params[:, :POSE_DIM], shape, "left")
    right = hand_fk(params[:, POSE_DIM:], shape, "right")
    return np.concatenate([left, right], axis=1)

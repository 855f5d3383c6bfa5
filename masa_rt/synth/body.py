"""Forward kinematics of the 25-joint OpenPose BODY_25 skeleton, vectorised over frames.

The body stands at the origin facing ``+z`` with ``y`` up, so its right side is ``-x``.
A pose is a vector of joint angles (:data:`PARAMS`, degrees) plus a vertical ``lift``
(metres, for jumps). The feet stay flat and the whole body is lowered or raised every
frame so that the lowest foot joint touches the floor: a squat then sinks the hips by
itself, without hand-tuned pelvis heights that would drift from the leg angles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from masa_rt.skeleton import rotation_about as _rot

JOINT_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
    "MidHip", "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar",
    "LEar", "LBigToe", "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel",
)
_J = {name: i for i, name in enumerate(JOINT_NAMES)}

# Angles in degrees. Flexion raises a limb forward (+z), abduction sideways; knee and
# elbow flexion bend the lower segment backward / forward as anatomy does.
PARAMS = (
    "lift", "torso_pitch", "torso_roll", "head_pitch",
    "r_shoulder_abd", "r_shoulder_flex", "r_elbow", "l_shoulder_abd", "l_shoulder_flex",
    "l_elbow", "r_hip_flex", "r_hip_abd", "r_knee", "l_hip_flex", "l_hip_abd", "l_knee",
)
POSE_DIM = len(PARAMS)

# Bone lengths of a 1.75 m adult, metres.
_BONES = {
    "hip": 0.10, "spine": 0.52, "shoulder": 0.19, "upper_arm": 0.29, "forearm": 0.26,
    "thigh": 0.43, "shin": 0.42, "head": 1.0, "foot": 1.0,
}
_SIDE_BONES = ("upper_arm", "forearm", "thigh", "shin")
# Offsets of the face from the neck and of the foot from the ankle, scaled by "head" and
# "foot" (right side; the left side mirrors x).
_NOSE = np.array([0.0, 0.20, 0.08])
_EYE = np.array([-0.035, 0.035, -0.02])   # from the nose
_EAR = np.array([-0.075, 0.01, -0.10])
_BIG_TOE = np.array([0.025, -0.075, 0.16])  # medial side of the right foot is +x
_SMALL_TOE = np.array([-0.035, -0.075, 0.14])
_HEEL = np.array([0.0, -0.08, -0.05])
_DOWN = np.array([0.0, -1.0, 0.0])


@dataclass(frozen=True)
class BodyShape:
    """Bone lengths of one subject; limbs keep separate left and right lengths."""

    lengths: dict[str, float]

    @classmethod
    def default(cls) -> BodyShape:
        lengths = {k: v for k, v in _BONES.items() if k not in _SIDE_BONES}
        for k in _SIDE_BONES:
            lengths[f"r_{k}"] = lengths[f"l_{k}"] = _BONES[k]
        return cls(lengths)

    def varied(self, rng: np.random.Generator, scale: float, jitter: float) -> BodyShape:
        """This shape scaled by ``scale`` with every bone independently within +-jitter."""
        names = sorted(self.lengths)
        factors = 1 + rng.uniform(-jitter, jitter, size=len(names))
        return BodyShape({k: self.lengths[k] * f * scale for k, f in zip(names, factors,
                                                                          strict=True)})


def pose_vector(angles: dict[str, float]) -> np.ndarray:
    """(POSE_DIM,) from a name -> value dict; unnamed parameters are 0 (standing straight)."""
    unknown = set(angles) - set(PARAMS)
    if unknown:
        raise ValueError(f"body pose: unknown parameters {sorted(unknown)}; "
                         f"expected names from {', '.join(PARAMS)}")
    return np.array([float(angles.get(p, 0.0)) for p in PARAMS])


def _limb(root: np.ndarray, R: np.ndarray, upper: float, lower: float,
          bend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Middle and end joints (T, 3) of a two-bone limb hanging down from ``root``."""
    middle = root + upper * (R @ _DOWN)
    R2 = R @ _rot(0, bend)
    return middle, middle + lower * (R2 @ _DOWN), R2


def body_fk(params: np.ndarray, shape: BodyShape) -> np.ndarray:
    """(T, POSE_DIM) pose vectors -> (T, 25, 3) ``body25`` joints, feet on the floor."""
    p = {name: params[:, i] for i, name in enumerate(PARAMS)}
    a = {k: np.radians(v) for k, v in p.items() if k != "lift"}
    L = shape.lengths
    t = len(params)
    out = np.zeros((t, 25, 3))
    mirror = np.array([-1.0, 1.0, 1.0])

    torso = _rot(0, a["torso_pitch"]) @ _rot(2, a["torso_roll"])
    neck = torso @ np.array([0.0, L["spine"], 0.0])
    out[:, _J["Neck"]] = neck
    head = torso @ _rot(0, a["head_pitch"])
    nose = neck + head @ (_NOSE * L["head"])
    out[:, _J["Nose"]] = nose
    for side, sign in (("R", 1.0), ("L", -1.0)):
        flip = mirror if sign < 0 else np.ones(3)
        out[:, _J[f"{side}Eye"]] = nose + head @ (_EYE * flip * L["head"])
        out[:, _J[f"{side}Ear"]] = nose + head @ (_EAR * flip * L["head"])

    for side, sign in (("R", -1.0), ("L", 1.0)):
        s = side.lower()
        shoulder = neck + torso @ np.array([sign * L["shoulder"], -0.02, 0.0])
        arm = torso @ _rot(2, sign * a[f"{s}_shoulder_abd"]) @ _rot(0, -a[f"{s}_shoulder_flex"])
        elbow, wrist, _ = _limb(shoulder, arm, L[f"{s}_upper_arm"], L[f"{s}_forearm"],
                                -a[f"{s}_elbow"])
        out[:, _J[f"{side}Shoulder"]], out[:, _J[f"{side}Elbow"]] = shoulder, elbow
        out[:, _J[f"{side}Wrist"]] = wrist

        hip = np.broadcast_to([sign * L["hip"], 0.0, 0.0], (t, 3))
        leg = _rot(2, sign * a[f"{s}_hip_abd"]) @ _rot(0, -a[f"{s}_hip_flex"])
        knee, ankle, _ = _limb(hip, leg, L[f"{s}_thigh"], L[f"{s}_shin"], a[f"{s}_knee"])
        out[:, _J[f"{side}Hip"]], out[:, _J[f"{side}Knee"]] = hip, knee
        out[:, _J[f"{side}Ankle"]] = ankle
        # Feet stay flat: their offsets do not turn with the shin.
        flip = mirror if sign > 0 else np.ones(3)
        for name, offset in (("BigToe", _BIG_TOE), ("SmallToe", _SMALL_TOE), ("Heel", _HEEL)):
            out[:, _J[f"{side}{name}"]] = ankle + offset * flip * L["foot"]

    feet = [_J[f"{s}{n}"] for s in "RL" for n in ("BigToe", "SmallToe", "Heel")]
    floor = out[:, feet, 1].min(axis=1)
    out[:, :, 1] += (p["lift"] - floor)[:, None]
    return out

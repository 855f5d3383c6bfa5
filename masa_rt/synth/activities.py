"""The synthetic activities: named phases, canonical durations and the pose at each phase end.

An activity is a list of phases; each phase moves from the pose at the end of the previous
one (the rest pose for the first) to its own target. A phase names only what changes, so
a hand that holds a cup simply is not mentioned. Sub-motions are built by shared helpers
(reach + grasp, lift, release, return), so the two-hand activities share whole phases and
differ in the rest: similar enough to confuse a weak aligner, distinct enough to classify.

World frame (hands): metres, ``y`` up, the user stands at the origin facing ``-z``; a
table top is at about 0.85 m. Body activities stand at the origin facing ``+z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from masa_rt.synth import body
from masa_rt.synth.hand import HandPose


@dataclass(frozen=True)
class HandPhase:
    """One phase of a two-hand activity; a hand left as ``None`` holds its last target."""

    name: str
    seconds: float  # canonical duration (speed 1)
    left: HandPose | None = None
    right: HandPose | None = None


@dataclass(frozen=True)
class BodyPhase:
    """One phase of a body activity; parameters not named hold their last value."""

    name: str
    seconds: float
    angles: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ActivitySpec:
    """An activity: its group (``hands`` / ``body``), layout and phases."""

    name: str
    group: str
    phases: tuple[HandPhase, ...] | tuple[BodyPhase, ...]

    @property
    def layout(self) -> str:
        return "h2o_hands" if self.group == "hands" else "body25"

    @property
    def phase_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)

    @property
    def durations(self) -> np.ndarray:
        """(P,) canonical phase durations in seconds."""
        return np.array([p.seconds for p in self.phases])

    def keys(self) -> np.ndarray:
        """(P + 1, D) pose parameters: the rest pose, then the pose at each phase end."""
        if self.group == "hands":
            return _hand_keys(self.phases)
        return _body_keys(self.phases)


def _hand_keys(phases: tuple[HandPhase, ...]) -> np.ndarray:
    left, right = REST_LEFT, REST_RIGHT
    rows = [np.concatenate([left.vector(), right.vector()])]
    for p in phases:
        left = p.left or left
        right = p.right or right
        rows.append(np.concatenate([left.vector(), right.vector()]))
    return np.stack(rows)


def _body_keys(phases: tuple[BodyPhase, ...]) -> np.ndarray:
    angles = dict(BODY_REST)
    rows = [body.pose_vector(angles)]
    for p in phases:
        angles.update(p.angles)
        rows.append(body.pose_vector(angles))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------
# Two-hand activities
# ---------------------------------------------------------------------------------------

REST_RIGHT = HandPose((0.18, 0.89, -0.28), (0, 0, 0), "relaxed")
REST_LEFT = REST_RIGHT.mirrored()
SIDE_GRIP = -90.0  # right-hand roll that turns the palm towards the midline (cup, carton)


def _side(pos: tuple[float, float, float], grasp: str = "open", roll: float = SIDE_GRIP,
          pitch: float = 0.0, yaw: float = 0.0) -> HandPose:
    """A right hand beside an upright object, palm towards it."""
    return HandPose(pos, (yaw, pitch, roll), grasp)


def _left(pose: HandPose) -> HandPose:
    """Describe a left-hand target as the mirror image of a right-hand one."""
    return pose.mirrored()


def _reach_grasp(obj: str, *, right: HandPose, right_grasp: str, left: HandPose | None = None,
                 left_grasp: str | None = None) -> list[HandPhase]:
    """Shared sub-motion: reach an object with an open hand, then close the grasp."""
    def closed(p: HandPose | None, g: str | None) -> HandPose | None:
        return None if p is None or g is None else HandPose(p.pos, p.rot, g)

    return [HandPhase(f"reach_{obj}", 1.0, left=left, right=right),
            HandPhase(f"grasp_{obj}", 0.5, left=closed(left, left_grasp),
                      right=closed(right, right_grasp))]


def _moved(p: HandPose, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0,
           rot: tuple[float, float, float] | None = None, grasp: str | None = None) -> HandPose:
    x, y, z = p.pos
    return HandPose((x + dx, y + dy, z + dz), rot or p.rot, grasp or p.grasp)


def _release_return(left: HandPose | None, right: HandPose) -> list[HandPhase]:
    """Shared sub-motion: open the hands where they are, then go back to rest."""
    def opened(p: HandPose | None) -> HandPose | None:
        return None if p is None else HandPose(p.pos, p.rot, "open")

    return [HandPhase("release", 0.5, left=opened(left), right=opened(right)),
            HandPhase("return", 1.0, left=REST_LEFT, right=REST_RIGHT)]


def _pour_milk() -> list[HandPhase]:
    carton = _side((0.33, 0.95, -0.42))
    cup = _left(_side((0.10, 0.93, -0.40)))
    held = _moved(carton, dy=0.15, grasp="power")
    over_cup = _moved(held, dx=-0.23, dy=0.02)
    return [*_reach_grasp("carton", right=carton, right_grasp="power", left=cup,
                          left_grasp="power"),
            HandPhase("lift", 0.8, right=held),
            HandPhase("move_to_cup", 1.0, right=over_cup),
            HandPhase("tilt_pour", 1.2, right=_moved(over_cup, rot=(0, 0, -30))),  # thumb to cup
            HandPhase("untilt", 0.8, right=over_cup),
            HandPhase("place_carton", 1.0, right=_moved(carton, grasp="power")),
            *_release_return(cup, carton)]


def _open_bottle() -> list[HandPhase]:
    body_grip = _left(_side((0.02, 0.95, -0.42)))
    cap = HandPose((0.05, 1.12, -0.42), (0, -30, 0), "open")
    cap_held = _moved(cap, dy=0.10, grasp="tripod")
    bottle_up = _moved(body_grip, dy=0.10, grasp="power")
    twisted = _moved(cap_held, rot=(-90, -30, 0))
    aside = HandPose((0.25, 0.95, -0.40), (0, -30, 0), "tripod")
    return [*_reach_grasp("bottle", right=cap, right_grasp="tripod", left=body_grip,
                          left_grasp="power"),
            HandPhase("lift", 0.8, left=bottle_up, right=cap_held),
            HandPhase("twist_cap", 1.0, right=twisted),
            HandPhase("pull_cap", 0.8, right=_moved(twisted, dy=0.08)),
            HandPhase("place_bottle", 1.0, left=_moved(body_grip, grasp="power"), right=aside),
            *_release_return(body_grip, aside)]


def _stir_cup() -> list[HandPhase]:
    spoon = HandPose((0.25, 0.90, -0.36), (0, -20, 0), "open")
    handle = _left(_side((0.10, 0.93, -0.42)))
    over_cup = HandPose((0.03, 1.05, -0.42), (0, -50, 0), "pinch")
    return [*_reach_grasp("spoon", right=spoon, right_grasp="pinch", left=handle,
                          left_grasp="power"),
            HandPhase("lift", 0.8, right=_moved(spoon, dy=0.15, grasp="pinch")),
            HandPhase("move_to_cup", 1.0, right=over_cup),
            HandPhase("stir_forward", 0.6, right=_moved(over_cup, dy=-0.02, dz=-0.05)),
            HandPhase("stir_back", 0.6, right=_moved(over_cup, dy=-0.02, dz=0.03)),
            HandPhase("lift_out", 0.6, right=_moved(over_cup, dx=0.02, dy=0.08)),
            HandPhase("place_spoon", 1.0, right=_moved(spoon, grasp="pinch")),
            *_release_return(handle, spoon)]


def _pick_and_place() -> list[HandPhase]:
    block = HandPose((0.20, 0.97, -0.48), (0, -40, 0), "open")
    tray = HandPose((-0.25, 0.90, -0.50), (0, 0, 0), "flat")
    target = _moved(block, dx=-0.25, dz=-0.07, grasp="pinch")
    return [*_reach_grasp("block", right=block, right_grasp="pinch", left=tray),
            HandPhase("lift", 0.8, right=_moved(block, dy=0.15, grasp="pinch")),
            HandPhase("carry", 1.2, right=_moved(target, dy=0.15)),
            HandPhase("place", 0.8, right=target),
            *_release_return(HandPose(tray.pos, tray.rot, "relaxed"), target)]


def _screw_lid() -> list[HandPhase]:
    jar = _left(_side((0.06, 0.95, -0.44)))
    lid = HandPose((0.02, 1.10, -0.45), (40, -20, 0), "open")
    turned = _moved(lid, rot=(-40, -20, 0), grasp="claw")
    return [*_reach_grasp("jar", right=lid, right_grasp="claw", left=jar, left_grasp="power"),
            HandPhase("screw_turn", 0.8, right=turned),
            HandPhase("regrip", 0.6, right=_moved(lid, dy=0.01)),
            HandPhase("tighten", 0.8, right=turned),
            *_release_return(jar, turned)]


def _wipe_table() -> list[HandPhase]:
    cloth = HandPose((0.20, 0.90, -0.40), (0, 0, 0), "open")
    support = HandPose((-0.30, 0.88, -0.35), (10, 0, 0), "flat")
    wipe = _moved(cloth, dy=-0.01, grasp="claw")
    return [*_reach_grasp("cloth", right=cloth, right_grasp="claw", left=support),
            HandPhase("wipe_out", 0.9, right=_moved(wipe, dx=-0.25, dz=-0.05)),
            HandPhase("wipe_back", 0.9, right=_moved(wipe, dx=0.05)),
            HandPhase("wipe_far", 0.9, right=_moved(wipe, dx=-0.15, dz=-0.22)),
            HandPhase("wipe_near", 0.9, right=_moved(wipe, dx=-0.05, dz=0.05)),
            *_release_return(None, _moved(wipe, dx=-0.05, dz=0.05))]


# ---------------------------------------------------------------------------------------
# Body activities
# ---------------------------------------------------------------------------------------

BODY_REST = {"r_shoulder_abd": 8.0, "l_shoulder_abd": 8.0, "r_elbow": 10.0, "l_elbow": 10.0}


def _both(name: str, value: float) -> dict[str, float]:
    """The same angle on both sides, e.g. ``_both("knee", 90)``."""
    return {f"r_{name}": value, f"l_{name}": value}


def _squat() -> list[BodyPhase]:
    down = {**_both("hip_flex", 95), **_both("knee", 125), "torso_pitch": 35,
            "head_pitch": -20}
    return [BodyPhase("arms_forward", 0.8, {**_both("shoulder_flex", 90), **_both("elbow", 0)}),
            BodyPhase("descend", 1.2, down),
            BodyPhase("hold_bottom", 0.6, {**_both("hip_flex", 100), **_both("knee", 130)}),
            BodyPhase("ascend", 1.2, {**_both("hip_flex", 0), **_both("knee", 0),
                                      "torso_pitch": 0, "head_pitch": 0}),
            BodyPhase("arms_down", 0.8, {**_both("shoulder_flex", 0), **_both("elbow", 10)})]


def _jumping_jack() -> list[BodyPhase]:
    return [BodyPhase("crouch", 0.4, {**_both("knee", 25), **_both("hip_flex", 12)}),
            BodyPhase("jump_out", 0.4, {"lift": 0.12, **_both("knee", 5), **_both("hip_flex", 0),
                                        **_both("shoulder_abd", 90), **_both("hip_abd", 10)}),
            BodyPhase("land_wide", 0.4, {"lift": 0.0, **_both("shoulder_abd", 165),
                                         **_both("hip_abd", 18), **_both("knee", 20),
                                         **_both("hip_flex", 10)}),
            BodyPhase("jump_in", 0.4, {"lift": 0.12, **_both("shoulder_abd", 90),
                                       **_both("hip_abd", 8), **_both("knee", 5),
                                       **_both("hip_flex", 0)}),
            BodyPhase("land_closed", 0.4, {"lift": 0.0, **_both("shoulder_abd", 8),
                                           **_both("hip_abd", 0), **_both("knee", 20),
                                           **_both("hip_flex", 10)}),
            BodyPhase("stand", 0.5, {**_both("knee", 0), **_both("hip_flex", 0)})]


def _lunge() -> list[BodyPhase]:
    hands_on_hips = {**_both("shoulder_abd", 35), **_both("elbow", 100)}
    split = {"r_hip_flex": 25, "l_hip_flex": -25, "r_knee": 0, "l_knee": 0, "torso_pitch": 0}
    return [BodyPhase("step_forward", 1.0, {**split, **hands_on_hips}),
            BodyPhase("lower", 1.0, {"r_hip_flex": 75, "r_knee": 90, "l_hip_flex": -10,
                                     "l_knee": 70, "torso_pitch": 5}),
            BodyPhase("rise", 1.0, split),
            BodyPhase("step_back", 1.0, {"r_hip_flex": 0, "l_hip_flex": 0, **BODY_REST})]


def _arm_raise() -> list[BodyPhase]:
    return [BodyPhase("raise_front", 1.0, {**_both("shoulder_flex", 170), **_both("elbow", 0)}),
            BodyPhase("lower_front", 1.0, {**_both("shoulder_flex", 0), **_both("elbow", 10)}),
            BodyPhase("raise_side", 1.0, {**_both("shoulder_abd", 90), **_both("elbow", 0)}),
            BodyPhase("lower_side", 1.0, {**BODY_REST})]


def _spec(name: str, group: str, phases: list) -> ActivitySpec:
    return ActivitySpec(name, group, tuple(phases))


ACTIVITIES: dict[str, ActivitySpec] = {
    s.name: s for s in (
        _spec("pour_milk", "hands", _pour_milk()),
        _spec("open_bottle", "hands", _open_bottle()),
        _spec("stir_cup", "hands", _stir_cup()),
        _spec("pick_and_place", "hands", _pick_and_place()),
        _spec("screw_lid", "hands", _screw_lid()),
        _spec("wipe_table", "hands", _wipe_table()),
        _spec("squat", "body", _squat()),
        _spec("jumping_jack", "body", _jumping_jack()),
        _spec("lunge", "body", _lunge()),
        _spec("arm_raise", "body", _arm_raise()),
    )
}
HAND_ACTIVITIES = tuple(n for n, s in ACTIVITIES.items() if s.group == "hands")
BODY_ACTIVITIES = tuple(n for n, s in ACTIVITIES.items() if s.group == "body")
GROUPS = {"hands": HAND_ACTIVITIES, "body": BODY_ACTIVITIES}


def resolve(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Activity names from a selection that may use group names; None = all activities.

    Order follows :data:`ACTIVITIES`, duplicates are dropped, and an unknown name raises
    ``ValueError`` listing the valid ones.
    """
    if not names:
        return list(ACTIVITIES)
    chosen: set[str] = set()
    for n in names:
        if n in GROUPS:
            chosen.update(GROUPS[n])
        elif n in ACTIVITIES:
            chosen.add(n)
        else:
            raise ValueError(f"activity: expected one of {', '.join(ACTIVITIES)} or a group "
                             f"({', '.join(GROUPS)}), found {n!r}")
    return [n for n in ACTIVITIES if n in chosen]


__all__ = ["ACTIVITIES", "BODY_ACTIVITIES", "GROUPS", "HAND_ACTIVITIES", "ActivitySpec",
           "BodyPhase", "HandPhase", "resolve"]

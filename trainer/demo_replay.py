"""How a reference's demo is replayed for its phase decoder (``trainer.phase_decoder``):
as other people would perform it. One demo is all the supervision a reference has; each
training step replays it with a scripted deviation (``scripted_edit``: a skipped,
repeated or restarted phase), timed phase by phase as people perform (``retime_demo``),
with another subject's bone lengths (``vary_bones``), or with other finger postures at the
phase keys (``vary_fingers``). Every transform keeps the labels
exact: each output frame is labelled with the phase of the demo frame it comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from masa_rt.augment import axis_angle
from masa_rt.skeleton import topological_order
from masa_rt.synth.generate import minimum_jerk
from masa_rt.synth.hand import FLEX_PER_CURL

__all__ = ["EDITS", "RetimeConfig", "retime_demo", "scripted_edit", "vary_bones",
           "vary_fingers"]


@dataclass
class RetimeConfig:
    """How a demo is replayed in time for the decoder (``DecoderConfig.retime``): as people
    perform it, each phase at its own speed, and some phases paused partway with the hand
    easing into and out of the stop. The ranges are the synthetic subjects'
    (``masa_rt.synth.generate.Variation``: speed, pause_prob, pause_seconds at 30 fps)."""

    speed: tuple[float, float] = (0.5, 2.0)     # per phase, log-uniform
    pause_prob: float = 0.15                    # per phase
    pause_frames: tuple[int, int] = (9, 45)     # how long a pause holds
    pause_at: tuple[float, float] = (0.2, 0.8)  # where in its phase (share of its frames)

    def __post_init__(self) -> None:
        if not 0 < self.speed[0] <= self.speed[1]:
            raise ValueError(f"RetimeConfig.speed: expected 0 < lo <= hi, found {self.speed}")
        if not 0.0 <= self.pause_prob <= 1.0:
            raise ValueError(f"RetimeConfig.pause_prob: expected 0 .. 1, found "
                             f"{self.pause_prob}")
        if not 1 <= self.pause_frames[0] <= self.pause_frames[1]:
            raise ValueError(f"RetimeConfig.pause_frames: expected 1 <= lo <= hi, found "
                             f"{self.pause_frames}")
        if not 0.0 < self.pause_at[0] <= self.pause_at[1] < 1.0:
            raise ValueError(f"RetimeConfig.pause_at: expected 0 < lo <= hi < 1, found "
                             f"{self.pause_at}")


EDITS = ("skip", "repeat", "restart")


def _runs(phases: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame range of each run of one label, in order (in a demo played in
    order: one run per phase)."""
    cuts = np.flatnonzero(np.diff(phases)) + 1
    bounds = [0, *cuts.tolist(), len(phases)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _from_pose(joints: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``joints`` (n, J, C), one phase's motion, re-based to begin at pose ``start``: the
    offset fades out linearly, so the phase still ends at its own key pose (how the
    generator plays a phase that starts from another key pose)."""
    fade = np.linspace(1.0, 0.0, len(joints), dtype=np.float32)[:, None, None]
    return joints + fade * (start - joints[0])


def scripted_edit(joints: np.ndarray, phases: np.ndarray, kind: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A labelled demo played with one scripted deviation, its labels following each frame
    (as ``synth.generate.Perturbation``; the phase is drawn from ``rng``):

    - ``skip``: an inner phase ``p`` never happens; ``p + 1`` starts from the end of
      ``p - 1``;
    - ``repeat``: after ``p``, ``p + 1`` is started (40 %), undone back to the start of
      ``p`` by reverse playback, and ``p`` is done again;
    - ``restart``: after phases ``0 .. r - 1``, phase 0 is played again from where the user
      is, then the whole demo.

    Demos with fewer than three phases (four for ``skip``) come back unchanged.
    """
    runs = _runs(phases)
    k = len(runs)
    if k < 3 or (kind == "skip" and k < 4):
        return joints, phases
    idx = np.arange(len(phases))
    if kind == "skip":
        p = int(rng.integers(1, k - 2))
        (s0, _), (s1, e1) = runs[p], runs[p + 1]
        moved = _from_pose(joints[s1:e1], joints[s0])
        parts = [joints[:s0], moved, joints[e1:]]
        labels = [phases[:s0], phases[s1:e1], phases[e1:]]
    elif kind == "repeat":
        p = int(rng.integers(0, k - 1))
        (s0, e0), (s1, e1) = runs[p], runs[p + 1]
        into = idx[s1:s1 + max(1, int(0.4 * (e1 - s1)))]
        back = np.concatenate([into[::-1], idx[s0:e0][::-1]])
        order = np.concatenate([idx[:e0], into, back, idx[s0:]])
        return joints[order], phases[order]
    elif kind == "restart":
        r = int(rng.integers(1, k - 1))
        (s0, e0), (sr, _) = runs[0], runs[r]
        parts = [joints[:sr], _from_pose(joints[s0:e0], joints[sr]), joints[e0:]]
        labels = [phases[:sr], phases[s0:e0], phases[e0:]]
    else:
        raise ValueError(f"scripted_edit: kind expected one of {', '.join(EDITS)}, "
                         f"found {kind!r}")
    return np.concatenate(parts), np.concatenate(labels)


def retime_demo(joints: np.ndarray, phases: np.ndarray, rng: np.random.Generator,
                cfg: RetimeConfig) -> tuple[np.ndarray, np.ndarray]:
    """A labelled demo replayed phase by phase as a person might perform it: each phase at
    a speed drawn from ``cfg.speed`` (frames interpolated, not repeated), and with
    probability ``cfg.pause_prob`` a pause partway through it, the two partial moves each
    eased (minimum-jerk) into and out of the stop. Every output frame is labelled with
    the phase of the demo frame it starts from, so the labels stay exact."""
    lo, hi = np.log(cfg.speed[0]), np.log(cfg.speed[1])
    positions = []
    for start, end in _runs(phases):
        length = end - start
        n = max(1, int(round(length / np.exp(rng.uniform(lo, hi)))))
        if n >= 4 and rng.random() < cfg.pause_prob:
            u = rng.uniform(*cfg.pause_at)
            hold = int(rng.integers(cfg.pause_frames[0], cfg.pause_frames[1] + 1))
            n1 = max(1, int(round(n * u)))
            n2 = max(1, n - n1)
            frac = np.concatenate([u * minimum_jerk(np.arange(n1) / n1), np.full(hold, u),
                                   u + (1 - u) * minimum_jerk(np.arange(n2) / n2)])
        else:
            frac = np.arange(n) / n
        positions.append(start + length * frac)
    pos = np.concatenate(positions)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, len(joints) - 1)
    w = (pos - i0).astype(np.float32)[:, None, None]
    return (1 - w) * joints[i0] + w * joints[i1], phases[i0]


def vary_bones(joints: np.ndarray, parents: Sequence[int], rng: np.random.Generator,
               jitter: float) -> np.ndarray:
    """``joints`` (T, J, C) with every bone ``parent -> j`` scaled by one factor drawn in
    ``1 +- jitter`` for the whole replay; each joint moves with its parent, so the pose
    (every bone's direction) is kept. Roots (parent -1) stay where they are."""
    factor = 1.0 + rng.uniform(-jitter, jitter, len(parents)).astype(np.float32)
    out = joints.copy()
    for j in topological_order(parents):  # out[p] is final before j (a declared layout's
        p = parents[j]                       # parents may come after their children)
        if p >= 0:
            out[:, j] = out[:, p] + factor[j] * (joints[:, j] - joints[:, p])
    return out


# h2o_hands (masa_rt.skeleton): 21 joints per hand, left first; in each, the wrist, then
# thumb, index, middle, ring, pinky with four joints from the base to the tip.
FINGER_LAYOUT = "h2o_hands"
_HAND_JOINTS, _WRIST, _INDEX1, _MIDDLE1, _PINKY1 = 21, 0, 5, 9, 17


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.arccos(np.clip(np.sum(_unit(a) * _unit(b), axis=-1), -1.0, 1.0))


def _flexion_axis(hand: np.ndarray, left: bool) -> np.ndarray:
    """(T, 3): the axis the fingers of one hand (T, 21, 3) flex about, from its palm:
    distal x palmar, so a positive turn bends a finger towards the palm. The palm's
    radial x distal is palmar for a right hand; a left hand is its mirror image."""
    distal = hand[:, _MIDDLE1] - hand[:, _WRIST]
    radial = hand[:, _INDEX1] - hand[:, _PINKY1]
    palmar = np.cross(radial, distal) * (-1.0 if left else 1.0)
    return _unit(np.cross(distal, palmar))


def _bend_axis(seg: np.ndarray, palm_axis: np.ndarray) -> np.ndarray:
    """(T, 3): the axis one finger (segments (T, 3, 3)) bends about: the normal of the
    plane its bones lie in, oriented to bend it further; where it is nearly straight
    (that plane undefined) the palm's flexion axis, blended in over the first 10 degrees
    of bend. The thumb, which bends towards the palm across it, needs its own plane."""
    normal = np.cross(seg[:, 0], seg[:, 1]) + np.cross(seg[:, 1], seg[:, 2])
    size = np.linalg.norm(normal, axis=-1, keepdims=True)
    bend = _angle(seg[:, 0], seg[:, 1]) + _angle(seg[:, 1], seg[:, 2])
    w = np.clip(bend / np.radians(10.0), 0.0, 1.0)[:, None]
    own = normal / np.maximum(size, 1e-12)
    return _unit(w * own + (1 - w) * palm_axis)


def _curl(seg: np.ndarray, f: int) -> np.ndarray:
    """(...,) a finger's curl estimated from its segments (..., 3, 3): its two distal
    joints' bend over theirs at a full curl (angles between its own bones, whatever the
    palm's frame or the finger's splay)."""
    bend = _angle(seg[..., 0, :], seg[..., 1, :]) + _angle(seg[..., 1, :], seg[..., 2, :])
    return bend / FLEX_PER_CURL[f, 1:].sum()


def flex_fingers(joints: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``h2o_hands`` joints (T, 42, C) with every finger's curl changed by ``offsets``
    (T, 2, 5) (hand, finger; units of a full curl, as ``masa_rt.synth.hand``): each
    joint of a finger bends by the offset times its flexion at a full curl
    (``FLEX_PER_CURL``), in the plane it bends in, keeping every bone's length; the
    result is kept within a curl of 0 .. 1 (a finger cannot bend backwards). Wrists and
    finger bases stay where they are."""
    out = joints.astype(np.float32, copy=True)
    for h in range(2):
        base = h * _HAND_JOINTS
        hand = joints[:, base:base + _HAND_JOINTS].astype(np.float64)
        palm_axis = _flexion_axis(hand, left=h == 0)
        for f in range(5):
            chain = 1 + 4 * f + np.arange(4)
            seg = hand[:, chain[1:]] - hand[:, chain[:-1]]               # (T, 3, 3)
            curl = _curl(seg, f)
            delta = np.clip(curl + offsets[:, h, f], 0.0, 1.0) - curl    # (T,)
            turn = np.cumsum(delta[:, None] * FLEX_PER_CURL[f], axis=1)  # (T, 3)
            R = axis_angle(_bend_axis(seg, palm_axis)[:, None, :] * turn[..., None])
            moved = hand[:, chain[:1]] + np.cumsum(np.einsum("tnij,tnj->tni", R, seg), axis=1)
            out[:, base + chain[1:]] = moved
    return out


def _same_posture(seg: np.ndarray, tol_rad: float) -> np.ndarray:
    """(K, K) whether two keys' finger segments (K, 3, 3) bend alike, joint by joint."""
    bends = np.stack([_angle(seg[:, 0], seg[:, 1]), _angle(seg[:, 1], seg[:, 2])], axis=1)
    return np.all(np.abs(bends[:, None] - bends[None]) <= tol_rad, axis=-1)


def vary_fingers(joints: np.ndarray, phases: np.ndarray, rng: np.random.Generator,
                 jitter: float, tol_deg: float = 1.0) -> np.ndarray:
    """A labelled ``h2o_hands`` demo (T, 42, C) played in phase order, as a subject who
    grips a little differently: each finger's curl at each phase key (the first frame of
    each phase, and the last frame) offset by ``N(0, jitter)`` (units of a full curl; the
    synthetic subjects' key jitter is 0.05, ``synth.generate.KEY_JITTER``), the offset
    eased from key to key (minimum jerk), as the generator moves between its jittered
    keys. A finger that has the same posture at two keys (within ``tol_deg`` at each
    joint) gets the same offset at both, so a finger that holds still stays still."""
    runs = _runs(phases)
    starts = np.array([s for s, _ in runs] + [len(phases) - 1])
    run_of = np.repeat(np.arange(len(runs)), [e - s for s, e in runs])
    lengths = np.array([e - s for s, e in runs], dtype=np.float64)
    lengths[-1] = max(lengths[-1] - 1, 1)  # the last run ends on the last key itself
    ease = minimum_jerk((np.arange(len(phases)) - starts[run_of]) / lengths[run_of])
    offsets = np.empty((len(phases), 2, 5))
    for h in range(2):
        for f in range(5):
            chain = h * _HAND_JOINTS + 1 + 4 * f + np.arange(4)
            seg = joints[starts][:, chain[1:]] - joints[starts][:, chain[:-1]]
            same = _same_posture(seg.astype(np.float64), np.radians(tol_deg))
            first = np.argmax(same, axis=1)  # each key takes the first alike key's draw
            key_off = rng.normal(0.0, jitter, len(starts))[first]
            offsets[:, h, f] = key_off[run_of] + (key_off[run_of + 1] - key_off[run_of]) * ease
    return flex_fingers(joints, offsets)

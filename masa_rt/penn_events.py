"""Rule-based key-event phase labels for Penn Action, read from the body's own motion.

Penn Action ships no per-frame phase labels. For actions whose phases are *defined* by a
movement of the body (the hips go down and up in a squat; the wrists go up, down and up
again in a golf swing) a rule can read the phase boundaries from the 2D keypoints
themselves. Each rule:

1. builds one scalar signal per frame from the keypoints (a height in torso lengths, the
   sine of the torso's elevation, ...), NaN where a joint it needs is invisible;
2. refuses the video when that signal is missing too often or over too long a gap,
   otherwise fills the gaps linearly and smooths with a gaussian (sigma 1.5 frames);
3. finds extrema with ``scipy.signal.find_peaks`` whose prominence is a fixed fraction of
   the body (torso lengths, or degrees for angles), so annotator jitter never makes a
   phase;
4. turns the extrema into a phase id for every frame, or refuses with a reason.

A wrong label is worse than a missing one: every doubt is an :class:`Undecided` with a
reason from :data:`REASONS` and a one-line detail. Each action also has a *second*,
independent signal (a joint angle or another joint's distance) whose key events
:func:`second_agreement` compares with the rule's.

Keypoints are ``(T, 13, 2)`` pixels, x right, y down, NaN = invisible, Penn joint order.
``docs/penn_events.md`` gives every rule in words, its thresholds and what it does on the
real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

__all__ = [
    "ACTIONS",
    "REASONS",
    "RULES",
    "Labels",
    "Undecided",
    "agreement",
    "format_table",
    "label_video",
    "outcome",
    "phase_names",
    "second_agreement",
    "second_events",
    "summarise",
]

(HEAD, L_SH, R_SH, L_EL, R_EL, L_WR, R_WR,
 L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANK, R_ANK) = range(13)
SHOULDERS, ELBOWS, WRISTS = (L_SH, R_SH), (L_EL, R_EL), (L_WR, R_WR)
HIPS, KNEES, ANKLES = (L_HIP, R_HIP), (L_KNEE, R_KNEE), (L_ANK, R_ANK)

MIN_FRAMES = 20      # 0.67 s at 30 fps: shorter clips hold no whole movement
MAX_MISSING = 0.25   # share of frames a signal may be invisible and still be trusted
MAX_GAP = 10         # frames (1/3 s): a longer gap can hide a whole turn of the movement
MIN_SCALE_FRAMES = 0.3  # share of frames that must show the torso to measure the body
SIGMA = 1.5          # gaussian smoothing, frames: removes annotator jitter, keeps 1/3 s turns
MAX_HOLD = 12        # frames (0.4 s) a key extremum may stay flat; longer = no single moment
HOLD_BAND = 0.25     # "flat" = within this share of the prominence of the extremum
CYCLE_TOL = 8        # frames: two signals' repetition events agree within 0.27 s
SWING_TOL = 4        # frames: swing events are fast (a downswing lasts ~0.3 s)

REASONS = ("too short", "joints missing", "no body scale", "motion too small",
           "no clear extremum", "incomplete swing", "several swings")


@dataclass(frozen=True)
class Labels:
    """A labelled video: ``phases`` int32 ``(T,)``; ``events`` the frames where a phase
    starts; ``keys`` the rule's key events (compared with the second signal); ``signal``
    the smoothed signal the rule read (for pictures)."""

    phases: np.ndarray
    phase_names: tuple[str, ...]
    events: np.ndarray
    keys: np.ndarray
    signal: np.ndarray


@dataclass(frozen=True)
class Undecided:
    """The rule refuses this video; ``reason`` is one of :data:`REASONS`."""

    reason: str
    detail: str


class _Refuse(Exception):
    """Raised deep inside a rule; :func:`label_video` turns it into an ``Undecided``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------
# Geometry on (T, 13, 2) keypoints; NaN propagates, never warns
# ---------------------------------------------------------------------------------------

def _mean(joints: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    """Per-frame mean of the visible joints among ``idx``, ``(T, 2)``; NaN if none is."""
    pts = joints[:, list(idx)]
    seen = np.isfinite(pts).all(-1)
    total = np.where(seen[..., None], pts, 0.0).sum(1)
    count = seen.sum(1)[:, None]
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _torso(joints: np.ndarray) -> np.ndarray:
    """Per-frame shoulder-midpoint to hip-midpoint length in pixels, ``(T,)``."""
    return np.linalg.norm(_mean(joints, SHOULDERS) - _mean(joints, HIPS), axis=-1)


def _scale(joints: np.ndarray) -> float:
    """The body's size: median torso length over the frames that show it (it hardly
    changes within a clip, so a minority of frames is enough)."""
    torso = _torso(joints)
    seen = np.isfinite(torso)
    if seen.mean() < MIN_SCALE_FRAMES or np.median(torso[seen]) < 5:
        raise _Refuse("no body scale", f"torso visible in {seen.mean():.0%} of frames")
    return float(np.median(torso[seen]))


def _angle(joints: np.ndarray, a: tuple[int, int], b: tuple[int, int],
           c: tuple[int, int]) -> np.ndarray:
    """Angle at joint b (degrees) between b->a and b->c, averaged over the sides seen."""
    per_side = []
    for side in (0, 1):
        u = joints[:, a[side]] - joints[:, b[side]]
        v = joints[:, c[side]] - joints[:, b[side]]
        cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
        per_side.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    both = np.stack(per_side, 1)
    seen = np.isfinite(both)
    return np.where(seen.any(1), np.where(seen, both, 0).sum(1) / np.maximum(seen.sum(1), 1),
                    np.nan)


def _height(joints: np.ndarray, top: tuple[int, ...], base: tuple[int, ...]) -> np.ndarray:
    """How far the ``top`` joints are above the ``base`` joints, in pixels (y points down)."""
    return _mean(joints, base)[:, 1] - _mean(joints, top)[:, 1]


# ---------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signal:
    """A scalar per-frame signal, its key extremum ("max"/"min") and minimum prominence."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    key: str
    prominence: float


def _in_torsos(top: tuple[int, ...], base: tuple[int, ...]) -> Callable:
    """Height of ``top`` above ``base`` in torso lengths (a relative height cancels a
    panning camera; the torso makes the threshold independent of zoom)."""
    return lambda j: _height(j, top, base) / _scale(j)


def _torso_elevation(joints: np.ndarray) -> np.ndarray:
    """Sine of the torso's elevation: 0 lying flat, 1 upright (scale-free)."""
    return _height(joints, SHOULDERS, HIPS) / _torso(joints)


def _hip_height_standing(joints: np.ndarray) -> np.ndarray:
    """Hip height over the ankles as a share of the standing height (its 95th
    percentile): squat videos often hide the shoulders (a barbell, the camera's crop),
    so the legs measure the body instead of the torso."""
    h = _height(joints, HIPS, ANKLES)
    if np.isfinite(h).mean() < MIN_SCALE_FRAMES or np.nanpercentile(h, 95) < 5:
        raise _Refuse("no body scale", "hips over ankles seen in too few frames")
    return h / np.nanpercentile(h, 95)


def _ankle_spread(joints: np.ndarray) -> np.ndarray:
    return np.abs(joints[:, L_ANK, 0] - joints[:, R_ANK, 0]) / _scale(joints)


def _wrists_to_feet(joints: np.ndarray) -> np.ndarray:
    """Distance from the wrists to the ankles' midpoint in torso lengths."""
    d = np.linalg.norm(_mean(joints, WRISTS) - _mean(joints, ANKLES), axis=-1)
    return d / _scale(joints)


def _prepare(raw: np.ndarray, name: str) -> np.ndarray:
    """Refuse a signal missing too often or too long; else fill gaps and smooth."""
    seen = np.isfinite(raw)
    if 1 - seen.mean() > MAX_MISSING:
        raise _Refuse("joints missing", f"{name} invisible in {1 - seen.mean():.0%} of frames")
    gap = _longest_run(~seen)
    if gap > MAX_GAP:
        raise _Refuse("joints missing", f"{name} invisible for {gap} frames in a row")
    t = np.arange(len(raw))
    filled = np.interp(t, t[seen], raw[seen])
    return gaussian_filter1d(filled, SIGMA, mode="nearest")


def _longest_run(mask: np.ndarray) -> int:
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def _smoothed(signal: Signal, joints: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN joints -> NaN signal
        return _prepare(signal.fn(joints), signal.name)


def _key_peaks(s: np.ndarray, signal: Signal) -> np.ndarray:
    oriented = s if signal.key == "max" else -s
    return find_peaks(oriented, prominence=signal.prominence)[0]


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CycleRule:
    """A repetitive action: phase 0 moves toward the key extremum, phase 1 away from it.

    Boundaries are the alternating extrema of the signal (both kinds with the same
    prominence); frames before the first extremum belong to the phase that leads into
    it, frames after the last to the phase that leads out of it.
    """

    names: tuple[str, str]
    signal: Signal
    second: Signal

    def label(self, joints: np.ndarray) -> Labels:
        s = _smoothed(self.signal, joints)
        _check_range(s, self.signal)
        frames, kinds = _alternating_extrema(s, self.signal.prominence)
        key_kind = 1 if self.signal.key == "max" else -1
        keys = frames[kinds == key_kind]
        if len(keys) == 0:
            raise _Refuse("no clear extremum", f"no {self.signal.key} of {self.signal.name} "
                          f"with prominence {self.signal.prominence:g}")
        _check_holds(s, keys, self.signal)
        before = np.where(kinds == key_kind, 0, 1)  # phase of the frames leading into each
        nxt = np.searchsorted(frames, np.arange(len(s)), side="right")
        after_last = 1 - before[-1]
        phases = np.where(nxt < len(frames), before[np.minimum(nxt, len(frames) - 1)],
                          after_last)
        return Labels(phases.astype(np.int32), self.names, frames, keys, s)

    def second_keys(self, joints: np.ndarray) -> np.ndarray:
        return _key_peaks(_smoothed(self.second, joints), self.second)


def _check_range(s: np.ndarray, signal: Signal) -> None:
    span = np.percentile(s, 95) - np.percentile(s, 5)
    if span < signal.prominence:
        raise _Refuse("motion too small", f"{signal.name} spans {span:.2f} "
                      f"< {signal.prominence:g}")


def _check_holds(s: np.ndarray, keys: np.ndarray, signal: Signal) -> None:
    """Refuse a key extremum held flat (a pause at the bottom of a pushup, sitting up for
    a second): its boundary would be an arbitrary frame of the pause."""
    for k in keys:
        held = _longest_run_through(np.abs(s - s[k]) <= HOLD_BAND * signal.prominence, k)
        if held > MAX_HOLD:
            raise _Refuse("no clear extremum", f"{signal.name} held at its {signal.key} "
                          f"for {held} frames")


def _longest_run_through(mask: np.ndarray, at: int) -> int:
    """Length of the run of True in ``mask`` that contains index ``at``."""
    breaks = np.flatnonzero(~mask)
    start = breaks[breaks < at].max() + 1 if (breaks < at).any() else 0
    end = breaks[breaks > at].min() if (breaks > at).any() else len(mask)
    return int(end - start)


def _alternating_extrema(s: np.ndarray, prominence: float) -> tuple[np.ndarray, np.ndarray]:
    """Prominent maxima (+1) and minima (-1) in time order, forced to alternate: of two
    neighbours of one kind only the more extreme stays (find_peaks judges each kind
    alone, so a shoulder on a slope can pass as a second maximum)."""
    hi = find_peaks(s, prominence=prominence)[0]
    lo = find_peaks(-s, prominence=prominence)[0]
    order = sorted([(int(i), 1) for i in hi] + [(int(i), -1) for i in lo])
    kept: list[tuple[int, int]] = []
    for frame, kind in order:
        if kept and kept[-1][1] == kind:
            if kind * s[frame] > kind * s[kept[-1][0]]:
                kept[-1] = (frame, kind)
        else:
            kept.append((frame, kind))
    arr = np.array(kept, dtype=int).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


@dataclass(frozen=True)
class SwingRule:
    """One swing: wrists rise to a top, fall to a low point (impact / release), rise again.

    Phase 0 runs to the top, phase 1 from the top to the low point, phase 2 after it.
    """

    names: tuple[str, str, str]
    signal: Signal
    second: Signal  # distance wrists -> feet: far at the top, nearest at the low point

    def label(self, joints: np.ndarray) -> Labels:
        s = _smoothed(self.signal, joints)
        _check_range(s, self.signal)
        top, low = self._swing(s)
        phases = np.zeros(len(s), np.int32)
        phases[top:] = 1
        phases[low:] = 2
        events = np.array([top, low])
        return Labels(phases, self.names, events, events, s)

    def _swing(self, s: np.ndarray) -> tuple[int, int]:
        """The (top, low) pairs of all complete swings; exactly one must exist."""
        p = self.signal.prominence
        swings = set()
        for peak in find_peaks(s, prominence=p)[0]:
            low = peak + 1 + int(np.argmin(s[peak + 1:])) if peak + 1 < len(s) else peak
            top = int(np.argmax(s[:low])) if low > 0 else 0
            rise_in = s[top] - s[:top + 1].min()
            if s[top] - s[low] >= p and s[low:].max() - s[low] >= p and rise_in >= p:
                swings.add((top, int(low)))
        if not swings:
            raise _Refuse("incomplete swing", f"no rise >= {p:g}, fall to a low point and "
                          f"rise again in {self.signal.name}")
        if len(swings) > 1:
            raise _Refuse("several swings", f"{len(swings)} swings in {self.signal.name}")
        return swings.pop()

    def second_keys(self, joints: np.ndarray) -> np.ndarray:
        """Top = the first prominent maximum of the wrists' distance from the feet; low
        point = the nearest they come before the next such maximum (the finish)."""
        d = _smoothed(self.second, joints)
        far = find_peaks(d, prominence=self.signal.prominence)[0]
        if len(far) == 0:
            raise _Refuse("no clear extremum", f"no maximum of {self.second.name}")
        end = far[1] if len(far) > 1 else len(d)
        near = far[0] + int(np.argmin(d[far[0]:end]))
        return np.array([far[0], near])


_WRIST_OVER_SH = _in_torsos(WRISTS, SHOULDERS)
_SH_OVER_WR = _in_torsos(SHOULDERS, WRISTS)
_ELBOW = Signal("elbow angle", lambda j: _angle(j, SHOULDERS, ELBOWS, WRISTS), "min", 25.0)

RULES: dict[str, CycleRule | SwingRule] = {
    "squat": CycleRule(
        ("descend", "ascend"),
        Signal("hip height over ankles", _hip_height_standing, "min", 0.15),
        Signal("knee angle", lambda j: _angle(j, HIPS, KNEES, ANKLES), "min", 25.0)),
    "pushup": CycleRule(
        ("lower", "push_up"),
        Signal("shoulder height over wrists", _SH_OVER_WR, "min", 0.15), _ELBOW),
    "pullup": CycleRule(
        ("pull_up", "lower"),
        Signal("shoulder height over wrists", _SH_OVER_WR, "max", 0.3), _ELBOW),
    "bench_press": CycleRule(
        ("lower_bar", "press_up"),
        Signal("wrist height over hips", _in_torsos(WRISTS, HIPS), "min", 0.2), _ELBOW),
    "situp": CycleRule(
        ("curl_up", "lie_back"),
        Signal("torso elevation", _torso_elevation, "max", 0.3),
        Signal("hip angle", lambda j: _angle(j, SHOULDERS, HIPS, KNEES), "min", 25.0)),
    "jumping_jacks": CycleRule(
        ("raise_arms", "lower_arms"),
        Signal("wrist height over shoulders", _WRIST_OVER_SH, "max", 0.5),
        Signal("ankle spread", _ankle_spread, "max", 0.2)),
    "golf_swing": SwingRule(
        ("backswing", "downswing", "follow_through"),
        Signal("wrist height over hips", _in_torsos(WRISTS, HIPS), "max", 0.5),
        Signal("wrists to feet", _wrists_to_feet, "min", 0.0)),
}
ACTIONS = tuple(RULES)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def phase_names(action: str) -> tuple[str, ...]:
    """The fixed phase names of a labelled action; KeyError for the others."""
    return RULES[action].names


def label_video(action: str, joints: np.ndarray) -> Labels | Undecided:
    """Phase labels for every frame of one video of ``action``, or why the rule refuses."""
    joints = np.asarray(joints, dtype=np.float64)
    if len(joints) < MIN_FRAMES:
        return Undecided("too short", f"{len(joints)} frames < {MIN_FRAMES}")
    try:
        return RULES[action].label(joints)
    except _Refuse as r:
        return Undecided(r.reason, r.detail)


def second_events(action: str, joints: np.ndarray) -> np.ndarray | None:
    """Key events from the action's second, independent signal; None if it cannot tell."""
    try:
        return RULES[action].second_keys(np.asarray(joints, dtype=np.float64))
    except _Refuse:
        return None


def agreement(keys: np.ndarray, other: np.ndarray, tol: int) -> bool:
    """Same number of key events, each within ``tol`` frames of its partner."""
    keys, other = np.sort(keys), np.sort(other)
    return len(keys) == len(other) and bool(np.all(np.abs(keys - other) <= tol))


def second_agreement(action: str, joints: np.ndarray, labels: Labels) -> bool | None:
    """Whether the second signal confirms ``labels``' key events; None if it cannot tell."""
    other = second_events(action, joints)
    if other is None:
        return None
    tol = SWING_TOL if isinstance(RULES[action], SwingRule) else CYCLE_TOL
    return agreement(labels.keys, other, tol)


# ---------------------------------------------------------------------------------------
# Import summary (events.json and the CLI table)
# ---------------------------------------------------------------------------------------

def outcome(action: str, joints: np.ndarray) -> tuple[Labels | None, str, bool | None]:
    """``(labels or None, "labelled" or the refusal reason, second-signal agreement)``."""
    labels = label_video(action, joints)
    if isinstance(labels, Undecided):
        return None, labels.reason, None
    return labels, "labelled", second_agreement(action, joints, labels)


def summarise(records: list[dict]) -> dict:
    """Per-action counts from one record per video of a labelled action; a record is
    ``{"video", "action", "split", "outcome", "agree"}`` (outcome: "labelled" or a reason).
    """
    actions = {}
    for action in sorted({r["action"] for r in records}):
        mine = sorted((r for r in records if r["action"] == action), key=lambda r: r["video"])
        done = [r for r in mine if r["outcome"] == "labelled"]
        checked = [r for r in done if r["agree"] is not None]
        actions[action] = {
            "phase_names": list(phase_names(action)),
            "signal": RULES[action].signal.name,
            "videos": {s: sum(r["split"] == s for r in mine) for s in ("train", "val")},
            "labelled": {s: sum(r["split"] == s for r in done) for s in ("train", "val")},
            "undecided": {why: n for why in REASONS
                          if (n := sum(r["outcome"] == why for r in mine))},
            "second_signal": {"name": RULES[action].second.name, "checked": len(checked),
                              "agree": sum(bool(r["agree"]) for r in checked)},
            "labelled_ids": {s: [r["video"] for r in done if r["split"] == s]
                             for s in ("train", "val")},
        }
    return {"actions": actions}


def format_table(summary: dict) -> str:
    """The per-action counts as a small table, one line per action."""
    lines = [f"{'action':<15}{'train':>9}{'val':>9}{'agree':>9}  undecided"]
    for action, a in summary["actions"].items():
        lab, vid, sec = a["labelled"], a["videos"], a["second_signal"]
        why = ", ".join(f"{k} {n}" for k, n in a["undecided"].items()) or "-"
        lines.append(f"{action:<15}{lab['train']:>4}/{vid['train']:<4}{lab['val']:>4}/"
                     f"{vid['val']:<4}{sec['agree']:>4}/{sec['checked']:<4}  {why}")
    return "\n".join(lines)

"""Sequences with exact ground truth: timing, subjects, viewpoints, noise and perturbations.

A sequence is made in three steps, each a pure function of the activity spec and one
``np.random.Generator``:

1. **Timing.** The phases become *moves* (play phase ``p`` from progress ``tau0`` to
   ``tau1``), normally one forward move per phase; perturbations add rewinds, skips and
   restarts. Each move gets a duration from the phase's canonical duration and a random
   speed, and may be split by a pause. Sampling that timeline at ``fps`` gives, per frame,
   the phase, the key the motion started from and the progress ``tau`` -- so the phase
   label and the canonical time of every frame are known exactly, not estimated.
2. **Pose.** Pose parameters follow a minimum-jerk path between phase keys; forward
   kinematics (hands or body) turns them into joints.
3. **Observation.** Mirror (handedness), viewpoint, tremor, tracking noise and missing
   joints: what a headset or a pose estimator would report.
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from masa_rt.sequence import Manifest, Sequence, save_sequence, write_dataset_files
from masa_rt.skeleton import get_layout, mirror, normalise, rotate, rotation_about
from masa_rt.synth.activities import ACTIVITIES, GROUPS, HAND_ACTIVITIES, ActivitySpec, resolve
from masa_rt.synth.body import BodyShape, body_fk
from masa_rt.synth.hand import HandShape, two_hand_fk

FPS = 30.0
FEATURE_SEED = 20240531  # the feature projection is one fixed "camera", shared by all data
FEATURE_GAIN = 0.5       # keeps tanh mostly out of saturation for normalised poses
FEATURE_NOISE = 0.05
REWIND_SPEEDUP = 1.5     # people undo a movement faster than they make it

# Joint groups that trackers lose together: a hand, or a limb of a body.
DROPOUT_GROUPS = {
    "h2o_hands": (tuple(range(21)), tuple(range(21, 42))),
    "body25": ((3, 4), (6, 7), (10, 11, 22, 23, 24), (13, 14, 19, 20, 21)),
}
# Per-parameter scale of the per-sequence jitter of the phase targets.
_HAND_KEY_JITTER = np.array([0.01] * 3 + [4.0] * 3 + [0.05] * 6)
KEY_JITTER = {"hands": np.tile(_HAND_KEY_JITTER, 2), "body": np.array([0.0] + [4.0] * 15)}


def minimum_jerk(tau: np.ndarray) -> np.ndarray:
    """Flash & Hogan's minimum-jerk profile ``10t^3 - 15t^4 + 6t^5`` on [0, 1].

    Zero velocity and acceleration at both ends, so motions chained at phase keys join
    smoothly, as human reaching does.
    """
    t = np.clip(tau, 0.0, 1.0)
    return t**3 * (10 - 15 * t + 6 * t**2)


@dataclass(frozen=True)
class Perturbation:
    """A scripted deviation from the canonical order, for the streaming harness.

    At most one of ``repeat_phase``, ``skip_phase`` and ``restart_at_phase``; a pause may
    come with any of them. Ground truth stays exact:

    - ``pause_phase``: hold still for ``pause_seconds`` halfway through that phase
      (canonical time constant meanwhile).
    - ``repeat_phase = p``: after phase ``p``, start phase ``p + 1``, think better of it,
      undo back to the start of ``p`` (canonical time runs backwards, the phase id goes
      from ``p + 1`` back to ``p``) and do ``p`` again.
    - ``skip_phase = p``: phase ``p`` never happens; phase ``p + 1`` moves straight from
      the end of ``p - 1`` (canonical time jumps forward).
    - ``restart_at_phase = r``: after phases ``0 .. r - 1`` the user starts over at phase 0
      (moving from where they are) and then does the whole activity.
    """

    pause_phase: int | None = None
    pause_seconds: float = 1.0
    repeat_phase: int | None = None
    skip_phase: int | None = None
    restart_at_phase: int | None = None

    def check(self, num_phases: int) -> None:
        """Raise ``ValueError`` if this cannot apply to an activity of ``num_phases``."""
        structural = [n for n in ("repeat_phase", "skip_phase", "restart_at_phase")
                      if getattr(self, n) is not None]
        if len(structural) > 1:
            raise ValueError(f"perturbation: expected at most one of repeat/skip/restart, "
                             f"found {', '.join(structural)}")
        for name in ("pause_phase", "repeat_phase", "skip_phase", "restart_at_phase"):
            value = getattr(self, name)
            low = 1 if name == "restart_at_phase" else 0
            if value is not None and not low <= value < num_phases:
                raise ValueError(f"perturbation: {name}: expected a phase in "
                                 f"[{low}, {num_phases}), found {value}")
        if self.pause_seconds < 0:
            raise ValueError(f"perturbation: pause_seconds: expected >= 0, "
                             f"found {self.pause_seconds}")


@dataclass(frozen=True)
class Variation:
    """How much sequences vary; the defaults are the training data, :data:`CLEAN` none."""

    scale: tuple[float, float] = (0.85, 1.15)      # subject size
    bone_jitter: float = 0.08                      # per-bone length, relative
    key_jitter: float = 1.0                        # x KEY_JITTER on the phase targets
    mirror_prob: float = 0.5                       # left-handed subject
    speed: tuple[float, float] = (0.5, 2.0)        # per phase, log-uniform
    pause_prob: float = 0.15                       # per phase
    pause_seconds: tuple[float, float] = (0.3, 1.5)
    yaw_deg: float = 30.0                          # viewpoint about the vertical
    shift_m: float = 0.2                           # viewpoint translation (x, z; y half)
    tremor_m: float = 0.002                        # smooth noise, std
    noise_m: float = 0.003                         # white tracking noise, std
    drop_rate: float = 0.01                        # joints missing at random
    dropouts_per_10s: float = 1.0                  # whole hand / limb lost for a moment
    dropout_frames: tuple[int, int] = (3, 15)


CLEAN = Variation(scale=(1.0, 1.0), bone_jitter=0.0, key_jitter=0.0, mirror_prob=0.0,
                  speed=(1.0, 1.0), pause_prob=0.0, yaw_deg=0.0, shift_m=0.0, tremor_m=0.0,
                  noise_m=0.0, drop_rate=0.0, dropouts_per_10s=0.0)


# ---------------------------------------------------------------------------------------
# 1. Timing
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A stretch of the timeline: phase ``phase`` played from ``tau0`` to ``tau1``.

    The pose moves from key ``from_key`` (normally ``phase``: the end of the previous
    phase) to key ``phase + 1``; ``tau0 == tau1`` is a pause.
    """

    phase: int
    from_key: int
    tau0: float
    tau1: float
    seconds: float

    @property
    def eased(self) -> bool:
        """Partial moves stop or turn mid-phase, so their own progress is eased too."""
        return not {self.tau0, self.tau1} <= {0.0, 1.0}


def plan_moves(num_phases: int, perturb: Perturbation | None) -> list[Segment]:
    """The order of play as zero-length segments (durations are set by :func:`timeline`)."""
    p = perturb or Perturbation()
    order = [k for k in range(num_phases) if k != p.skip_phase]
    if p.restart_at_phase is not None:
        order = list(range(p.restart_at_phase)) + order
    moves: list[Segment] = []
    key = 0  # the pose the next move starts from: end of the last phase played
    for ph in order:
        moves.append(Segment(ph, key, 0.0, 1.0, 0.0))
        key = ph + 1
        if ph == p.repeat_phase:
            moves += _undo_and_redo(ph, num_phases)
    return moves


def _undo_and_redo(ph: int, num_phases: int) -> list[Segment]:
    """Start phase ``ph + 1`` (40 %), play it and ``ph`` backwards, then redo ``ph``.

    Undoing is reverse playback, so every frame's pose is still the canonical pose at its
    canonical time and the ground truth stays exact while it runs backwards.
    """
    out = []
    if ph + 1 < num_phases:
        nxt = ph + 1
        out += [Segment(nxt, nxt, 0.0, 0.4, 0.0), Segment(nxt, nxt, 0.4, 0.0, 0.0)]
    return out + [Segment(ph, ph, 1.0, 0.0, 0.0), Segment(ph, ph, 0.0, 1.0, 0.0)]


def timeline(spec: ActivitySpec, rng: np.random.Generator, var: Variation,
             perturb: Perturbation | None) -> list[Segment]:
    """Moves with durations from random per-phase speeds, split where a pause falls."""
    durations = spec.durations
    lo, hi = np.log(var.speed[0]), np.log(var.speed[1])
    speeds = np.exp(rng.uniform(lo, hi, size=len(durations)))
    pause_phase = None if perturb is None else perturb.pause_phase
    out: list[Segment] = []
    for m in plan_moves(len(durations), perturb):
        span = m.tau1 - m.tau0
        rate = speeds[m.phase] * (REWIND_SPEEDUP if span < 0 else 1.0)
        seconds = durations[m.phase] * abs(span) / rate
        pause, u = 0.0, 0.5
        if span == 1.0 and pause_phase == m.phase:
            pause, pause_phase = perturb.pause_seconds, None  # only its first forward play
        elif span == 1.0 and rng.random() < var.pause_prob:
            pause, u = rng.uniform(*var.pause_seconds), rng.uniform(0.2, 0.8)
        if pause > 0:
            out += [replace(m, tau1=u, seconds=seconds * u),
                    replace(m, tau0=u, tau1=u, seconds=pause),
                    replace(m, tau0=u, seconds=seconds * (1 - u))]
        else:
            out.append(replace(m, seconds=seconds))
    return out


@dataclass(frozen=True)
class Frames:
    """Per-frame samples of a timeline."""

    phase: np.ndarray     # (T,) int
    from_key: np.ndarray  # (T,) int
    tau: np.ndarray       # (T,) progress within the phase, [0, 1]


def sample(segments: list[Segment], fps: float) -> Frames:
    """Sample the timeline at ``t = i / fps`` for every frame that fits in it."""
    seconds = np.array([s.seconds for s in segments])
    ends = np.cumsum(seconds)
    t = np.arange(int(np.floor(ends[-1] * fps + 1e-9)) + 1) / fps
    idx = np.minimum(np.searchsorted(ends, t, side="right"), len(segments) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip((t - (ends[idx] - seconds[idx])) / seconds[idx], 0.0, 1.0)
    frac = np.nan_to_num(frac)
    eased = np.array([s.eased for s in segments])[idx]
    frac = np.where(eased, minimum_jerk(frac), frac)
    tau0 = np.array([s.tau0 for s in segments])[idx]
    tau1 = np.array([s.tau1 for s in segments])[idx]
    return Frames(np.array([s.phase for s in segments])[idx],
                  np.array([s.from_key for s in segments])[idx],
                  tau0 + (tau1 - tau0) * frac)


def canonical_time(spec: ActivitySpec, frames: Frames) -> np.ndarray:
    """(T,) position in the canonical (speed 1, no pause) activity, in [0, 1]."""
    d = spec.durations
    starts = np.concatenate([[0.0], np.cumsum(d)[:-1]])
    return np.clip((starts[frames.phase] + frames.tau * d[frames.phase]) / d.sum(), 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# 2. Pose
# ---------------------------------------------------------------------------------------

def jittered_keys(spec: ActivitySpec, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Phase keys with per-sequence offsets; equal targets keep equal offsets.

    Offsets are drawn per distinct value of each parameter, so a hand that holds still
    over several phases (same target) still holds still, and a return to an earlier
    target lands on the same spot.
    """
    keys = spec.keys()
    scale = KEY_JITTER[spec.group] * amount
    out = keys.copy()
    for j in range(keys.shape[1]):
        values, inverse = np.unique(keys[:, j], return_inverse=True)
        out[:, j] += rng.normal(0.0, 1.0, size=len(values))[inverse] * scale[j]
    return out


def pose_params(keys: np.ndarray, frames: Frames) -> np.ndarray:
    """(T, D): minimum-jerk interpolation from each frame's start key to its phase end."""
    start, end = keys[frames.from_key], keys[frames.phase + 1]
    return start + (end - start) * minimum_jerk(frames.tau)[:, None]


def forward_kinematics(spec: ActivitySpec, params: np.ndarray, rng: np.random.Generator,
                       var: Variation) -> np.ndarray:
    """(T, J, 3) joints of one random subject (size and bone lengths) for ``params``."""
    scale = rng.uniform(*var.scale)
    if spec.group == "hands":
        joints = two_hand_fk(params, HandShape.default().varied(rng, 1.0, var.bone_jitter))
    else:
        joints = body_fk(params, BodyShape.default().varied(rng, 1.0, var.bone_jitter))
    # Scaling about the origin (the floor below the user) keeps bodies on the floor.
    return joints * scale


def project_features(joints: np.ndarray, layout: str, dim: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(T, dim) float32 stand-in for RGB features: tanh of a fixed projection of the pose.

    The projection matrix depends only on :data:`FEATURE_SEED` and the layout's size, so
    every sequence, split and activity is seen by the same "camera".
    """
    x = normalise(joints, layout).reshape(len(joints), -1)
    W = np.random.default_rng(FEATURE_SEED).standard_normal((x.shape[1], dim))
    pre = FEATURE_GAIN * x @ W / np.sqrt(x.shape[1])
    pre += rng.normal(0.0, FEATURE_NOISE, size=pre.shape)
    return np.tanh(pre).astype(np.float32)


# ---------------------------------------------------------------------------------------
# 3. Observation
# ---------------------------------------------------------------------------------------

def observe(joints: np.ndarray, layout: str, rng: np.random.Generator,
            var: Variation) -> np.ndarray:
    """What a tracker reports: mirrored, seen from a viewpoint, noisy, with missing joints."""
    if rng.random() < var.mirror_prob:
        joints = mirror(joints, layout)  # swap hands / body sides and reflect x
    yaw = np.radians(rng.uniform(-var.yaw_deg, var.yaw_deg))
    shift = rng.uniform(-var.shift_m, var.shift_m, size=3) * np.array([1.0, 0.5, 1.0])
    joints = rotate(joints, rotation_about(get_layout(layout).up_axis, yaw)) + shift
    joints = joints + _tremor(joints.shape, rng, var.tremor_m)
    joints = joints + rng.normal(0.0, 1.0, size=joints.shape) * var.noise_m
    return _drop(joints, layout, rng, var)


def _tremor(shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Temporally smooth noise (a few frames of correlation) with standard deviation ``std``."""
    white = rng.normal(0.0, 1.0, size=shape)
    if std == 0 or shape[0] < 2:
        return white * std
    smooth = gaussian_filter1d(white, sigma=2.0, axis=0, mode="nearest")
    return smooth * (std / max(float(smooth.std()), 1e-12))


def _drop(joints: np.ndarray, layout: str, rng: np.random.Generator,
          var: Variation) -> np.ndarray:
    """NaN for joints lost at random, and for whole hands / limbs lost for a few frames."""
    out = joints.copy()
    out[rng.random(joints.shape[:2]) < var.drop_rate] = np.nan
    t = len(joints)
    groups = DROPOUT_GROUPS[layout]
    for _ in range(rng.poisson(var.dropouts_per_10s * t / FPS / 10.0)):
        length = int(rng.integers(var.dropout_frames[0], var.dropout_frames[1] + 1))
        start = int(rng.integers(0, max(t - length, 1)))
        out[start:start + length, list(groups[rng.integers(len(groups))])] = np.nan
    return out


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------

def get_spec(activity: str) -> ActivitySpec:
    """The spec of ``activity`` (``ValueError`` listing the known ones)."""
    try:
        return ACTIVITIES[activity]
    except KeyError:
        raise ValueError(f"activity: expected one of {', '.join(ACTIVITIES)}, "
                         f"found {activity!r}") from None


def generate(activity: str, rng: np.random.Generator, *, clean: bool = False,
             perturb: Perturbation | None = None, features: int = 0,
             variation: Variation | None = None, subject: str = "synthetic",
             fps: float = FPS) -> Sequence:
    """One synthetic sequence of ``activity`` with exact per-frame ground truth.

    ``clean=True`` (references, demos): canonical subject, speed 1, no pause, noise,
    missing joints, viewpoint change or mirror -- overriding ``variation``. ``perturb``
    scripts repeats, skips, restarts and pauses on top of the random variation.
    ``features > 0`` adds a (T, features) float32 stand-in for RGB features.
    """
    spec = get_spec(activity)
    var = CLEAN if clean else (variation or Variation())
    if perturb is not None:
        perturb.check(len(spec.phases))
    if features < 0:
        raise ValueError(f"features: expected >= 0, found {features}")
    keys = jittered_keys(spec, rng, var.key_jitter)
    frames = sample(timeline(spec, rng, var, perturb), fps)
    joints = forward_kinematics(spec, pose_params(keys, frames), rng, var)
    feats = project_features(joints, spec.layout, features, rng) if features else None
    observed = observe(joints, spec.layout, rng, var)
    return Sequence(
        joints=observed.astype(np.float32), layout=spec.layout, fps=float(fps),
        timestamps=np.arange(len(joints), dtype=np.float64) / fps, features=feats,
        phases=frames.phase.astype(np.int32), phase_names=spec.phase_names,
        canonical_time=canonical_time(spec, frames).astype(np.float32),
        activity=activity, subject=subject, source="synth",
    )


def sequence_rng(seed: int, activity: str, index: int) -> np.random.Generator:
    """The generator of sequence ``index`` of ``activity``: independent of every other one.

    crc32, not ``hash()``: Python salts string hashes per process.
    """
    return np.random.default_rng([int(seed) % 2**32, zlib.crc32(activity.encode()), index])


def _split_of(index: int, per_activity: int, val_fraction: float) -> str:
    """The last ``round(n * val_fraction)`` sequences of each activity are validation."""
    n_val = round(per_activity * val_fraction)
    if val_fraction > 0 and per_activity >= 2:
        n_val = min(max(n_val, 1), per_activity - 1)
    return "val" if index >= per_activity - n_val else "train"


def write_dataset(out: str | Path, seed: int, activities: Iterable[str] | None = None,
                  per_activity: int = 20, val_fraction: float = 0.25,
                  features: int = 0) -> Manifest:
    """Write ``OUT/<activity>_<idx:03d>.npz`` and ``OUT/manifest.json``; one layout only.

    ``activities`` may name activities and groups (``hands``, ``body``); ``None`` means
    the two-hand activities (the H2O stand-in). A selection spanning both layouts raises
    ``ValueError``: a dataset has one layout -- use :func:`write_datasets` for that.
    """
    names = resolve(list(activities) if activities is not None else list(HAND_ACTIVITIES))
    layouts = sorted({ACTIVITIES[n].layout for n in names})
    if len(layouts) > 1:
        raise ValueError(f"activities: expected one layout per dataset, found {layouts}; "
                         "select one group or use write_datasets (one folder per group)")
    # Named as the synth command's flags: the command checks them too, this guards the API.
    if per_activity < 1:
        raise ValueError(f"--per-activity (per_activity): expected >= 1, found {per_activity}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction (val_fraction): expected 0 <= F < 1, found "
                         f"{val_fraction}")

    def items() -> Iterator[tuple[str, Sequence, str]]:
        for name in names:
            for i in range(per_activity):
                seq = generate(name, sequence_rng(seed, name, i), features=features,
                               subject=f"synth{seed}_{i:03d}")
                yield f"{name}_{i:03d}.npz", seq, _split_of(i, per_activity, val_fraction)

    return write_dataset_files(out, items(), activities=names)


def plan_datasets(out: str | Path,
                  activities: Iterable[str] | None = None) -> list[tuple[Path, list[str]]]:
    """(folder, activity names) per dataset: one per group present (``None`` = all).

    A single group goes to ``OUT`` itself; several go to ``OUT/hands`` and ``OUT/body``,
    because a dataset has exactly one layout.
    """
    names = resolve(list(activities) if activities is not None else None)
    groups = [(g, [n for n in names if n in members]) for g, members in GROUPS.items()]
    groups = [(g, members) for g, members in groups if members]
    if len(groups) == 1:
        return [(Path(out), groups[0][1])]
    return [(Path(out) / g, members) for g, members in groups]


def write_datasets(out: str | Path, seed: int, activities: Iterable[str] | None = None,
                   **options) -> dict[Path, Manifest]:
    """Write every dataset of :func:`plan_datasets`; options as for :func:`write_dataset`."""
    return {folder: write_dataset(folder, seed, names, **options)
            for folder, names in plan_datasets(out, activities)}


def write_examples(folder: str | Path, activities: Iterable[str] | None = None) -> list[Path]:
    """Clean demonstrations (``<activity>.npz``, incl. ``pour_milk.npz``) for references."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in resolve(list(activities) if activities is not None else None):
        seq = generate(name, np.random.default_rng(0), clean=True, subject="canonical")
        paths.append(folder / f"{name}.npz")
        save_sequence(paths[-1], seq)
    return paths


def run_cli(args: argparse.Namespace) -> int:
    """``masa-rt synth``: write the dataset(s) and the examples, one summary line each."""
    for folder, names in plan_datasets(args.out, args.activities):
        start = time.perf_counter()
        m = write_dataset(folder, args.seed, names, per_activity=args.per_activity,
                          val_fraction=args.val_fraction, features=args.features)
        n_val = sum(e.split == "val" for e in m.files)
        print(f"synth: {folder}: {len(m.files)} sequences ({len(m.files) - n_val} train, "
              f"{n_val} val) of {len(m.activities)} activities, layout {m.layout}, "
              f"{m.fps:g} fps, in {time.perf_counter() - start:.1f} s")
    # Inside the output folder unless told: never into the current folder (a repository).
    examples = Path(args.out) / "canonical_demos" if args.examples is None else args.examples
    if examples:
        start = time.perf_counter()
        paths = write_examples(examples, args.activities)
        print(f"synth: {examples}: {len(paths)} clean examples "
              f"({', '.join(p.name for p in paths)}), in {time.perf_counter() - start:.1f} s")
    return 0

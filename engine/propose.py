"""Propose phase boundaries for unlabelled demos (``masa-rt reference propose``).

A user with a new task has recordings but no phase labels, and a reference needs them.
This module proposes where phases begin, for the user to accept, move or rename: the
phases CSV that ``masa-rt label DEMO --phases FILE`` reads (``masa_rt.labels``).

Method: change points of motion, in the learned embedding and in the keypoints.

1. **Embed** each demo with the model exactly as ``reference build`` does
   (``engine.reference.embed_demo``: resampled to the model's rate, causal encoder).
2. **Signal** per model frame (:func:`boundary_features`): the *velocity* (smoothed frame
   to frame change) of the unit learned embedding and of the normalised keypoints (gaps
   interpolated first, so a lost joint is no jump), each scaled to unit mean squared norm
   and put side by side, the learned half at weight 0.5 (``"both"``, the default; the
   weight was chosen on the train splits). A phase is a stretch where the body and its
   representation move one way; a boundary is where that direction turns.
   ``"learned"`` and ``"raw"`` use one half alone.
3. **Segment**: exact least-squares piecewise-constant segmentation (optimal
   partitioning, Jackson et al. 2005; the L2 cost of the ``ruptures`` library, computed
   here from cumulative sums in numpy). With ``phases=K`` the best K-segment split
   (dynamic programming); otherwise the split minimising cost + ``penalty`` per phase,
   in units of one frame's mean squared feature norm, so one penalty fits recordings of
   any length, speed or amplitude.
4. **Several demos**: each demo is segmented with the penalty alone, the phase count K is
   the median of their counts (the lower middle for an even number), and every demo is
   then split into exactly K phases, so all demos get the same names ``phase_1 ..
   phase_K`` and one reference can be built from them.

Measured on Penn Action key events and synthetic hand activities
(``benchmarks/propose_benchmark.py``, docs/results.md): the keypoint velocity alone (the
baseline) is a strong signal, far stronger than the learned one alone; the two together
equal it within the bootstrap interval at +-3 frames and edge ahead at wider tolerances.
Smoothing and penalty (:data:`SMOOTH`, :data:`PENALTY`) were chosen on the Penn Action
train split (real people), not on the synthetic generator.

Boundaries are reported on the demo's own frames (the capture frame nearest in time to the
model frame where the new phase starts) and times (its timestamps from the first, else
frame / fps).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d

from masa_rt.atomic import atomic_write
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.sequence import Sequence as PoseSequence

__all__ = ["FEATURES", "MIN_SEGMENT", "PENALTY", "SIGNALS", "SMOOTH", "Proposal",
           "ProposeError", "best_k_segments", "boundary_features", "change_points",
           "demo_frames", "penalised_segments", "phases_csv", "propose", "propose_files",
           "is_phases_csv", "output_paths", "run_cli", "scaled", "segment_costs",
           "unlabelled", "write_phases_csv"]

SIGNALS = ("both", "learned", "raw")  # the command's --signal: velocities
FEATURES = (*SIGNALS, "learned_position", "raw_position")  # + positions (benchmark)
LEARNED_WEIGHT = 0.5     # "both": the learned velocity's weight beside the keypoints'
MIN_SEGMENT = 5          # model frames (1/6 s at 30 Hz): shortest phase proposed
MAX_FRAMES = 1500        # longer recordings are average-pooled to this length first
# Gaussian smoothing (model frames) and penalty per phase (in one frame's mean squared
# feature norm) per signal: chosen on the Penn Action train split
# (benchmarks/propose_benchmark.py; docs/results.md).
SMOOTH = {"both": 5.0, "learned": 5.0, "raw": 5.0, "learned_position": 7.0,
          "raw_position": 1.5}
PENALTY = {"both": 12.0, "learned": 12.0, "raw": 12.0, "learned_position": 1.0,
           "raw_position": 1.0}


class ProposeError(ValueError):
    """A demo or option the proposer cannot work with (printed as one line)."""


# ----------------------------------------------------------------------------- features

def _fill_gaps(joints: np.ndarray) -> np.ndarray:
    """(T, J, C) joints with NaN stretches linearly interpolated over time per coordinate
    (held at the ends); a coordinate never seen stays NaN (the model input makes it 0)."""
    flat = joints.reshape(len(joints), -1).astype(np.float64)
    t = np.arange(len(flat))
    for c in range(flat.shape[1]):
        ok = np.isfinite(flat[:, c])
        if 0 < ok.sum() < len(flat):
            flat[:, c] = np.interp(t, t[ok], flat[ok, c])
    return flat.reshape(joints.shape)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _velocity(x: np.ndarray, sigma: float) -> np.ndarray:
    """(T, d) -> (T, d): smoothed central difference (the first and last frame one-sided)."""
    if len(x) < 2:
        return np.zeros_like(x)
    return np.gradient(gaussian_filter1d(x, sigma, axis=0, mode="nearest"), axis=0)


def boundary_features(demo: dict[str, Any], spec: InputSpec, kind: str = "both",
                      sigma: float | None = None) -> np.ndarray:
    """(T, d) per-model-frame features that :func:`change_points` segments, scaled.

    ``demo``: an ``embed_demo`` dict (``embeddings``, ``joints``). ``kind`` one of
    :data:`FEATURES`: ``"learned"`` / ``"raw"`` the velocity of the unit embedding / of
    the normalised keypoints, ``"both"`` the two side by side, ``*_position`` the rows
    themselves (segments = stretches of one pose or implicit cluster). ``sigma``: Gaussian
    smoothing in model frames (default :data:`SMOOTH`).
    """
    if kind not in FEATURES:
        raise ValueError(f"signal: expected one of {', '.join(FEATURES)}, found {kind!r}")
    sigma = SMOOTH[kind] if sigma is None else sigma
    if kind == "both":
        learned = boundary_features(demo, spec, "learned", sigma)
        return scaled(np.hstack([LEARNED_WEIGHT * learned,
                                 boundary_features(demo, spec, "raw", sigma)]))
    if kind.startswith("learned"):
        x = _unit(demo["embeddings"])
    else:
        x = np.nan_to_num(frame_features(_fill_gaps(demo["joints"]), spec).astype(np.float64))
    if not kind.endswith("position"):
        return scaled(_velocity(x, sigma))
    return scaled(gaussian_filter1d(x, sigma, axis=0, mode="nearest") if sigma > 0 else x)


def scaled(x: np.ndarray) -> np.ndarray:
    """Centre and scale to unit mean squared norm per frame (a still recording: zeros)."""
    x = x - x.mean(axis=0)
    power = float(np.mean(np.sum(x * x, axis=1)))
    return x / math.sqrt(power) if power > 1e-20 else np.zeros_like(x)


# ----------------------------------------------------------------------------- segmentation

def segment_costs(x: np.ndarray, min_size: int) -> np.ndarray:
    """(T+1, T+1) L2 cost of segment ``[a, b)`` (sum of squared deviations from its mean);
    +inf where ``b - a < min_size`` or ``b <= a``."""
    n = len(x)
    cs = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])   # (T+1, d)
    sq = np.concatenate([[0.0], np.cumsum(np.sum(x * x, axis=1))])      # (T+1,)
    gram = cs @ cs.T
    norms = np.diag(gram)
    length = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]      # b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (sq[None, :] - sq[:, None]) - (
            norms[None, :] + norms[:, None] - 2 * gram) / length
    cost[length < min_size] = np.inf
    return np.maximum(cost, 0.0)


def change_points(x: np.ndarray, *, n_segments: int | None = None,
                  penalty: float | None = None, min_size: int = MIN_SEGMENT) -> list[int]:
    """Start indices (ascending, excluding 0) of the segments of ``x`` (T, d).

    ``n_segments``: exactly that many segments, the split of least total L2 cost (dynamic
    programming). Otherwise ``penalty`` per segment (cost + penalty * segments minimal;
    optimal partitioning). Exact, O(T^2) memory: call it on at most a few thousand rows.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"change_points: expected (T, d) features, found shape {x.shape}")
    if (n_segments is None) == (penalty is None):
        raise ValueError("change_points: give exactly one of n_segments and penalty")
    min_size = max(1, min(min_size, len(x)))
    cost = segment_costs(x, min_size)
    if n_segments is not None:
        return best_k_segments(cost, n_segments, min_size)
    return penalised_segments(cost, penalty)


def best_k_segments(cost: np.ndarray, n_segments: int, min_size: int = 1) -> list[int]:
    """Starts of the ``n_segments``-segment split of least cost (``segment_costs``)."""
    n = len(cost) - 1
    if n_segments < 1:
        raise ProposeError(f"phases: expected >= 1, found {n_segments}")
    if n_segments * min_size > n:
        raise ProposeError(f"{n_segments} phases need at least {n_segments * min_size} "
                           f"frames (phases of >= {min_size}), the demo has {n}")
    best = cost[0].copy()                            # best[b]: one segment over [0, b)
    args = []
    for _ in range(n_segments - 1):
        total = best[:, None] + cost                 # (a, b): best up to a, then [a, b)
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n + 1)]
        args.append(arg)
    starts, b = [], n
    for arg in reversed(args):
        b = int(arg[b])
        starts.append(b)
    return sorted(starts)


def penalised_segments(cost: np.ndarray, penalty: float) -> list[int]:
    """Starts of the split minimising cost + ``penalty`` per segment (``segment_costs``)."""
    n = len(cost) - 1
    best = np.full(n + 1, np.inf)
    best[0] = -penalty
    arg = np.zeros(n + 1, dtype=np.int64)
    for b in range(1, n + 1):
        total = best[:b] + cost[:b, b]
        a = int(np.argmin(total))
        best[b], arg[b] = total[a] + penalty, a
    starts, b = [], n
    while b > 0:
        b = int(arg[b])
        if b > 0:
            starts.append(b)
    return sorted(starts)


def _pooled_change_points(x: np.ndarray, **kw: Any) -> list[int]:
    """:func:`change_points` on a recording average-pooled to at most MAX_FRAMES rows,
    indices mapped back to ``x``'s rows. A pooled row stands for ``step`` smooth frames,
    so its squared deviations are about 1/step of theirs: the penalty is divided by the
    step (and ``min_size`` too) to propose about what the full recording would."""
    step = max(1, math.ceil(len(x) / MAX_FRAMES))
    if step == 1:
        return change_points(x, **kw)
    m = len(x) // step * step
    pooled = x[:m].reshape(-1, step, x.shape[1]).mean(axis=1)
    kw = dict(kw, min_size=max(1, kw.get("min_size", MIN_SEGMENT) // step))
    if kw.get("penalty") is not None:
        kw["penalty"] = kw["penalty"] / step
    return [s * step for s in change_points(pooled, **kw)]


# ----------------------------------------------------------------------------- proposals

@dataclass(frozen=True)
class Proposal:
    """Proposed phases of one demo: each phase's first frame (of the demo's own frames,
    0 first) and its time in seconds."""

    name: str
    frames: tuple[int, ...]
    times: tuple[float, ...]
    num_frames: int

    @property
    def phase_names(self) -> tuple[str, ...]:
        return tuple(f"phase_{i + 1}" for i in range(len(self.frames)))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The frames where a new phase begins (all but the first phase's 0)."""
        return self.frames[1:]


def _demo_times(seq: PoseSequence) -> np.ndarray:
    return (np.asarray(seq.timestamps, dtype=np.float64) if seq.timestamps is not None
            else np.arange(seq.num_frames) / float(seq.fps))


def demo_frames(seq: PoseSequence, demo: dict[str, Any], starts: Sequence[int]) -> list[int]:
    """Model-frame segment starts -> the demo's own frames (nearest in time), with 0 first;
    two starts that land on one capture frame become one."""
    from engine.streams import nearest_index

    model_t = np.asarray(demo["times"])
    found = nearest_index(_demo_times(seq), model_t[np.asarray(starts, dtype=np.int64)])
    return sorted({0, *(int(i) for i in found)})


def _proposal(name: str, seq: PoseSequence, demo: dict[str, Any],
              starts: Sequence[int]) -> Proposal:
    t = _demo_times(seq)
    frames = demo_frames(seq, demo, starts)
    return Proposal(name=name, frames=tuple(frames),
                    times=tuple(float(t[f] - t[0]) for f in frames), num_frames=len(t))


def unlabelled(seq: PoseSequence) -> PoseSequence:
    """``seq`` with one placeholder phase, so ``embed_demo`` (which carries labels along)
    embeds a demo that has none; labels a demo has are ignored."""
    return replace(seq, phases=np.zeros(seq.num_frames, dtype=np.int32),
                   phase_names=("unlabelled",))


def propose(demos: Sequence[dict[str, Any]], seqs: Sequence[PoseSequence],
            names: Sequence[str], spec: InputSpec, *, phases: int | None = None,
            signal: str = "both", penalty: float | None = None,
            min_size: int = MIN_SEGMENT) -> tuple[list[Proposal], str]:
    """Proposals for embedded demos (``embed_demo`` dicts) and how the count was chosen."""
    pen = PENALTY[signal] if penalty is None else penalty
    feats = [boundary_features(d, spec, signal) for d in demos]
    for name, f in zip(names, feats, strict=True):
        if phases is not None and phases * min_size > len(f):
            raise ProposeError(f"{name}: --phases {phases} needs at least "
                               f"{phases * min_size} frames at {spec.fps:g} Hz (phases of "
                               f">= {min_size} frames), the demo has {len(f)}")
    if phases is not None:
        how = f"{phases} phases (--phases)"
        starts = [_pooled_change_points(f, n_segments=phases, min_size=min_size)
                  for f in feats]
    else:
        starts = [_pooled_change_points(f, penalty=pen, min_size=min_size) for f in feats]
        if len(feats) > 1:
            counts = [len(s) + 1 for s in starts]
            k = int(np.median(counts))  # an even count: the lower middle
            k = min(k, min(len(f) // min_size for f in feats))
            how = (f"{k} phases in each demo, the median of the counts each gets alone "
                   f"({', '.join(map(str, counts))}) with a penalty of {pen:g} per phase")
            starts = [_pooled_change_points(f, n_segments=k, min_size=min_size)
                      for f in feats]
        else:
            how = f"{len(starts[0]) + 1} phases, chosen by a penalty of {pen:g} per phase"
    out = [_proposal(n, s, d, st) for n, s, d, st in
           zip(names, seqs, demos, starts, strict=True)]
    return out, how


def propose_files(paths: Sequence[str | os.PathLike[str]],
                  checkpoint: str | os.PathLike[str] | None = None, *,
                  phases: int | None = None, signal: str = "both",
                  penalty: float | None = None) -> tuple[list[Proposal], str, dict[str, Any]]:
    """Load, embed and propose (the command's work). Returns the proposals, how the count
    was chosen, and the model's meta."""
    import torch  # noqa: F401  (the model needs it; the caller sets its threads)

    from engine.export import resolve_checkpoint
    from engine.reference import ReferenceBuildError, embed_demo
    from masa_rt.checkpoint import default_model_path, load_model
    from masa_rt.sequence import load_sequence

    if not paths:
        raise ProposeError("no demo given")
    if phases is not None and phases < 1:
        raise ProposeError(f"--phases: expected >= 1, found {phases}")
    seqs = [load_sequence(p) for p in paths]
    layouts = sorted({s.layout for s in seqs})
    if len(layouts) > 1:
        raise ProposeError(f"demos of several layouts ({', '.join(layouts)}); propose "
                           "phases for demos of one activity")
    ckpt = resolve_checkpoint(checkpoint) or default_model_path(seqs[0].layout)
    model, _cfg, spec, meta = load_model(ckpt)
    names = [str(p) for p in paths]
    try:
        demos = [embed_demo(model, spec, unlabelled(s), n)
                 for s, n in zip(seqs, names, strict=True)]
    except ReferenceBuildError as e:
        raise ProposeError(str(e)) from None
    props, how = propose(demos, seqs, names, spec, phases=phases, signal=signal,
                         penalty=penalty)
    return props, how, meta


# ----------------------------------------------------------------------------- CSV

def phases_csv(prop: Proposal, column: str = "frame") -> str:
    """The phases CSV ``masa-rt label DEMO --phases FILE`` reads: a header ``frame,phase``
    (or ``time,phase``), then one row per phase: where it begins, its name."""
    if column not in ("frame", "time"):
        raise ValueError(f"column: expected 'frame' or 'time', found {column!r}")
    rows = [f"{column},phase"]
    for f, t, name in zip(prop.frames, prop.times, prop.phase_names, strict=True):
        rows.append(f"{f if column == 'frame' else f'{t:.6f}'},{name}")
    return "\n".join(rows) + "\n"


def write_phases_csv(path: str | os.PathLike[str], prop: Proposal,
                     column: str = "frame") -> Path:
    """Write :func:`phases_csv` to ``path`` atomically (``masa_rt.atomic``)."""
    path = Path(path)
    if path.is_dir():
        raise ProposeError(f"--out {path} is a directory, not a file")
    if not path.parent.is_dir():
        raise ProposeError(f"--out {path}: folder {path.parent} does not exist (create it "
                           "first)")
    with atomic_write(path, "w") as f:
        f.write(phases_csv(prop, column))
    return path


def is_phases_csv(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a phases CSV (its header ``frame,phase`` or ``time,phase``): the
    only kind of existing file ``--out`` replaces."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().strip().replace(" ", "").lower()
    except (OSError, UnicodeDecodeError):
        return False
    return head in ("frame,phase", "time,phase")


# ----------------------------------------------------------------------------- command

DESCRIBE = {"both": "learned-embedding and keypoint velocity", "learned":
            "learned-embedding velocity", "raw": "keypoint velocity"}


def output_paths(out: str | os.PathLike[str] | None,
                 demos: Sequence[str | os.PathLike[str]]) -> list[Path | None]:
    """Where each demo's CSV goes: ``out`` itself for one demo (a file), or, for an existing
    folder, ``FOLDER/<demo stem>.phases.csv`` per demo (several demos need a folder).
    Checked before any work: never a demo, never an existing file that is not a phases
    CSV."""
    from masa_rt.cli_types import check_output_path

    if out is None:
        return [None] * len(demos)
    out = Path(out)
    if out.is_dir():
        paths = [out / f"{Path(d).stem}.phases.csv" for d in demos]
    elif len(demos) > 1:
        raise ProposeError(f"--out {out}: with {len(demos)} demos give an existing folder "
                           "(one <demo>.phases.csv each)")
    else:
        if not out.parent.is_dir():
            raise ProposeError(f"--out {out}: folder {out.parent} does not exist (create it "
                               "first)")
        paths = [out]
    if len({p.resolve() for p in paths}) < len(paths):
        raise ProposeError("demos with the same file name would write the same CSV; give "
                           "them distinct names")
    for p in paths:
        check_output_path(p, demos, replaceable=("a phases CSV", is_phases_csv))
    return paths


def run_cli(args: Any) -> int:
    """``masa-rt reference propose``: print the proposals, write the CSVs."""
    import torch

    torch.set_num_threads(args.threads)  # one: faster than two on a small shared machine
    outs = output_paths(args.out, args.demos)
    props, how, meta = propose_files(args.demos, args.checkpoint, phases=args.phases,
                                     signal=args.signal, penalty=args.penalty)
    print(f"change points of the {DESCRIBE[args.signal]} (model "
          f"{meta.get('model_fingerprint')}): {how}")
    for prop, out in zip(props, outs, strict=True):
        print(f"\n{prop.name}: {prop.num_frames} frames, {len(prop.frames)} phases")
        print(f"  {'phase':<10} {'frame':>6} {'time (s)':>9}")
        for name, f, t in zip(prop.phase_names, prop.frames, prop.times, strict=True):
            print(f"  {name:<10} {f:>6} {t:>9.3f}")
        if out is not None:
            write_phases_csv(out, prop, args.unit)
            print(f"wrote {out} ({args.unit},phase): rename the phases or move their starts, "
                  f"then: masa-rt label {prop.name} --phases {out}")
    return 0

"""How well can phase be known at all on the harness's clean val streams? (issue #5)

The generator moves between phase keys with minimum-jerk profiles, so the pose is nearly
still around every phase boundary: in the first ~10 % of a phase it has moved less than
1 % of the way. A causal observer cannot tell that the next phase began until the motion
exceeds the observation noise. This script measures that ceiling on the very streams the
harness scores (``masa-rt harness --scenarios clean``: ``sequence_rng(10000 + seed,
activity, i)``), and separates what the subject / noise variation costs from what timing
costs, with **oracle streams**: the val stream's own timeline (phases, speeds, pauses)
replayed on the reference's subject (canonical keys, hand shape, no viewpoint, mirror,
tremor, noise or missing joints). The pose of an oracle frame then equals the reference's
pose at the same canonical time exactly; only the timing differs.

Printed (one JSON object; ``--out`` also writes it):

- ``boundary_share_pct``: share of frames within X % (of the phase's canonical duration)
  of a phase boundary, X = 5, 10, 20;
- ``still_start_pct``: share of frames in phase p >= 1 whose pose is still within
  ``thr`` mm RMS (over joints) of the pose at the phase's start, thr = 1, 3, 5 mm
  (the val noise is 3 mm white + 2 mm tremor per coordinate): a causal observer sees the
  end of phase p-1 there, so ``100 - still_start_pct`` bounds its phase accuracy;
- ``truth_delayed``: the score of the *true* progress itself, read off the reference's
  phase labels (``delay 0``), and of the true progress k = 1, 2, 3, 5 stream frames late:
  the metric's own ceiling, and what a constant causal lag costs on these short phases;
- ``oracle``: phase accuracy / progress MAE on the oracle streams, raw keypoints
  (frame_features, L2-normalised) and the model's embeddings, online aligner
  (default config) and offline full DTW, against the clean-demo reference of the same
  embedding (the harness's references);
- ``oracle_noisy``: the oracle streams plus the val streams' tracking noise (tremor
  2 mm, white 3 mm per coordinate; no viewpoint, mirror or missing joints): what the
  noise alone costs near the still boundaries;
- ``val``: the same four on the real (noisy, varied) val streams, for comparison;
- ``subject``: the val streams' own timelines and subjects before observation (no
  viewpoint, mirror, tracking noise or missing joints), one subject factor at a time:
  ``keys_only`` (each phase's target pose jittered per subject), ``body_only`` (size and
  bone lengths), ``keys_and_body`` (both: the val stream minus observation): what a
  perfectly view-invariant, noise-free feature would still face;
- ``timing``: oracle poses (reference subject, no noise) on fresh timelines (val seed
  namespace, indices from 900) that vary one thing at a time: ``speed1_nopause`` (the
  reference's own timing), ``speed_only`` (0.5-2x per phase), ``pause_only`` (short
  pauses inside phases) and ``both`` (the val streams' timing): which timing variation an
  embedding is not invariant to.

    OMP_NUM_THREADS=1 python benchmarks/phase_ceiling.py [--per-activity 4] [--seed 0]
        [--activities pour_milk ...] [--checkpoint RUN_OR_PT] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.export import resolve_checkpoint  # noqa: E402
from engine.harness import (  # noqa: E402
    SCENARIOS,
    VAL_SEED_BASE,
    Stream,
    _true_progress,
    embed_learned,
    embed_raw,
    make_references,
    make_streams,
    method_config,
    run_offline,
    run_per_activity,
    score,
)
from masa_rt.atomic import atomic_write_json  # noqa: E402
from masa_rt.checkpoint import load_model  # noqa: E402
from masa_rt.preprocess import frame_features  # noqa: E402
from masa_rt.synth import ACTIVITIES, CLEAN, HAND_ACTIVITIES, Variation, sequence_rng  # noqa: E402
from masa_rt.synth.generate import (  # noqa: E402
    Frames,
    _tremor,
    canonical_time,
    forward_kinematics,
    jittered_keys,
    pose_params,
    sample,
    timeline,
)

BOUNDARY_PCT = (5, 10, 20)
TIMINGS = {
    "speed1_nopause": Variation(speed=(1.0, 1.0), pause_prob=0.0),
    "speed_only": Variation(pause_prob=0.0),
    "pause_only": Variation(speed=(1.0, 1.0)),
    "both": Variation(),
}
STILL_MM = (1.0, 3.0, 5.0)


# Subject factors, one at a time, on the val streams' own timelines (no viewpoint, mirror,
# noise or missing joints): the keys (where each phase ends) and the body (size, bones).
SUBJECTS = {
    "keys_only": Variation(scale=(1.0, 1.0), bone_jitter=0.0),
    "body_only": Variation(key_jitter=0.0),
    "keys_and_body": Variation(),
}


def subject_joints(act: str, seed: int, index: int, var: Variation,
                   scenario_k: int = 0) -> tuple[Frames, np.ndarray]:
    """Harness val stream ``index``'s timeline and (T, J, 3) joints before observation,
    with the subject factors of ``var``: the rng draws of ``generate`` up to its
    ``forward_kinematics`` (key jitter, timeline, size and bones), so ``Variation()``
    gives the val stream's own subject."""
    spec = ACTIVITIES[act]
    rng = sequence_rng(VAL_SEED_BASE + seed, act, scenario_k * 1000 + index)
    keys = jittered_keys(spec, rng, var.key_jitter)
    frames = sample(timeline(spec, rng, Variation(), None), 30.0)
    return frames, forward_kinematics(spec, pose_params(keys, frames), rng, var)


def oracle_frames(act: str, seed: int, index: int, scenario_k: int = 0) -> Frames:
    """The timeline of harness val stream ``index`` (clean scenario, list position
    ``scenario_k``)."""
    return subject_joints(act, seed, index, Variation(), scenario_k)[0]


def stillness(act: str, frames: Frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: the canonical distance to the nearest phase boundary (fraction of the
    phase), the RMS (m) distance of the pose from the phase's start pose, and the oracle
    joints (T, J, 3): the reference's subject on this timeline."""
    spec = ACTIVITIES[act]
    keys = spec.keys()
    rng = np.random.default_rng(0)
    joints = forward_kinematics(spec, pose_params(keys, frames), rng, CLEAN)
    start = Frames(frames.phase, frames.from_key, np.zeros_like(frames.tau))
    at_start = forward_kinematics(spec, pose_params(keys, start), rng, CLEAN)
    moved = np.sqrt(np.mean(np.sum((joints - at_start) ** 2, axis=-1), axis=-1))
    to_boundary = np.minimum(frames.tau, 1.0 - frames.tau)
    return to_boundary, moved, joints


def _oracle_stream(act, frames, spec, progress, embedders, scenario, index, joints=None):
    if joints is None:
        joints = stillness(act, frames)[2]
    x = frame_features(joints.astype(np.float32), spec)
    o = Stream(activity=act, scenario=scenario, index=index, joints=joints,
               times=np.arange(len(x)) / spec.fps, phases=frames.phase.astype(np.int64),
               progress=progress, lost=np.zeros(len(x), dtype=bool), x=x)
    o.emb = {m: np.asarray(e(x), dtype=np.float32) for m, e in embedders.items()}
    return o


def truth_delayed(streams, refs, delays=(0, 1, 2, 3, 5)) -> dict:
    """Phase accuracy % of the true progress mapped to the reference's labels, as is and
    ``k`` frames late (the first ``k`` frames keep the first frame's value)."""
    out = {}
    for k in delays:
        hits = []
        for s in streams:
            ref = refs[s.activity]
            idx = np.rint(s.progress * (len(ref) - 1)).astype(np.int64)
            late = idx[np.maximum(np.arange(len(idx)) - k, 0)]
            hits.append(ref.phases[np.clip(late, 0, len(ref) - 1)] == s.phases)
        out[f"delay_{k}"] = round(100 * float(np.mean(np.concatenate(hits))), 1)
    return out


def _evaluate(streams, refs, embedders, activities, fps) -> dict:
    out = {}
    for m in embedders:
        preds = run_per_activity(refs[m], streams, m, method_config(m, list(refs[m].values())))
        off = [run_offline(refs[m], s, m) for s in streams]
        for label, pr in ((f"{m}_online", preds), (f"{m}_offline_dtw", off)):
            r = score(streams, pr, activities, fps)
            out[label] = {"phase_acc_pct": round(r["phase_acc_pct"], 1),
                          "progress_mae_pct": round(r["progress_mae_pct"], 2)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-activity", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--activities", nargs="+", default=list(HAND_ACTIVITIES))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    model, _cfg, spec, meta = load_model(resolve_checkpoint(args.checkpoint))
    embedders = {"learned": embed_learned(model), "raw": embed_raw}
    refs, canon = make_references(args.activities, spec, embedders)
    val = make_streams(args.activities, [SCENARIOS["clean"]], args.per_activity, args.seed,
                       spec, canon, embedders)
    oracle, noisy, near, still = [], [], [], []
    var = Variation()  # the val streams' noise
    for s in val:
        frames = oracle_frames(s.activity, args.seed, s.index)
        if not np.array_equal(frames.phase, s.phases):
            raise RuntimeError(f"{s.activity}/{s.index}: oracle timeline differs from the "
                               "val stream (the generator's rng order changed?)")
        to_b, moved, joints = stillness(s.activity, frames)
        near.append(to_b)
        still.append(np.where(frames.phase >= 1, moved, np.inf))  # phase 0: start is known
        oracle.append(_oracle_stream(s.activity, frames, spec, s.progress, embedders,
                                     "oracle", s.index, joints))  # same timeline: same truth
        rng = np.random.default_rng([args.seed, s.index, len(oracle)])
        jn = (joints + _tremor(joints.shape, rng, var.tremor_m)
              + rng.normal(0.0, var.noise_m, size=joints.shape)).astype(np.float32)
        noisy.append(_oracle_stream(s.activity, frames, spec, s.progress, embedders,
                                    "oracle_noisy", s.index, jn))
    near_a, still_a = np.concatenate(near), np.concatenate(still)
    report: dict = {
        "streams": len(val), "frames": int(len(near_a)), "activities": args.activities,
        "seed": args.seed, "model": str(meta["path"]),
        "boundary_share_pct": {f"{x}%": round(100 * float(np.mean(near_a < x / 100)), 1)
                               for x in BOUNDARY_PCT},
        "still_start_pct": {f"{t:g}mm": round(100 * float(np.mean(still_a < t / 1000)), 1)
                            for t in STILL_MM},
    }
    report["truth_delayed"] = truth_delayed(val, refs["raw"])
    for name, streams in (("oracle", oracle), ("oracle_noisy", noisy), ("val", val)):
        report[name] = _evaluate(streams, refs, embedders, args.activities, spec.fps)
    report["subject"] = {}
    for name, var in SUBJECTS.items():
        streams = []
        for s in val:
            frames, joints = subject_joints(s.activity, args.seed, s.index, var)
            streams.append(_oracle_stream(s.activity, frames, spec, s.progress, embedders,
                                          name, s.index, joints))
        report["subject"][name] = _evaluate(streams, refs, embedders, args.activities,
                                            spec.fps)
    report["timing"] = {}
    for name, var in TIMINGS.items():
        streams = []
        for act in args.activities:
            for i in range(args.per_activity):
                rng = sequence_rng(VAL_SEED_BASE + args.seed, act, 900 + i)
                frames = sample(timeline(ACTIVITIES[act], rng, var, None), spec.fps)
                truth = _true_progress(canonical_time(ACTIVITIES[act], frames), canon[act])
                streams.append(_oracle_stream(act, frames, spec, truth, embedders, name, i))
        report["timing"][name] = _evaluate(streams, refs, embedders, args.activities, spec.fps)
    report["run_time_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

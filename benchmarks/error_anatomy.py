"""Where the engine's wrong phases are, on the harness's streams (issue #5).

Scores prebuilt references (``examples``: the shipped ones, phase decoders included) on
the harness's val streams, as ``masa-rt harness --references DIR`` does, and sorts every
frame whose reported phase is wrong by where it sits:

- ``by_boundary``: by distance to the nearest true phase change, 6 frames each side:
  ``until_k`` is k frames before it (``until_1``: a phase's last frame), ``since_k`` k
  frames after (``since_0``: the next phase's first frame), ``mid`` the rest; per bucket
  the share of its frames that are wrong and its share of all wrong frames. A causal
  engine that reports a change late errs at ``since``; one that reports it early, at
  ``until``;
- ``mid_phase``: the ``mid`` frames by what the user does (``pause``: canonical time
  stands still; else the speed against the demo's, from the frames' times, ``slow`` <
  0.8x, ``fast`` > 1.3x) and which way the reported phase is off (``next``, ``prev``,
  ``other``);
- ``pauses``: wrong share of paused frames by where in its phase the pause holds (its
  canonical position u, in tenths; the pose has moved minimum-jerk(u) of the way: 84 % at
  u = 0.7, 94 % at 0.8) and by how many frames the pause has lasted.

``--truth`` scores the true progress read off the reference's phase labels instead of
the engine (``phase_ceiling.py``'s ``delay_0``): where rounding onto the reference's
frames alone puts wrong frames.

``--pause-state`` also reports, from the same run, how often the estimate's state is
``paused`` while the user is (canonical time still for at
least ``pause_frames`` frames: recall) and while the user moves (false flags); the first
``pause_frames - 1`` frames of a pause count as neither.

    OMP_NUM_THREADS=1 python benchmarks/error_anatomy.py [--references examples]
        [--seed 1] [--per-activity 12] [--scenario clean] [--truth] [--pause-state]
        [--out anatomy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.export import resolve_checkpoint  # noqa: E402
from engine.harness import (  # noqa: E402
    SCENARIOS,
    embed_learned,
    load_references,
    make_references,
    make_streams,
    run_per_activity,
    use_references,
)
from masa_rt.align import STATES, AlignerConfig  # noqa: E402
from masa_rt.atomic import atomic_write_json  # noqa: E402
from masa_rt.checkpoint import load_model  # noqa: E402
from masa_rt.synth import HAND_ACTIVITIES  # noqa: E402

NEAR = 6  # frames on each side of a phase change that count as "at the boundary"


def boundary_bucket(phases: np.ndarray) -> list[str]:
    """Per frame: ``until_1 .. until_NEAR``, ``since_0 .. since_NEAR-1`` or ``mid``."""
    n = len(phases)
    cuts = np.flatnonzero(np.diff(phases)) + 1
    out = []
    for t in range(n):
        after = t - cuts[cuts <= t]  # frames since the last change
        before = cuts[cuts > t] - t  # frames until the next
        since = int(after.min()) if after.size else n
        until = int(before.min()) if before.size else n
        if since < until and since < NEAR:
            out.append(f"since_{since}")
        elif until <= NEAR:
            out.append(f"until_{until}")
        else:
            out.append("mid")
    return out


def still(progress: np.ndarray) -> np.ndarray:
    """Per frame: canonical time stands still since the frame before (the first: no)."""
    return np.abs(np.diff(progress, prepend=np.nan)) < 1e-9  # NaN < x is False


def motion(progress: np.ndarray, times: np.ndarray, ref_frames: int, fps: float) -> list[str]:
    """Per frame: ``pause`` or the speed against the demo's (reference frames per frame
    time; from the frames' times, so a dropped frame is not a fast one)."""
    dt = np.diff(times, prepend=times[0] - 1.0 / fps) * fps
    speed = np.abs(np.diff(progress, prepend=progress[0])) * (ref_frames - 1) / dt
    speed[0] = 1.0  # the first frame has no step: counted as normal
    kinds = np.where(speed < 0.8, "slow", np.where(speed <= 1.3, "normal", "fast"))
    return np.where(still(progress), "pause", kinds).tolist()


def direction(said: int, truth: int) -> str:
    if said == truth:
        return "ok"
    return {1: "next", -1: "prev"}.get(said - truth, "other")


def pause_position(progress: float, truth: int, ref_phases: np.ndarray) -> float:
    """Where in its phase a paused frame holds: 0 at the phase's first reference frame,
    1 at the next phase's."""
    f = progress * (len(ref_phases) - 1)
    frames = np.flatnonzero(ref_phases == truth)
    a, e = frames[0], frames[-1] + 1
    return float(np.clip((f - a) / (e - a), 0.0, 0.99))


def _pct(part: Counter, whole: Counter) -> dict[str, dict[str, float]]:
    return {k: {"frames": whole[k], "wrong_pct": round(100 * part[k] / whole[k], 1)}
            for k in sorted(whole, key=str)}


def anatomy(streams, phases_said, refs) -> dict:
    """The report's three breakdowns (module docstring) for the streams' reported phases."""
    bucket, bucket_wrong = Counter(), Counter()
    mid, pause_u, pause_u_wrong, pause_len, pause_len_wrong = (Counter() for _ in range(5))
    for s, said in zip(streams, phases_said, strict=True):
        ref_phases = refs[s.activity].phases
        kinds = motion(s.progress, s.times, len(ref_phases), refs[s.activity].fps)
        held = 0
        for t, (b, kind) in enumerate(zip(boundary_bucket(s.phases), kinds, strict=True)):
            wrong = bool(said[t] != s.phases[t])
            bucket[b] += 1
            bucket_wrong[b] += wrong
            if b == "mid":
                mid[(kind, direction(int(said[t]), int(s.phases[t])))] += 1
            held = held + 1 if kind == "pause" else 0
            if kind == "pause":
                u = f"{int(10 * pause_position(s.progress[t], s.phases[t], ref_phases)) / 10:.1f}"
                pause_u[u] += 1
                pause_u_wrong[u] += wrong
                lasted = f"{min(held // 5 * 5, 40):02d}+"
                pause_len[lasted] += 1
                pause_len_wrong[lasted] += wrong
    frames, wrong = sum(bucket.values()), sum(bucket_wrong.values())
    by_boundary = _pct(bucket_wrong, bucket)
    for k, v in by_boundary.items():
        v["share_of_wrong_pct"] = round(100 * bucket_wrong[k] / max(wrong, 1), 1)
    kinds = sorted({k for k, _ in mid})
    return {
        "frames": frames, "wrong": wrong, "phase_acc_pct": round(100 * (1 - wrong / frames), 2),
        "by_boundary": by_boundary,
        "mid_phase": {k: {d: mid[(k, d)] for d in ("ok", "next", "prev", "other")}
                      for k in kinds},
        "pauses": {"by_position": _pct(pause_u_wrong, pause_u),
                   "by_frames_paused": _pct(pause_len_wrong, pause_len)},
    }


def pause_state(streams, states, need: int) -> dict:
    """How the aligner's ``paused`` state (``states``: per stream, indices into STATES, as
    ``run_bank`` records them, each for the frame it describes) matches the user's
    pauses of at least ``need`` frames (module docstring)."""
    flagged = Counter()
    paused = STATES.index("paused")
    for s, said_states in zip(streams, states, strict=True):
        run = 0
        for held, said in zip(still(s.progress), said_states == paused, strict=True):
            run = run + 1 if held else 0
            if 0 < run < need:
                continue  # a pause just begun: neither moving nor long enough to flag
            key = "paused" if run else "moving"
            flagged[key] += 1
            flagged[key + "_flagged"] += bool(said)
    return {"paused_frames": flagged["paused"], "moving_frames": flagged["moving"],
            "recall_pct": round(100 * flagged["paused_flagged"] / max(flagged["paused"], 1), 1),
            "false_flag_pct": round(100 * flagged["moving_flagged"] / max(flagged["moving"], 1),
                                    1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--references", default="examples")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-activity", type=int, default=12)
    ap.add_argument("--scenario", default="clean", choices=sorted(SCENARIOS))
    ap.add_argument("--truth", action="store_true",
                    help="score the true progress read off the reference's labels")
    ap.add_argument("--pause-state", action="store_true",
                    help="also score the aligner's paused state against the user's pauses")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    acts = list(HAND_ACTIVITIES)
    model, _cfg, spec, meta = load_model(resolve_checkpoint(args.checkpoint))
    emb = {"learned": embed_learned(model)}
    built, canon = make_references(acts, spec, emb)
    refs = use_references(built["learned"], load_references(args.references, acts))
    streams = make_streams(acts, [SCENARIOS[args.scenario]], args.per_activity, args.seed,
                           spec, canon, emb)
    preds = run_per_activity(refs, streams, "learned") if not args.truth or args.pause_state \
        else None
    if args.truth:
        said = []
        for s in streams:
            ref_phases = refs[s.activity].phases
            idx = np.rint(s.progress * (len(ref_phases) - 1)).astype(np.int64)
            said.append(ref_phases[np.clip(idx, 0, len(ref_phases) - 1)])
    else:
        said = [p.phase for p in preds]
    report = {"references": args.references, "truth": args.truth, "seed": args.seed,
              "scenario": args.scenario, "streams": len(streams), "model": str(meta["path"]),
              **anatomy(streams, said, refs)}
    if args.pause_state:
        report["pause_state"] = pause_state(streams, [p.state for p in preds],
                                            AlignerConfig.for_references(list(refs.values()))
                                            .pause_frames)
    print(json.dumps(report, indent=1))
    if args.out:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

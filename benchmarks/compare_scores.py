"""Paired difference of the engine's phase accuracy between two ``masa-rt score`` runs on
the same recordings (e.g. an aligner option on and off), with the same bootstrap interval
``masa-rt score`` gives its baselines (masa_rt.metrics.paired_accuracy_difference_ci).

    masa-rt score --reference R/*.npz --data D --out /tmp/on
    masa-rt score --reference R/*.npz --data D --out /tmp/off --aligner phase_filter=false
    python benchmarks/compare_scores.py /tmp/on/score.json /tmp/off/score.json

Recordings are matched by file name; each one's right frames come from its per-recording
accuracy and frame count in score.json. Prints only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from masa_rt.metrics import paired_accuracy_difference_ci  # noqa: E402


def right_frames(path: str, method: str) -> dict[str, tuple[int, int]]:
    """File name -> (frames, right frames) of ``method`` in one score.json."""
    rows = json.loads(Path(path).read_text())["per_recording"]
    return {Path(r["file"]).name: (r["frames"], round(r["frames"] * r["phase_acc_pct"][method]
                                                      / 100))
            for r in rows if method in r["phase_acc_pct"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="score.json of the first run")
    ap.add_argument("b", help="score.json of the second run")
    ap.add_argument("--method", default="engine", help="the method compared (default engine)")
    args = ap.parse_args()
    a, b = right_frames(args.a, args.method), right_frames(args.b, args.method)
    files = sorted(set(a) & set(b))
    # Each recording as phase 0 throughout, predicted right (0) on as many frames as it
    # was: the pooled accuracies and what the interval resamples are the runs' own.
    truth = [np.zeros(a[f][0], dtype=np.int64) for f in files]

    def predictions(run: dict[str, tuple[int, int]]) -> list[np.ndarray]:
        return [(np.arange(run[f][0]) >= run[f][1]).astype(np.int64) for f in files]

    n = sum(a[f][0] for f in files)
    ra, rb = (sum(run[f][1] for f in files) for run in (a, b))
    lo, hi = paired_accuracy_difference_ci(truth, predictions(a), predictions(b))
    print(f"{len(files)} recordings: {100 * ra / n:.1f} against {100 * rb / n:.1f} %, "
          f"difference {100 * (ra - rb) / n:+.1f} points (95 % CI {lo:+.1f} to {hi:+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How well ``masa-rt reference propose`` finds phase boundaries without labels.

    python benchmarks/propose_benchmark.py                       # prints the table
    python benchmarks/propose_benchmark.py --out /tmp/propose.md # also writes it (+ .json)

Two data sets, each with a train split (the penalty per phase is chosen there) and a test
split (reported):

* ``penn``: Penn Action key events (real people, 2D, docs/penn_events.md): the labelled
  videos of ``--penn`` (default ``data/penn_ev``; made with ``masa-rt import-penn
  ../shared/data/pennaction/labels --out data/penn_ev --events`` when missing); train =
  the official train split, test = the official test split (the manifest's ``val``).
  Model: the shipped penn13 body model.
* ``synth``: ordinary performances of the six hand activities from ``masa-rt synth``
  (seed 29, which no shipped model was trained on; random subject, size, view, speed per
  phase, pauses, noise, lost joints; not the canonical demos), half of each activity
  train, half test. Model: the shipped hand model.

Every method runs the same detector (``engine.propose``: least-squares change points,
penalty per segment) on one per-frame signal; only the signal differs:

* ``learned velocity`` (the command's default): the unit embedding's frame-to-frame change;
* ``learned position``: the unit embedding itself (segments = stretches of one implicit
  cluster);
* ``raw velocity`` (the baseline): normalised keypoints' frame-to-frame change;
* ``raw position``: normalised keypoints themselves.

Columns: boundary F1 within +-3 / 5 / 10 frames (one-to-one matches, pooled over
recordings, ``masa_rt.metrics.boundary_f1``) with a 95 % bootstrap interval over
recordings at +-3; precision and recall at +-3; phase-count error = mean |proposed -
true| number of segments per recording; and F1 at +-3 when the true count is given
(``--phases K``), which measures where the boundaries fall apart from how many there are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.propose import (  # noqa: E402
    MIN_SEGMENT,
    best_k_segments,
    boundary_features,
    demo_frames,
    penalised_segments,
    segment_costs,
    unlabelled,
)
from masa_rt.metrics import (  # noqa: E402
    boundary_f1,
    boundary_f1_ci,
    boundary_f1_difference_ci,
    label_boundaries,
)

METHODS = {"learned + keypoint velocity (default)": "both", "learned velocity": "learned",
           "learned position": "learned_position", "keypoint velocity (baseline)": "raw",
           "keypoint position": "raw_position"}
PENALTIES = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
SIGMAS = (1.5, 3.0, 5.0, 7.0)
TOLERANCES = (3, 5, 10)
SYNTH_SEED = 29
BASELINE = "raw"
GROUP = 5  # recordings proposed together in the several-demos rows


def labelled(dataset: Path) -> dict[str, list[Path]]:
    """The recordings with phase labels, per split (``train``, ``test`` = manifest val)."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    out: dict[str, list[Path]] = {"train": [], "test": []}
    for entry in manifest["files"]:
        with np.load(dataset / entry["file"]) as z:
            if "phases" in z.files:
                out["train" if entry["split"] == "train" else "test"].append(
                    dataset / entry["file"])
    return out


def prepare(paths: list[Path], checkpoint: Path) -> list[dict]:
    """Per recording: its sequence, true boundaries and the per-method segment costs."""
    import torch

    from engine.reference import embed_demo
    from masa_rt.checkpoint import load_model
    from masa_rt.sequence import load_sequence

    torch.set_num_threads(1)
    model, _cfg, spec, _meta = load_model(checkpoint)
    items = []
    for p in paths:
        seq = load_sequence(p)
        demo = embed_demo(model, spec, unlabelled(seq), str(p))
        costs = {(kind, sig): segment_costs(boundary_features(demo, spec, kind, sig),
                                            MIN_SEGMENT)
                 for kind in METHODS.values() for sig in SIGMAS}
        items.append({"seq": seq, "demo": demo, "costs": costs,
                      "truth": label_boundaries(seq.phases)})
    return items


def predict(items: list[dict], kind: str, sigma: float,
            penalty: float | None) -> list[np.ndarray]:
    """Boundary frames per recording: with ``penalty``, or with the true count (None)."""
    out = []
    for it in items:
        cost = it["costs"][kind, sigma]
        if penalty is None:
            k = min(len(it["truth"]) + 1, (len(cost) - 1) // MIN_SEGMENT)
            starts = best_k_segments(cost, k, MIN_SEGMENT)
        else:
                starts = penalised_segments(cost, penalty)
        out.append(np.array(demo_frames(it["seq"], it["demo"], starts)[1:]))
    return out


def predict_together(items: list[dict], kind: str, sigma: float,
                     penalty: float) -> list[np.ndarray]:
    """The command with several demos: groups of GROUP consecutive recordings of one
    activity; each group's count is the median of its recordings' penalised counts, then
    every recording is split into exactly that many phases."""
    by_activity: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_activity.setdefault(it["seq"].activity or "", []).append(i)
    out: list[np.ndarray] = [np.zeros(0)] * len(items)
    for idx in by_activity.values():
        for g in range(0, len(idx), GROUP):
            group = idx[g:g + GROUP]
            costs = [items[i]["costs"][kind, sigma] for i in group]
            k = int(np.median([len(penalised_segments(c, penalty)) + 1 for c in costs]))
            for i, cost in zip(group, costs, strict=True):
                starts = best_k_segments(cost, min(k, (len(cost) - 1) // MIN_SEGMENT),
                                         MIN_SEGMENT)
                out[i] = np.array(demo_frames(items[i]["seq"], items[i]["demo"], starts)[1:])
    return out


def count_error(items: list[dict], preds: list[np.ndarray]) -> float:
    return float(np.mean([abs(len(p) - len(it["truth"]))
                          for it, p in zip(items, preds, strict=True)]))


def summary(label: str, kind: str, sig: float, pen: float, train_f1: float,
            truth: list[np.ndarray], preds: list[np.ndarray], test: list[dict],
            baseline: list[np.ndarray] | None, oracle: float | None) -> dict:
    f = {tol: boundary_f1(truth, preds, tol) for tol in TOLERANCES}
    return {"method": label, "signal": kind, "sigma": sig, "penalty": pen,
            "train_f1_3": train_f1, **{f"f1_{t}": f[t]["f1"] for t in TOLERANCES},
            "f1_3_ci95": list(boundary_f1_ci(truth, preds, 3)),
            "f1_3_minus_baseline_ci95": (list(boundary_f1_difference_ci(truth, preds, baseline,
                                                                        3))
                                         if baseline is not None else None),
            "precision_3": f[3]["precision"], "recall_3": f[3]["recall"],
            "count_error": count_error(test, preds), "true_boundaries": f[3]["true"],
            "proposed": f[3]["predicted"], "f1_3_true_count": oracle}


def evaluate(train: list[dict], test: list[dict]) -> list[dict]:
    truth_tr = [it["truth"] for it in train]
    truth = [it["truth"] for it in test]
    chosen, preds = {}, {}
    for kind in METHODS.values():
        # smoothing and penalty of best F1 at +-3 frames on the train split (ties: the
        # smoother, then the larger penalty)
        scores = {(sig, pen): boundary_f1(truth_tr, predict(train, kind, sig, pen), 3)["f1"]
                  for sig in SIGMAS for pen in PENALTIES}
        sig, pen = max(scores, key=lambda k: (round(scores[k], 6), k))
        chosen[kind] = (sig, pen, scores[sig, pen])
        preds[kind] = predict(test, kind, sig, pen)
    rows = []
    base = preds[BASELINE]
    for label, kind in METHODS.items():
        sig, pen, train_f1 = chosen[kind]
        oracle = boundary_f1(truth, predict(test, kind, sig, None), 3)["f1"]
        rows.append(summary(label, kind, sig, pen, train_f1, truth, preds[kind], test,
                            None if kind == BASELINE else base, oracle))
    for label, kind in list(METHODS.items())[:1] + [("keypoint velocity (baseline)", BASELINE)]:
        sig, pen, train_f1 = chosen[kind]
        together = predict_together(test, kind, sig, pen)
        rows.append(summary(f"{label}, {GROUP} demos at once", kind, sig, pen, train_f1,
                            truth, together, test, base, None))
    return rows


def table(name: str, n_train: int, n_test: int, rows: list[dict]) -> str:
    lines = [f"**{name}** ({n_test} test recordings, {rows[0]['true_boundaries']} true "
             f"boundaries; penalty chosen on {n_train} train recordings)", "",
             "| signal | sigma, penalty | F1 +-3 (95 % CI) | minus baseline (95 % CI) | F1 +-5 | "
             "F1 +-10 | P / R +-3 | count error | F1 +-3, true count |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lo, hi = r["f1_3_ci95"]
        diff = r["f1_3_minus_baseline_ci95"]
        vs = f"{diff[0]:+.2f} to {diff[1]:+.2f}" if diff else "-"
        oracle = f"{r['f1_3_true_count']:.2f}" if r["f1_3_true_count"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['sigma']:g}, {r['penalty']:g} | {r['f1_3']:.2f} "
            f"({lo:.2f}-{hi:.2f}) | {vs} | {r['f1_5']:.2f} | {r['f1_10']:.2f} | "
            f"{r['precision_3']:.2f} / {r['recall_3']:.2f} | {r['count_error']:.2f} | "
            f"{oracle} |")
    return "\n".join(lines)


def masa_rt(*args: str) -> None:
    cmd = [sys.executable, "-m", "masa_rt.cli", *args]
    print("$ masa-rt " + " ".join(args), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--penn", type=Path, default=ROOT / "data" / "penn_ev",
                   help="Penn Action imported with --events (made here when missing)")
    p.add_argument("--penn-labels", type=Path,
                   default=ROOT.parent / "shared" / "data" / "pennaction" / "labels",
                   help="Penn Action's labels folder, to import from when --penn is missing")
    p.add_argument("--per-activity", type=int, default=16,
                   help="synthetic performances per hand activity (half train, half test)")
    p.add_argument("--only", choices=("penn", "synth"), default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="also write the table here (Markdown) and the figures beside it "
                        "(.json)")
    args = p.parse_args(argv)

    from masa_rt.shipped import shipped_model_path

    started = time.perf_counter()
    sections, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.only in (None, "penn"):
            if not (args.penn / "manifest.json").exists():
                args.penn = Path(tmp) / "penn_ev"
                masa_rt("import-penn", str(args.penn_labels), "--out", str(args.penn),
                        "--events")
            sets.append(("penn", "Penn Action key events (real, 2D)", args.penn,
                         shipped_model_path("penn13")))
        if args.only in (None, "synth"):
            synth = Path(tmp) / "synth"
            masa_rt("synth", "--out", str(synth), "--activities", "hands", "--per-activity",
                    str(args.per_activity), "--seed", str(SYNTH_SEED), "--val-fraction", "0.5",
                    "--examples", "")
            sets.append(("synth", "Synthetic hand activities, ordinary performances", synth,
                         shipped_model_path("h2o_hands")))
        for key, name, folder, ckpt in sets:
            split = labelled(folder)
            train, test = prepare(split["train"], ckpt), prepare(split["test"], ckpt)
            rows = evaluate(train, test)
            results[key] = {"train": len(train), "test": len(test), "rows": rows}
            sections.append(table(name, len(train), len(test), rows))
    text = "\n\n".join(sections)
    print(text)
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.out is not None:
        from masa_rt.atomic import atomic_write, atomic_write_json

        with atomic_write(args.out, "w") as f:
            f.write(text + "\n")
        atomic_write_json(args.out.with_suffix(".json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The project's accuracy benchmarks, each one command: references built the way a user
builds them (from ordinary recordings: one, and several combined), scored with
``masa-rt score`` on held-out recordings, baselines beside the engine.

    python benchmarks/score_benchmark.py penn --labels ../shared/data/pennaction/labels \\
        --out /tmp/bench_penn
    python benchmarks/score_benchmark.py synth --out /tmp/bench_synth

``penn``: Penn Action key events (``masa-rt import-penn --events``, docs/penn_events.md):
for each labelled action, references from its first K labelled *train* videos (manifest
order), queries = its labelled official *test* videos. Model: ``--checkpoint`` (default
the shipped penn13 body model, masa_rt/assets/masa_penn13_causal.pt).

``synth``: ``masa-rt synth`` hand activities from a seed no model was trained on; for each
activity, references from its first K ordinary *train* performances (random subject,
size, view, timing; no perturbation), queries = its val performances; plus one extra row,
labelled, for the shipped references built from the generator's canonical demos.

Each K writes ``OUT/k<K>/score.{json,md}``; ``OUT/summary.md`` puts them side by side,
and for K >= 2 each reference's build-time leave-one-out estimate beside its score.
Every step is a ``masa-rt`` command, printed as it runs, so any one can be rerun alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    # One BLAS/OpenMP thread per child: a reference build with torch's default two
    # threads on this 2-core machine ran several times slower than with one.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)


def labelled_train_videos(dataset: Path) -> dict[str, list[Path]]:
    """Per activity, its labelled train recordings in manifest order."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    out: dict[str, list[Path]] = {}
    for entry in manifest["files"]:
        if entry["split"] != "train":
            continue
        with np.load(dataset / entry["file"]) as z:
            if "phases" in z.files:
                out.setdefault(entry["activity"], []).append(dataset / entry["file"])
    return out


def build_references(demos: dict[str, list[Path]], k: int, out: Path,
                     checkpoint: str | None, decoder_steps: int, first: int = 0) -> list[Path]:
    """Per activity, a reference from its train recordings ``first .. first + k - 1``."""
    refs = []
    out.mkdir(parents=True, exist_ok=True)
    for act, files in sorted(demos.items()):
        if len(files) < first + k:
            print(f"# {act}: only {len(files)} labelled train recordings, K={k} skipped")
            continue
        refs.append(out / f"{act}.npz")
        run(["masa-rt", "reference", "build", *map(str, files[first:first + k]), "-o",
             str(refs[-1]),
             "--decoder-steps", str(decoder_steps),
             *(["--checkpoint", checkpoint] if checkpoint else [])])
    return refs


def score(refs: list[Path], data: Path, out: Path, model: str | None) -> dict:
    run(["masa-rt", "score", "--reference", *map(str, refs), "--data", str(data),
         "--out", str(out), *(["--model", model] if model else [])])
    return json.loads((out / "score.json").read_text())


def summary(rows: list[tuple[str, dict]]) -> str:
    """One table: each run's methods, accuracy with interval and paired difference."""
    lines = ["| references | method | recordings | phase acc % | 95 % CI | minus engine, pts "
             "(95 % CI) | progress MAE % | delay, frames |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, rep in rows:
        for m, r in rep["results"].items():
            ci = r["phase_acc_ci95_pct"]
            d = r.get("minus_engine_pts_ci95")
            mae = r.get("progress_mae_pct")
            delay = r.get("delay_frames")
            lines.append(
                f"| {label} | {m} | {r['streams']} | {r['phase_acc_pct']:.1f} | "
                f"{ci[0]:.1f} to {ci[1]:.1f} | "
                + (f"{d[0]:+.1f} to {d[1]:+.1f}" if d else "-") + " | "
                + (f"{mae:.2f}" if mae is not None else "-") + " | "
                + (f"{delay:.1f}" if delay is not None else "-") + " |")
    return "\n".join(lines)


def self_check_table(refs: list[Path], report: dict) -> str:
    """Each reference's build-time leave-one-out estimate (its meta, engine/self_check.py)
    beside what ``masa-rt score`` measured for its activity on the held-out recordings."""
    from masa_rt.align import Reference

    lines = ["| activity | leave-one-out at build, % | score, held out, % |",
             "| --- | ---: | ---: |"]
    estimates = []
    for path in refs:
        ref = Reference.load(path)
        check = ref.meta.get("leave_one_out")
        got = report["per_activity"].get(ref.activity, {}).get("engine")
        if check is None or got is None:
            continue
        estimates.append(check["phase_acc_pct"])
        lines.append(f"| {ref.activity} | {check['phase_acc_pct']:.1f} | "
                     f"{got['phase_acc_pct']:.1f} |")
    if not estimates:
        return ""
    lines.append(f"| mean of the activities / all held-out frames | "
                 f"{np.mean(estimates):.1f} | {report['results']['engine']['phase_acc_pct']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("which", choices=("penn", "synth"))
    ap.add_argument("--out", required=True, help="working folder (data, references, scores)")
    ap.add_argument("--labels", default=str(ROOT.parent / "shared" / "data" / "pennaction"
                                            / "labels"), help="penn: Penn Action labels/")
    ap.add_argument("--checkpoint", default=None,
                    help="model checkpoint (default: the shipped model that reads the "
                         "data's layout)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5],
                    help="references from the first K ordinary recordings")
    ap.add_argument("--singles", type=int, default=0, metavar="N",
                    help="also score N references of one recording each (train recordings "
                         "0..N-1): is K=N better than the best single one?")
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="phase decoder training steps per reference (0: none)")
    ap.add_argument("--seed", type=int, default=7, help="synth: generator seed")
    ap.add_argument("--per-activity", type=int, default=40,
                    help="synth: performances per activity (a quarter are val)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    checkpoint = args.checkpoint
    if args.which == "penn":
        data = out / "penn"
        if not (data / "events.json").is_file():
            run(["masa-rt", "import-penn", args.labels, "--out", str(data), "--events"])
    else:
        data = out / "synth"
        if not (data / "manifest.json").is_file():
            run(["masa-rt", "synth", "--out", str(data), "--seed", str(args.seed),
                 "--activities", "hands", "--per-activity", str(args.per_activity),
                 "--examples", str(out / "canonical_demos")])
    demos = labelled_train_videos(data)
    rows, checks = [], []
    for k in args.k:
        refs = build_references(demos, k, out / f"refs_k{k}", checkpoint, args.decoder_steps)
        rows.append((f"K={k} ordinary", score(refs, data, out / f"k{k}", checkpoint)))
        if k >= 2:  # references of several demos carry a leave-one-out estimate
            check = self_check_table(refs, rows[-1][1])
            checks += [f"\nK={k}: the estimate reference build printed, against score\n",
                       check] if check else []
    for i in range(args.singles):
        refs = build_references(demos, 1, out / f"refs_single{i}", checkpoint,
                                args.decoder_steps, first=i)
        rows.append((f"single #{i}", score(refs, data, out / f"single{i}", checkpoint)))
    if args.which == "synth" and checkpoint is None:
        shipped = sorted((ROOT / "examples").glob("*.npz"))
        rows.append(("canonical demo (shipped, extra row)",
                     score(shipped, data, out / "canonical", None)))
    table = "\n".join([summary(rows), *checks])
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

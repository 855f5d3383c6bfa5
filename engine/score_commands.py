"""CLI command ``masa-rt score`` (``engine.score``): live phase accuracy on labelled
recordings, with the baselines, in one run.

``engine.commands.register`` calls :func:`register`. The handler imports the scorer
lazily, so ``masa-rt --help`` stays fast; like ``serve`` it never imports torch itself.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from masa_rt.cli_types import positive_int
from masa_rt.layout_option import add_layout_file_option

SPLITS = ("val", "train", "all")


def _parse(value: str, kind: object) -> object:
    if kind in ("bool", bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return int(value) if kind in ("int", int) else float(value)


def aligner_changes(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs -> AlignerConfig field changes, each value read as its field's
    type (one clear error for an unknown field or a bad value)."""
    from dataclasses import fields

    from masa_rt.align import AlignerConfig

    types = {f.name: f.type for f in fields(AlignerConfig)}
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--aligner {pair}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(types)}")
        try:
            out[key] = _parse(value, types[key])
        except ValueError:
            raise ValueError(f"--aligner {pair}: {value!r} is not a {types[key]}") from None
    AlignerConfig(**out)  # validates ranges
    return out


def _score(args: argparse.Namespace) -> int:
    from engine.score import markdown_table, per_activity_table, run_score, write_report

    report = run_score(args.reference, args.data, model=args.model, split=args.split,
                       concurrency=args.concurrency, baselines=not args.no_baselines,
                       aligner=aligner_changes(args.aligner))
    print(markdown_table(report))
    print()
    print(per_activity_table(report))
    aid = report.get("activity_id")
    if aid:
        print(f"\nactivity id ({len(aid['references'])} references): "
              f"{aid['frame_acc_pct']:.1f} % of frames after 1 s, "
              f"{aid['final_acc_pct']:.1f} % of recordings at their last frame")
    lat = report["latency"]
    skipped = ", ".join(f"{v} {k}" for k, v in report["skipped"].items()) or "none"
    print(f"{report['recordings']} recordings (skipped: {skipped}); "
          f"pipeline step p50 {lat['step_ms_p50']:.2f} ms, p99 {lat['step_ms_p99']:.2f} ms "
          f"at {lat['streams_per_round_mean']:.0f} streams per step; "
          f"{report['timing_s']['total']:.0f} s")
    if args.out:
        command = "masa-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        json_path, md_path = write_report(report, args.out, command)
        print(f"wrote {json_path} and {md_path}")
    return 0


def register(subparsers) -> None:
    """Add ``masa-rt score``."""
    p = subparsers.add_parser(
        "score", help="live phase accuracy on labelled recordings, streamed through the "
                      "serving pipeline, with baselines (raw keypoints, no decoder, "
                      "offline DTW)",
        description="Streams every labelled recording under --data through the same "
                    "pipeline `masa-rt serve` runs, frame by frame at its own timestamps, "
                    "against the reference of its activity, and prints per-frame phase "
                    "accuracy (95 % bootstrap interval over recordings), progress error, "
                    "phase-change delay, activity identification (several references) and "
                    "the pipeline's step time, beside the baselines on the same streams.")
    p.add_argument("--reference", nargs="+", required=True, metavar="R",
                   help="reference .npz files (masa-rt reference build), one per activity")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="labelled recordings: sequence .npz files, folders of them, or "
                        "dataset folders (manifest.json)")
    p.add_argument("--model", default=None, metavar="ONNX_OR_CHECKPOINT",
                   help="the model the references were built with (default: the shipped "
                        "model that built them); a checkpoint is exported to ONNX once, "
                        "cached")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="which split of a dataset folder to score (default val)")
    p.add_argument("--concurrency", type=positive_int, default=64, metavar="N",
                   help="recordings streamed at once, as concurrent sessions (default 64)")
    p.add_argument("--aligner", action="append", default=[], metavar="KEY=VALUE",
                   help="change an AlignerConfig field for every method (repeatable), "
                        "e.g. --aligner pause_speed_ratio=0.1")
    p.add_argument("--no-baselines", action="store_true",
                   help="score the engine only")
    add_layout_file_option(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write DIR/score.json and DIR/score.md (default: print only)")
    p.set_defaults(func=_score)

"""CLI command ``masa-rt harness``: the streaming accuracy harness (``engine.harness``).

``engine.commands.register`` calls :func:`register`. The handler imports torch and the
harness lazily, so ``masa-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from masa_rt.cli_types import int_range, nonnegative_int, positive_int


def _harness(args: argparse.Namespace) -> int:
    from engine.commands import decoder_flags, decoder_options
    from engine.export import resolve_checkpoint
    from engine.harness import (
        SCENARIOS,
        load_references,
        markdown_table,
        run_engine_check,
        run_harness,
        write_outputs,
    )
    from engine.score_commands import aligner_changes
    from masa_rt.align import AlignerConfig
    from masa_rt.checkpoint import load_model, model_fingerprint
    from masa_rt.synth import HAND_ACTIVITIES

    unknown = [s for s in args.scenarios or [] if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}")
    bad = [a for a in args.activities or [] if a not in HAND_ACTIVITIES]
    if bad:
        raise ValueError(f"--activities: unknown {bad}; known: {', '.join(HAND_ACTIVITIES)}")
    if not 1 <= args.reference_demos <= 30:
        raise ValueError(f"--reference-demos: expected 1 .. 30 (the training split), found "
                         f"{args.reference_demos}")
    if args.per_activity < 1:
        raise ValueError(f"--per-activity: expected >= 1, found {args.per_activity}")
    decoder = decoder_options(args)
    if args.references and (any(v is not None for v in decoder_flags(args).values())
                            or args.reference_demos != 1 or args.decoder_demos != 1):
        raise ValueError("--references scores prebuilt references as they are: no "
                         "--decoder-*, --reference-demos or --decoder-demos with it")
    if args.decoder_demos != 1 and not args.canonical:
        raise ValueError("--decoder-demos: only with --canonical (the reference stays the "
                         "clean demo, its decoder learns from more demos)")
    if args.canonical and args.reference_demos != 1:
        raise ValueError("--canonical: the canonical reference is one demo; no "
                         "--reference-demos with it")
    aligner = aligner_changes(args.aligner)
    activities = args.activities or HAND_ACTIVITIES
    given = load_references(args.references, activities) if args.references else None
    ckpt = resolve_checkpoint(args.checkpoint)
    model, _cfg, spec, meta = load_model(ckpt)
    fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["path"])
    scenarios = [SCENARIOS[s] for s in args.scenarios] if args.scenarios else None
    report = run_harness(model, spec, activities=activities,
                         scenarios=scenarios, per_activity=args.per_activity, seed=args.seed,
                         fingerprint=fingerprint, keep_streams=args.engine > 0,
                         reference_demos=args.reference_demos, refine=args.refine,
                         decoder=None if given else decoder, decoder_demos=args.decoder_demos,
                         canonical=args.canonical, references=given, aligner=aligner)
    if args.engine > 0:
        streams, preds = report["_streams"], report["_preds"]["learned"]
        picked = [i for i, s in enumerate(streams) if s.scenario in ("clean", "nan_joints")]
        picked = picked[:args.engine] or list(range(min(args.engine, len(streams))))
        learned = report["_refs"]["learned"]
        config = (AlignerConfig.for_references(list(learned.values()), **aligner)
                  if aligner else None)  # the engine runs what the harness ran
        report["engine_check"] = run_engine_check(
            ckpt, [streams[i] for i in picked], learned, [preds[i] for i in picked], config)
    report["model"] = {"path": str(meta["path"]), "fingerprint": fingerprint,
                       "epoch": meta.get("epoch"), "step": meta.get("step")}
    command = "masa-rt harness"
    if "harness" in sys.argv[1:]:  # run from the command line: record it as typed
        command = "masa-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(markdown_table(report))
    if "engine_check" in report:
        ec = report["engine_check"]
        print(f"engine check: {len(ec['streams'])} streams through ONNX + Pipeline, phase "
              f"equal on {ec['phase_equal_pct']:.2f} % of {ec['answered']} frames, progress "
              f"max abs diff {ec['progress_max_abs_diff']:.2g}")
    if args.out:
        json_path, md_path = write_outputs(report, args.out, command,
                                           f"{meta['path']} ({fingerprint})")
        print(f"wrote {json_path} and {md_path}")
    print(f"{report['timing_s']['total']:.0f} s; reference: {report['reference']}")
    return 0


def register(subparsers) -> None:
    """Add ``masa-rt harness``."""
    p = subparsers.add_parser(
        "harness", help="streaming alignment accuracy on synthetic val streams "
                        "(learned vs raw keypoints vs offline DTW)")
    p.add_argument("--checkpoint", default=None, metavar="RUN_OR_PT",
                   help="checkpoint .pt or run folder (default: the shipped model "
                        "masa_rt/assets/masa_hands_causal.pt)")
    # 12 rather than 4: 72 streams per scenario instead of 24. On 24, two seeds of the
    # same engine differed by 2.5 points clean; on 72, by 0.5 (docs/changelog.md,
    # "Twelfth round"). Scoring prebuilt references takes about 45 s instead of 17.
    p.add_argument("--per-activity", type=positive_int, default=12, metavar="N",
                   help="val streams per activity and scenario (default 12)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="val seed; streams come from seed namespace 10000 + SEED")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write DIR/streaming_results.{json,md} (default: print only)")
    p.add_argument("--activities", nargs="+", default=None, metavar="NAME",
                   help="hand activities (default: all)")
    p.add_argument("--scenarios", nargs="+", default=None, metavar="NAME",
                   help="scenarios (default: all): clean same_view pause skip repeat restart "
                        "dropped nan_joints")
    p.add_argument("--engine", type=nonnegative_int, default=0, metavar="K",
                   help="also run K clean / NaN-joint streams through the ONNX serving "
                        "pipeline and compare with the harness frame by frame")
    p.add_argument("--reference-demos", type=positive_int, default=1, metavar="K",
                   help="each activity's reference is built from K ordinary training "
                        "performances (synth seed 0, indices 0..K-1; never val streams; "
                        "K > 1: their medoid average, as `masa-rt reference build`; "
                        "default 1)")
    p.add_argument("--canonical", action="store_true",
                   help="build each reference from the generator's clean canonical demo "
                        "instead (an extra row: not how a user builds one)")
    p.add_argument("--refine", type=nonnegative_int, default=0, metavar="N",
                   help="with --reference-demos K > 1: DBA refinement rounds (default 0)")
    p.add_argument("--decoder-demos", type=int_range(1, 31), default=1, metavar="K",
                   help="1 (default): each phase decoder learns from its reference's demo; "
                        "K > 1: also from the labels of training demos 0..K-2 (as "
                        "`masa-rt reference build CLEAN D0 ... --policy first`; with "
                        "--canonical)")
    p.add_argument("--aligner", action="append", default=[], metavar="KEY=VALUE",
                   help="change an AlignerConfig field for every method (repeat), as "
                        "masa-rt score --aligner, e.g. --aligner phase_filter=false")
    p.add_argument("--references", default=None, metavar="DIR",
                   help="score DIR/<activity>.npz (e.g. examples: the shipped references, "
                        "phase decoders included) instead of building the references and "
                        "training their decoders (a minute instead of about 200); each must "
                        "be built from examples/demos/<activity>.npz (the canonical demos) "
                        "with the checkpoint; implies --canonical")
    from engine.commands import add_decoder_options  # here: engine.commands imports us

    add_decoder_options(p)  # as `masa-rt reference build`
    p.set_defaults(func=_harness)

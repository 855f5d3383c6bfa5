"""CLI commands contributed by engine (see masa_rt.cli).

Building commands live here: ``export`` (checkpoint -> checked ONNX step model) and
``reference build`` (demos -> reference). They need torch, imported inside the handlers.
The serving commands (``serve``, ``watch``, ``demo``, ``bench``) are registered by
``engine.serve_commands`` and never import torch. Add a new command as one ``_add_*``
function plus a lazily importing handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine import harness_commands, score_commands, security_commands, serve_commands
from masa_rt.cli_types import (
    float_range,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)
from masa_rt.layout_option import add_layout_file_option


def _export(args: argparse.Namespace) -> int:
    from engine.export import export_onnx

    out = export_onnx(args.checkpoint, args.out, opset=args.opset, atol=args.atol)
    print(f"wrote {out}")
    return 0


def _reference_build(args: argparse.Namespace) -> int:
    import torch

    from engine.reference import build_reference

    # Explicit, not torch's default of one thread per core: on the 2-core machine two
    # threads fought each other (and any other job) and a decoder build ran several times
    # slower than with one (issue 29: 50 of 4,800 steps in 347 s against ~0.4 s a step).
    torch.set_num_threads(args.threads)
    folder = Path(args.out).parent
    if not folder.is_dir():  # a typo in -o should not leave a tree of new folders behind
        raise ValueError(f"-o {args.out}: folder {folder} does not exist (create it first)")
    ref = build_reference(args.demos, args.checkpoint, args.out, name=args.name,
                          policy=args.policy, refine=args.refine,
                          decoder=decoder_options(args))
    how = (f", {ref.meta['policy']} of {len(args.demos)} demos (timeline: "
           f"{ref.meta['demo']})" if len(args.demos) > 1 else "")
    dec = ", phase decoder" if ref.decoder is not None else ""
    if ref.decoder is not None and ref.decoder.lookahead:
        dec += (f" with lookahead {ref.decoder.lookahead} (estimates describe the user "
                f"{ref.decoder.lookahead / ref.fps * 1000:.0f} ms ago)")
    print(f"wrote {args.out}: {ref.activity}, {len(ref)} frames, "
          f"{len(ref.phase_names)} phases, model {ref.model_fingerprint}{how}{dec}")
    check = ref.meta.get("leave_one_out")
    if check:
        worst = min(check["per_demo"], key=lambda d: d["phase_acc_pct"])
        print(f"leave-one-out on your {len(check['per_demo'])} demos: {check['phase_acc_pct']:.1f}"
              f" % of frames in the right phase, each streamed against a reference built "
              f"from the others (lowest: {worst['file']}, {worst['phase_acc_pct']:.1f} %)")
    else:
        print("one demo: record and label one or two more to get an estimate of live phase "
              "accuracy (leave-one-out) and a better reference")
    return 0


def _reference_ensemble(args: argparse.Namespace) -> int:
    from engine.reference import ensemble_references

    ref = ensemble_references(args.references, args.out)
    print(f"wrote {args.out}: {ref.activity}, {len(ref)} frames, an ensemble of "
          f"{ref.decoder.size} phase decoders")
    return 0


def _reference_propose(args: argparse.Namespace) -> int:
    from engine.propose import run_cli

    return run_cli(args)


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint's streaming step to ONNX")
    p.add_argument("--checkpoint", default=None, metavar="RUN_OR_PT",
                   help="checkpoint .pt (default: the shipped model)")
    p.add_argument("--out", required=True, help="output .onnx file")
    # Only 18: the exporter writes opset 18 whatever it is asked for (engine.export).
    p.add_argument("--opset", type=int, choices=(18,), default=18,
                   help="ONNX opset (only 18, the one the step is exported and checked at)")
    p.add_argument("--atol", type=positive_float, default=1e-4,
                   help="refuse the export if ONNX Runtime differs from torch by more")
    p.set_defaults(func=_export)


def _add_reference(subparsers) -> None:
    p = subparsers.add_parser("reference", help="build references from demonstrations")
    sub = p.add_subparsers(dest="reference_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="embed demo recordings into a reference .npz")
    b.add_argument("demos", nargs="+", metavar="DEMO.npz",
                   help="demo sequences of one activity")
    b.add_argument("--checkpoint", default=None, help="checkpoint .pt (default: shipped)")
    b.add_argument("-o", "--out", required=True, help="output reference .npz")
    b.add_argument("--name", default=None, help="reference name (default: file stem)")
    b.add_argument("--policy", choices=("medoid", "first"), default="medoid",
                   help="medoid (default): DTW-average all demos on the timeline of the "
                        "medoid demo; first: the first demo as it is, the others only "
                        "compared")
    b.add_argument("--refine", type=nonnegative_int, default=0, metavar="N",
                   help="medoid policy: re-align to the average and re-average N more "
                        "times (default 0)")
    b.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch threads for embedding and decoder training (default 1: "
                        "faster than one per core on a small shared machine)")
    add_decoder_options(b)
    add_layout_file_option(b)
    b.set_defaults(func=_reference_build)
    e = sub.add_parser("ensemble", help="combine the phase decoders of references of one "
                                        "demo built apart into one reference")
    e.add_argument("references", nargs="+", metavar="REF.npz",
                   help="references of one demo and model (two or more), each with a "
                        "phase decoder; the first gives everything but the decoder")
    e.add_argument("-o", "--out", required=True, help="output reference .npz")
    e.set_defaults(func=_reference_ensemble)
    _add_reference_propose(sub)


def _add_reference_propose(sub) -> None:
    p = sub.add_parser("propose", help="propose phase boundaries for unlabelled demos (a "
                                       "phases CSV to edit and pass to masa-rt label)")
    p.add_argument("demos", nargs="+", metavar="DEMO.npz",
                   help="recordings of one activity; several get the same phase count")
    p.add_argument("--phases", type=positive_int, default=None, metavar="K",
                   help="propose exactly K phases (default: chosen by a penalty per phase "
                        "on each demo; with several demos the median of their counts)")
    p.add_argument("-o", "--out", default=None, metavar="FILE_OR_FOLDER",
                   help="write the phases CSV (header frame,phase; names phase_1..phase_K): "
                        "a file for one demo, or an existing folder (one "
                        "<demo>.phases.csv each)")
    p.add_argument("--unit", choices=("frame", "time"), default="frame",
                   help="CSV column: the phase's first frame, or its time in seconds from "
                        "the first frame")
    p.add_argument("--signal", choices=("both", "learned", "raw"), default="both",
                   help="what is segmented: the velocity of the learned embedding and of "
                        "the keypoints together (default), or one of them; measured in "
                        "docs/results.md")
    p.add_argument("--penalty", type=positive_float, default=None, metavar="P",
                   help="cost of one more phase (default 12, chosen on Penn Action's "
                        "train split); lower proposes more phases")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint .pt (default: the shipped model for the demos' layout)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch threads (default 1)")
    p.set_defaults(func=_reference_propose)


def add_decoder_options(p: argparse.ArgumentParser) -> None:
    """How a reference's phase decoder is trained (``reference build``, ``harness``)."""
    p.add_argument("--decoder-steps", type=nonnegative_int, default=None, metavar="N",
                   help="train a phase decoder on the demos' labels for N steps (default: "
                        "no decoder, a reference in seconds; with any other --decoder-* "
                        "flag 4800, 20-40 min at 1 thread here). On one ordinary demo a "
                        "4800-step decoder scored lower than none (docs/results.md)")
    p.add_argument("--decoder-edit-prob", type=probability, default=None, metavar="P",
                   help="share of the decoder's training replays with a scripted skipped, "
                        "repeated or restarted phase (default 0.3)")
    p.add_argument("--decoder-hidden", type=positive_int, default=None, metavar="H",
                   help="width of the decoder's layers (default 128; 64 steps 2.5-4.5x "
                        "faster per frame for 1.1 points less, see docs/aligner.md)")
    p.add_argument("--decoder-lookahead", type=nonnegative_int, default=None, metavar="L",
                   help="frames of lookahead (default 0): the decoder names the phase of "
                        "the frame L before the newest, and every estimate then describes "
                        "the user L frames ago (3 at 30 fps: 100 ms) for fewer boundary "
                        "errors; see docs/aligner.md")
    p.add_argument("--decoder-retime", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the demo phase by phase as people perform it (a speed "
                        "per phase, eased pauses partway through some phases) instead of "
                        "the augmentation's speed warp (default on: about +2 points clean "
                        "where measured, docs/results.md, thirteenth round); "
                        "--no-decoder-retime for the warp")
    p.add_argument("--decoder-bone-jitter", type=float_range(0.0, 1.0, hi_open=True),
                   default=None, metavar="F",
                   help="scale each bone of the decoder's training replays by its own "
                        "factor in 1 +- F, as another person's hands (default 0: off)")
    p.add_argument("--decoder-finger-jitter", type=float_range(0.0, 1.0), default=None,
                   metavar="F",
                   help="offset each finger's curl at each phase key of the decoder's "
                        "training replays by N(0, F) of a full curl, as a person who grips "
                        "a little differently (h2o_hands models; default 0: off)")
    p.add_argument("--decoder-members", type=positive_int, default=None, metavar="M",
                   help="train M decoders (seeds S .. S+M-1) whose log-probabilities are "
                        "averaged (default 1); M times the build time and the decoder's "
                        "time per frame, for fewer wrong frames (docs/aligner.md)")
    p.add_argument("--decoder-seed", type=nonnegative_int, default=None, metavar="S",
                   help="seed of the (first) decoder's weights and replays (default 0); "
                        "builds with other seeds can be combined with `masa-rt reference "
                        "ensemble`")


def decoder_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``add_decoder_options`` flags as ``DecoderConfig`` fields (None: not given)."""
    return {"steps": args.decoder_steps, "edit_prob": args.decoder_edit_prob,
            "hidden": args.decoder_hidden, "lookahead": args.decoder_lookahead,
            "retime": args.decoder_retime, "bone_jitter": args.decoder_bone_jitter,
            "finger_jitter": args.decoder_finger_jitter,
            "members": args.decoder_members, "seed": args.decoder_seed}


def decoder_options(args: argparse.Namespace) -> dict[str, Any]:
    """How to train the phase decoder: no decoder unless a ``--decoder-*`` flag asks for
    one (then ``DecoderConfig``'s defaults fill the rest). Measured (docs/results.md
    section 0): a 4,800-step decoder trained on one ordinary performance took 37 min
    and put 13.6 points *fewer* frames in the right phase than its reference without one
    (77.3 -> 63.7 %, 39 synthetic pour_milk recordings), so the default is a reference
    in seconds."""
    flags = decoder_flags(args)
    if all(v is None for v in flags.values()):
        return {"steps": 0}
    return flags


def register(subparsers) -> None:
    """Add this package's subcommands to the masa-rt parser."""
    _add_export(subparsers)
    _add_reference(subparsers)
    serve_commands.register(subparsers)
    security_commands.register(subparsers)
    harness_commands.register(subparsers)
    score_commands.register(subparsers)

"""Core CLI commands: ``synth``, ``import-penn``, ``inspect``, ``label``.

Argument parsing lives here; each handler imports its module lazily so ``masa-rt --help``
stays fast.
"""

from __future__ import annotations

import argparse

from masa_rt.cli_types import float_range, nonnegative_int, positive_int
from masa_rt.layout_option import add_layout_file_option


def _synth(args: argparse.Namespace) -> int:
    from masa_rt.synth import run_cli

    return run_cli(args)


def _import_penn(args: argparse.Namespace) -> int:
    from masa_rt.penn import run_cli

    return run_cli(args)


def _inspect(args: argparse.Namespace) -> int:
    from masa_rt.inspect import run_cli

    return run_cli(args)


def _label(args: argparse.Namespace) -> int:
    from masa_rt.labels import run_cli

    return run_cli(args)


def _add_label(subparsers) -> None:
    p = subparsers.add_parser("label", help="phase labels for a recording from a CSV of "
                                            "phase starts (then: reference build)")
    p.add_argument("demo", metavar="DEMO.npz", help="a sequence file, e.g. from serve --record")
    p.add_argument("--phases", required=True, metavar="CSV",
                   help="header 'time,phase' (seconds from the first frame) or "
                        "'frame,phase' (frame index), then one row per phase start")
    p.add_argument("-o", "--out", default=None, metavar="OUT.npz",
                   help="output sequence (default: DEMO's stem + .labelled.npz beside it)")
    p.add_argument("--activity", default=None, help="activity name to store (default: keep "
                                                    "the recording's)")
    p.set_defaults(func=_label)


def register(subparsers) -> None:
    """Add the core subcommands to the masa-rt parser."""
    p = subparsers.add_parser(
        "synth", help="generate a synthetic multi-activity dataset with exact ground truth"
    )
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--activities", nargs="+", default=None,
                   help="activity names, or 'hands' / 'body' (default: all)")
    p.add_argument("--per-activity", type=positive_int, default=20,
                   help="sequences per activity")
    p.add_argument("--val-fraction", type=float_range(0.0, 1.0, hi_open=True), default=0.25,
                   help="share of each activity's sequences in the val split (0 <= F < 1)")
    p.add_argument("--features", type=nonnegative_int, default=0, metavar="F",
                   help="also emit an F-dim per-frame feature vector (stands in for RGB features)")
    p.add_argument("--examples", default=None, metavar="DIR",
                   help="folder for the clean canonical demonstrations (pour_milk.npz, ...) "
                        "(default: OUT/canonical_demos; '' to skip)")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser("import-penn", help="convert Penn Action .mat labels to a dataset")
    p.add_argument("labels_dir", help="folder with 0001.mat ... 2326.mat")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--events", action="store_true",
                   help="add rule-based key-event phase labels where the body's motion "
                        "decides them (docs/penn_events.md); counts in OUT/events.json")
    p.set_defaults(func=_import_penn)

    p = subparsers.add_parser("inspect", help="summarise a sequence file or dataset folder")
    p.add_argument("path", help="a .npz sequence or a dataset folder")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="draw a few skeleton frames and the phase timeline")
    add_layout_file_option(p)
    p.set_defaults(func=_inspect)

    _add_label(subparsers)

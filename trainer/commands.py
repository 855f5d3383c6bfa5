"""CLI commands contributed by trainer (see masa_rt.cli): ``train``.

Only argparse lives here; the handler imports torch and the trainer lazily, so
``masa-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse

from masa_rt.cli_types import float_range, nonnegative_int
from masa_rt.layout_option import add_layout_file_option
from trainer import eval_commands

TRAIN_EPILOG = """\
examples:
  masa-rt train --data data/synth/hands --out runs/hands --config configs/hands_causal.yaml
  masa-rt train --data data/penn --out runs/penn --config configs/penn.yaml --set train.epochs=20
  masa-rt train --data my_20_clips --out runs/mine --set train.steps=2000   # a step budget
  masa-rt train --data data/synth/hands --out runs/hands --resume
  torchrun --standalone --nproc_per_node=2 -m trainer.train --data D --out RUN
ablations (paper Table 4): --set model.use_self_attention=false | model.use_cross_attention=false
  | model.stop_gradient=false | augment.dual=false | augment.crop=off
  | model.use_cluster_predictor=false | model.tau=1
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` arguments, shared with ``python -m trainer.train`` (torchrun)."""
    parser.add_argument("--data", required=True, help="dataset folder (manifest.json)")
    parser.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    parser.add_argument("--config", default=None, help="YAML config (sections model, augment, "
                        "loss, train); with --resume, defaults to RUN/config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.tau=1 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue RUN/last.pt exactly where it stopped")
    parser.add_argument("--seed", type=nonnegative_int, default=None,
                        help="same as --set train.seed=S")
    parser.add_argument("--max-minutes", type=float_range(0.0), default=None,
                        help="time budget; stop cleanly with a checkpoint when it runs out")
    add_layout_file_option(parser)  # the checkpoint then carries the declaration


def _train(args: argparse.Namespace) -> int:
    from trainer.train import run_cli

    return run_cli(args)


def register(subparsers) -> None:
    """Add this package's subcommands to the masa-rt parser."""
    p = subparsers.add_parser(
        "train", help="train a MASA model without labels (paper defaults, DDP via torchrun)",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_train)
    eval_commands.register(subparsers)

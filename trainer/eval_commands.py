"""CLI command ``masa-rt eval`` (registered by ``trainer.commands``).

Only argparse lives here; the handler imports torch, sklearn and the evaluation lazily so
``masa-rt --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from masa_rt.cli_types import nonnegative_int, positive_int
from masa_rt.layout_option import add_layout_file_option
from masa_rt.preprocess import ROOT_MODES

__all__ = ["add_eval_arguments", "register", "run_cli"]

EVAL_EPILOG = """\
examples:
  masa-rt eval --data data/synth/hands                       # the shipped model
  masa-rt eval --checkpoint runs/hands --data data/synth/hands
  masa-rt eval --data data/synth/hands --baseline raw        # raw normalised keypoints
  masa-rt eval --checkpoint runs/hands --data data/synth/hands --baseline random
  masa-rt eval --data data/penn --baseline raw --max-videos 20 --no-tsne
outputs: REPORT_DIR/metrics.json, metrics.md, tsne.png, alignment.png
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="RUN_OR_PT",
                        help="run folder (its last.pt) or .pt file; default: the shipped "
                        "model. With --baseline random it sets the architecture")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.json)")
    parser.add_argument("--out", default=None, metavar="REPORT_DIR",
                        help="report folder (default: RUN/eval_<data> for a run folder, "
                        "else reports/eval_<embedder>_<data>)")
    parser.add_argument("--baseline", choices=("raw", "random", "clock"), default=None,
                        help="evaluate a baseline instead of the checkpoint")
    parser.add_argument("--root-mode", choices=ROOT_MODES, default=None,
                        help="with --baseline raw: centre each frame on its own root "
                             "(per_frame) or each clip on its first frame's (first_frame, "
                             "keeps where the body moves); default: the model's or per_frame")
    parser.add_argument("--stride", type=positive_int, default=2,
                        help="frame stride for tau and retrieval (CASA: 2)")
    parser.add_argument("--pool", choices=("concat", "mean"), default="concat",
                        help="how action recognition pools its 16 frames")
    parser.add_argument("--max-videos", type=positive_int, default=None, metavar="N",
                        help="first N videos per activity and split (faster, less precise)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the random encoder, KMeans and t-SNE")
    parser.add_argument("--no-tsne", dest="tsne", action="store_false",
                        help="skip the t-SNE picture (the slowest picture)")


def _make_embedder(args: argparse.Namespace):
    """The embedder the arguments name; baselines take the dataset's layout and fps."""
    from masa_rt.model import MasaConfig
    from masa_rt.preprocess import InputSpec
    from masa_rt.sequence import load_manifest
    from masa_rt.skeleton import get_layout
    from trainer import baselines

    if args.baseline is None:
        return baselines.ModelEmbedder(args.checkpoint)
    if args.baseline == "clock":
        return baselines.ClockEmbedder()
    manifest = load_manifest(args.data)
    if args.checkpoint is not None:  # compare like with like: the checkpoint's input and model
        model = baselines.ModelEmbedder(args.checkpoint)
        cfg, spec = model.cfg, model.spec
    else:
        layout = get_layout(manifest.layout)
        spec = InputSpec(manifest.layout, manifest.fps)
        cfg = MasaConfig(num_joints=layout.num_joints, joint_dims=layout.dims)
    if args.baseline == "raw":
        if args.root_mode is not None:  # which normalisation serves raw keypoints best
            spec = replace(spec, root_mode=args.root_mode)
        return baselines.RawKeypointsEmbedder(spec)
    return baselines.RandomEncoderEmbedder(cfg, spec, seed=args.seed)


def default_out(args: argparse.Namespace, embedder_name: str) -> Path:
    data = Path(args.data).resolve().name
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.is_dir() and args.baseline is None:
        return ckpt / f"eval_{data}"
    return Path("reports") / f"eval_{embedder_name}_{data}"


def run_cli(args: argparse.Namespace) -> int:
    """``masa-rt eval``: print the Markdown table and where the report went."""
    from trainer.evaluate import evaluate

    embedder = _make_embedder(args)
    out = Path(args.out) if args.out else default_out(args, embedder.name)
    evaluate(embedder, args.data, out, stride=args.stride, tsne=args.tsne,
             max_videos=args.max_videos, pool=args.pool, seed=args.seed)
    print((out / "metrics.md").read_text(encoding="utf-8"), end="")
    print(f"eval: report in {out}/ (metrics.json, metrics.md)")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the masa-rt parser (called from ``trainer.commands.register``)."""
    p = subparsers.add_parser(
        "eval", help="EVALUATION.md metrics of a checkpoint or a baseline on a dataset",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(p)
    add_layout_file_option(p)
    p.set_defaults(func=run_cli)

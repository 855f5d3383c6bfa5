"""Tune the online aligner's penalties and margins for a model (issue #5).

The aligner's defaults (``masa_rt.align.AlignerConfig``) are set for the shipped model's
embeddings; a new model spreads its cosines differently, so its best band, penalties and
relocaliser margin move. This runs coordinate descent over those fields on the harness's
streams, scored by mean phase accuracy over the chosen scenarios, and prints every trial
and the best config as JSON.

Tune on a seed the report does not use (the harness reports seed 0; the default here is
seed 1, whose val streams are disjoint from seed 0's), then check the result with
``masa-rt harness`` on seed 0: a config picked on the reported streams would flatter them.

    OMP_NUM_THREADS=1 python benchmarks/tune_aligner.py [--checkpoint RUN_OR_PT] [--seed 1]
        [--scenarios clean pause skip] [--per-activity 4] [--rounds 2] [--out best.json]
        [--references examples] [--start best.json]

``--start FILE`` starts from a config (an ``--out`` file's ``best``, or a plain
``AlignerConfig`` dict) instead of the defaults; with ``--rounds 0`` it scores that config
on other seeds. The report also gives activity identification (all references loaded in
one bank, as the harness scores it) for the defaults and the best config.

``--references DIR`` tunes against ``DIR/<activity>.npz`` (``examples``: the shipped
references, with their phase decoders) instead of the harness's decoder-free references
(each must be the activity's clean demo embedded by this model: checked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.export import resolve_checkpoint  # noqa: E402
from engine.harness import (  # noqa: E402
    SCENARIOS,
    load_references,
    run_harness,
    run_per_activity,
    run_with_activity,
    score,
)
from masa_rt.align import AlignerConfig  # noqa: E402
from masa_rt.atomic import atomic_write_json  # noqa: E402
from masa_rt.checkpoint import load_model  # noqa: E402
from masa_rt.synth import HAND_ACTIVITIES  # noqa: E402

# Values tried for each field, one field at a time, around the current best.
GRID: dict[str, list[Any]] = {
    "band": [8, 12, 16, 20, 24],
    "back": [0, 1, 2, 4],
    "max_step": [2, 3, 4, 5, 6],
    "stay_penalty": [0.0, 0.005, 0.01],
    "skip_penalty": [0.0, 0.005, 0.01, 0.02],
    "back_penalty": [0.0, 0.02, 0.05],
    "smoothing": [0.0, 0.3, 0.5],
    "relocalise_cost_margin": [0.04, 0.08, 0.15, 0.3],
    "relocalise_patience": [2, 4, 8],
    "relocalise_memory": [4.0, 8.0, 16.0],
    "decoder_weight": [0.02, 0.05, 0.1, 0.2],  # only tried when the references have decoders
    "decoder_phase_confidence": [0.3, 0.5, 0.7, 1.0],  # likewise
    "decoder_stickiness": [0.0, 0.2, 0.5, 0.8],  # likewise
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="run folder or .pt (default: shipped)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenarios", nargs="+", default=["clean", "pause", "skip"])
    ap.add_argument("--per-activity", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the best config here (JSON)")
    ap.add_argument("--references", default=None, metavar="DIR",
                    help="DIR/<activity>.npz instead of the harness's references (e.g. "
                         "examples: the shipped ones, with their phase decoders)")
    ap.add_argument("--start", default=None, metavar="JSON",
                    help="start from this config (an --out file, or AlignerConfig fields)")
    args = ap.parse_args(argv)

    model, _cfg, spec, _meta = load_model(resolve_checkpoint(args.checkpoint))
    given = (load_references(args.references, HAND_ACTIVITIES) if args.references
             else None)
    rep = run_harness(model, spec, scenarios=[SCENARIOS[s] for s in args.scenarios],
                      per_activity=args.per_activity, seed=args.seed, keep_streams=True,
                      references=given)
    streams, refs = rep["_streams"], rep["_refs"]["learned"]
    activities = rep["activities"]

    def evaluate(cfg: AlignerConfig) -> dict[str, list[float]]:
        out = {}
        for scen in args.scenarios:
            picked = [s for s in streams if s.scenario == scen]
            preds = run_per_activity(refs, picked, "learned", cfg)
            r = score(picked, preds, activities, spec.fps)
            out[scen] = [round(r["phase_acc_pct"], 2), round(r["progress_mae_pct"], 2)]
        return out

    def activity_id(cfg: AlignerConfig) -> dict[str, list[float]]:
        """Per scenario: % of frames (after the first second) and of last frames on the
        right activity, all references in one bank; then the phase-change delay (frames)
        of the per-activity run."""
        out = {}
        for scen in args.scenarios:
            picked = [s for s in streams if s.scenario == scen]
            r = score(picked, run_with_activity(refs, picked, "learned", cfg), activities,
                      spec.fps)
            out[scen] = [round(r["activity_frame_acc_pct"], 2),
                         round(r["activity_final_acc_pct"], 2), round(r["delay_frames"], 2)]
        return out

    def objective(res: dict[str, list[float]]) -> float:
        return float(np.mean([v[0] for v in res.values()]))

    start = time.perf_counter()
    defaults = AlignerConfig.for_references(list(refs.values()))  # what the engine uses
    best = _start_config(args.start) or defaults
    best_res = evaluate(best)
    print(json.dumps({"trial": "start" if args.start else "defaults", "result": best_res}),
          flush=True)
    for rnd in range(args.rounds):
        for field, values in GRID.items():
            if field.startswith("decoder_") and not any(r.decoder for r in refs.values()):
                continue  # every trial would score as the current best
            for value in values:
                if getattr(best, field) == value:
                    continue
                try:
                    cfg = replace(best, **{field: value})
                except ValueError:
                    continue  # a combination AlignerConfig refuses
                res = evaluate(cfg)
                print(json.dumps({"round": rnd, field: value, "result": res}), flush=True)
                if objective(res) > objective(best_res) + 0.1:  # not for noise
                    best, best_res = cfg, res
    report = {"seed": args.seed, "scenarios": args.scenarios, "result": best_res,
              "activity_id": activity_id(best),
              "activity_id_defaults": activity_id(defaults),
              "defaults": asdict(defaults), "best": asdict(best),
              "changed": {k: v for k, v in asdict(best).items()
                          if v != getattr(defaults, k)},
              "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    return 0


def _start_config(path: str | None) -> AlignerConfig | None:
    """The config to start from: ``path``'s (``best`` of an ``--out`` file, or a dict of
    ``AlignerConfig`` fields), None for the engine's defaults."""
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    return AlignerConfig(**data.get("best", data))


if __name__ == "__main__":
    raise SystemExit(main())

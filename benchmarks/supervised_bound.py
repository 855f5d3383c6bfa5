"""What a phase classifier trained *with labels* reaches on the harness's streams (issue #5).

MASA learns without labels and the engine aligns to one demonstration. This script asks
how far the same streams allow *any* causal observer to go: it trains a classifier on
labelled sequences of the generator (a seed namespace neither the training data nor the
val streams use: ``sequence_rng(777, activity, i)``, the same variation as the training
data), the activity given (the harness also aligns each stream to its own activity's
reference), and scores its per-frame phase on the harness's val streams exactly as
``masa-rt harness`` scores the aligner (``streaming_phase_accuracy``; a lost frame keeps
the previous frame's phase).

Classifiers (``--kinds``):

- ``gru``: causal, 2-layer GRU over the whole stream: it sees everything up to the frame,
  as an online engine does, with memory of every phase so far;
- ``encoder``: the served encoder's architecture (the shipped checkpoint's config:
  causal window, relative positions), trained from scratch with a linear phase head: what
  the model the engine runs could reach with labels;
- ``bigru``: bidirectional GRU, the whole stream at once: an *offline* reference, with
  hindsight, for the offline DTW row of the harness.

A label-free aligner to one demonstration should not be expected to beat these; if they
stay under an aim, the aim is set beyond what the streams carry.

    OMP_NUM_THREADS=1 python benchmarks/supervised_bound.py [--kinds gru encoder bigru]
        [--steps 1500] [--per-activity 200] [--seeds 0 1] [--scenarios clean]
        [--out bound.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.export import resolve_checkpoint  # noqa: E402
from engine.harness import SCENARIOS, embed_raw, make_references, make_streams  # noqa: E402
from masa_rt.atomic import atomic_write_json  # noqa: E402
from masa_rt.checkpoint import load_model  # noqa: E402
from masa_rt.metrics import streaming_phase_accuracy  # noqa: E402
from masa_rt.model import MasaConfig, MasaModel  # noqa: E402
from masa_rt.preprocess import InputSpec, frame_features  # noqa: E402
from masa_rt.synth import ACTIVITIES, HAND_ACTIVITIES, sequence_rng  # noqa: E402
from masa_rt.synth.generate import generate  # noqa: E402

LABELLED_SEED = 777  # sequence_rng namespace: not training data (0), not val (10_000 + seed)
KINDS = ("gru", "encoder", "bigru")


class GRUClassifier(nn.Module):
    """Per-frame MLP, then a 2-layer GRU (bidirectional for the offline reference)."""

    def __init__(self, d_in: int, n_classes: int, d: int = 128, bidirectional: bool = False):
        super().__init__()
        self.frame = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d))
        self.gru = nn.GRU(d, d, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(d * (2 if bidirectional else 1), n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Padding sits after each sequence's frames, so a causal GRU never reads it for a
        # real frame; the bidirectional one would, hence the packing.
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.frame(x), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=x.shape[1])
        return self.head(out)


class EncoderClassifier(nn.Module):
    """The served encoder (causal window, relative positions) with a linear phase head."""

    def __init__(self, cfg: MasaConfig, n_classes: int):
        super().__init__()
        self.encoder = MasaModel(cfg)
        self.head = nn.Linear(cfg.d_model, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(x, mask))


def labelled_pool(activities: list[str], spec: InputSpec, per_activity: int,
                  offsets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(model input (T, D), global class per frame (T,), activity index) per sequence."""
    pool = []
    for a, act in enumerate(activities):
        for i in range(per_activity):
            seq = generate(act, sequence_rng(LABELLED_SEED, act, i))
            pool.append((frame_features(seq.joints, spec),
                         np.asarray(seq.phases, dtype=np.int64) + offsets[a], a))
    return pool


def batch(pool, rows: np.ndarray, d_in: int, offsets: np.ndarray, n_classes: int):
    """Padded inputs, labels (-100 on padding), frame mask, and each row's class mask
    (only its own activity's phases compete, as the harness knows the activity)."""
    T = max(len(pool[i][0]) for i in rows)
    x = np.zeros((len(rows), T, d_in), np.float32)
    y = np.full((len(rows), T), -100, np.int64)
    mask = np.zeros((len(rows), T), bool)
    allowed = np.zeros((len(rows), n_classes), bool)
    for b, i in enumerate(rows):
        xi, yi, a = pool[i]
        x[b, :len(xi)], y[b, :len(yi)], mask[b, :len(xi)] = xi, yi, True
        allowed[b, offsets[a]:offsets[a + 1]] = True
    return (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask),
            torch.from_numpy(allowed))


def train(model: nn.Module, pool, steps: int, batch_size: int, d_in: int,
          offsets: np.ndarray, n_classes: int, log_every: int = 250) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x, y, mask, allowed = batch(pool, rng.integers(0, len(pool), batch_size), d_in,
                                    offsets, n_classes)
        logits = model(x, mask).masked_fill(~allowed[:, None, :], -1e4)
        loss = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return float(loss.item())


@torch.no_grad()
def phase_accuracy(model: nn.Module, streams, spec: InputSpec, activities: list[str],
                   offsets: np.ndarray) -> float:
    model.eval()
    true, pred = [], []
    for s in streams:
        a = activities.index(s.activity)
        x = torch.from_numpy(frame_features(s.joints, spec))[None]
        logits = model(x, torch.ones(x.shape[:2], dtype=torch.bool))[0]
        p = logits[:, offsets[a]:offsets[a + 1]].argmax(-1).numpy()
        for t in np.flatnonzero(s.lost):  # no pose: keep the last report, as the engine
            p[t] = p[t - 1] if t > 0 else 0
        true.append(s.phases)
        pred.append(p)
    return streaming_phase_accuracy(np.concatenate(true), np.concatenate(pred))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=["gru"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-activity", type=int, default=200, help="labelled sequences")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="val stream seeds")
    ap.add_argument("--scenarios", nargs="+", default=["clean"], choices=sorted(SCENARIOS))
    ap.add_argument("--streams-per-activity", type=int, default=4)
    ap.add_argument("--checkpoint", default=None, help="whose input spec and encoder config")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    _model, cfg, spec, meta = load_model(resolve_checkpoint(args.checkpoint))
    activities = list(HAND_ACTIVITIES)
    offsets = np.cumsum([0] + [len(ACTIVITIES[a].phases) for a in activities])
    n_classes = int(offsets[-1])
    pool = labelled_pool(activities, spec, args.per_activity, offsets)
    refs, canon = make_references(activities, spec, {"raw": embed_raw})
    streams = {(sc, seed): make_streams(activities, [SCENARIOS[sc]], args.streams_per_activity,
                                        seed, spec, canon, {"raw": embed_raw})
               for sc in args.scenarios for seed in args.seeds}
    report: dict = {"model_config_from": str(meta["path"]), "steps": args.steps,
                    "labelled_sequences": len(pool), "results": {}}
    for kind in args.kinds:
        model = (EncoderClassifier(cfg, n_classes) if kind == "encoder" else
                 GRUClassifier(spec.input_dim, n_classes, bidirectional=kind == "bigru"))
        print(f"{kind}: training {args.steps} steps", file=sys.stderr, flush=True)
        loss = train(model, pool, args.steps, args.batch_size, spec.input_dim, offsets,
                     n_classes)
        report["results"][kind] = {
            "final_loss": round(loss, 4),
            **{f"{sc}_seed{seed}": round(phase_accuracy(model, st, spec, activities, offsets), 1)
               for (sc, seed), st in streams.items()}}
        print(json.dumps({kind: report["results"][kind]}), file=sys.stderr, flush=True)
    report["run_time_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

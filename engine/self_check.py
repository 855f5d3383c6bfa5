"""How well will a reference do on the user's own takes? Leave-one-out over its demos.

A user who built a reference from K >= 2 labelled demos has, without knowing it, a small
test set: each demo, streamed against a reference built from the *other* K - 1 exactly as
``reference build`` builds one (same policy, no decoder, the phase filter's exemplars),
gives the share of its frames the live aligner puts in the right phase. Their mean is
printed by ``masa-rt reference build`` and kept in the reference's meta
(``leave_one_out``), so a weak reference (a demo labelled differently from the others,
phases too alike to tell apart) shows before it is served. It is an estimate from K - 1
demos, a little pessimistic against the K-demo reference (docs/results.md compares it with
``masa-rt score`` on held-out recordings). The embeddings are the model's causal ones, as
the server computes them frame by frame (docs/engine.md, "Why streamed = offline").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from masa_rt.align import Aligner, AlignerConfig

__all__ = ["leave_one_out"]


def leave_one_out(demos: Sequence[dict[str, Any]], phase_names: Sequence[str], *,
                  labels: Sequence[str], activity: str, fps: float, policy: str = "medoid",
                  refine: int = 0) -> dict[str, Any] | None:
    """Each of ``demos`` (``embed_demo`` dicts) streamed through a decoder-free
    :class:`Aligner` over a reference built from the others; None for fewer than 2.
    Returns ``phase_acc_pct`` (frames pooled over the demos), ``per_demo`` (file,
    frames, phase_acc_pct) and ``method``."""
    from engine.reference import reference_from_demos  # engine.reference imports this module

    if len(demos) < 2:
        return None
    per_demo, right, total = [], 0, 0
    for i, (demo, label) in enumerate(zip(demos, labels, strict=True)):
        others = [d for k, d in enumerate(demos) if k != i]
        ref = reference_from_demos(others, phase_names, activity=activity, name="loo",
                                   fps=fps, labels=[x for k, x in enumerate(labels) if k != i],
                                   policy=policy, refine=refine)
        aligner = Aligner(ref, AlignerConfig.for_references([ref]))
        said = np.array([e.phase_id for e in aligner.run(demo["embeddings"], demo["times"])])
        hits = int(np.sum(said == demo["phases"]))
        right, total = right + hits, total + len(said)
        per_demo.append({"file": str(label), "frames": len(said),
                         "phase_acc_pct": round(100.0 * hits / len(said), 1)})
    return {"phase_acc_pct": round(100.0 * right / total, 1), "per_demo": per_demo,
            "method": "each demo streamed against a reference built from the others "
                      "(same policy, no decoder), frames in the right phase"}

"""``engine.self_check.leave_one_out``: a reference's estimate of itself on its own demos."""

from __future__ import annotations

import numpy as np

from engine.self_check import leave_one_out

PHASES = ["reach", "pour", "place"]


def _demo(lengths: list[int], seed: int, labels: np.ndarray | None = None) -> dict:
    """Embeddings that say their phase (basis vector k, drifting slowly, plus noise)."""
    rng = np.random.default_rng(seed)
    phases = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    n = len(phases)
    emb = np.zeros((n, 8), np.float32)
    emb[np.arange(n), phases] = 1.0
    emb[:, 3 + phases % 3] += np.linspace(0, 0.3, n).astype(np.float32)  # within-phase drift
    emb += rng.normal(0, 0.05, emb.shape).astype(np.float32)
    return {"embeddings": emb, "phases": phases if labels is None else labels,
            "times": np.arange(n) / 30.0}


def _check(demos):
    return leave_one_out(demos, PHASES, labels=[f"d{i}" for i in range(len(demos))],
                         activity="pour", fps=30.0)


def test_consistent_demos_estimate_high_and_one_demo_none():
    demos = [_demo([20, 30, 25], 1), _demo([28, 22, 30], 2), _demo([15, 35, 20], 3)]
    check = _check(demos)
    assert check["phase_acc_pct"] > 90.0
    assert [d["file"] for d in check["per_demo"]] == ["d0", "d1", "d2"]
    assert [d["frames"] for d in check["per_demo"]] == [75, 80, 70]
    pooled = sum(d["phase_acc_pct"] * d["frames"] for d in check["per_demo"]) / 225
    assert abs(pooled - check["phase_acc_pct"]) < 0.1
    assert _check(demos[:1]) is None  # nothing to leave out


def test_a_demo_labelled_differently_shows_as_the_lowest():
    good = [_demo([20, 30, 25], 1), _demo([28, 22, 30], 2), _demo([15, 35, 20], 3)]
    bad = _demo([25, 25, 25], 4)
    bad["phases"] = np.roll(bad["phases"], 20)  # its labels 20 frames off its motion
    check = _check([*good, bad])
    lowest = min(check["per_demo"], key=lambda d: d["phase_acc_pct"])
    assert lowest["file"] == "d3" and lowest["phase_acc_pct"] < 80.0
    assert check["phase_acc_pct"] < _check(good)["phase_acc_pct"]

"""Boundary F1 (masa_rt.metrics): hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from masa_rt.metrics import (
    boundary_f1,
    boundary_f1_ci,
    boundary_f1_difference_ci,
    boundary_matches,
    label_boundaries,
)


def test_label_boundaries_are_where_the_label_changes():
    assert label_boundaries(np.array([0, 0, 1, 1, 0, 2])).tolist() == [2, 4, 5]
    assert label_boundaries(np.array([3, 3, 3])).tolist() == []
    assert label_boundaries(np.array([1])).tolist() == []


def test_matches_are_one_to_one_and_inclusive():
    assert boundary_matches([10, 20], [12, 13, 30], 3) == 1  # two near 10 count once
    assert boundary_matches([10], [13], 3) == 1 and boundary_matches([10], [14], 3) == 0
    assert boundary_matches([], [5], 3) == 0 and boundary_matches([5], [], 3) == 0


def test_matching_is_maximal_where_greedy_pairing_is_not():
    # Pairing 12 with its first nearest true boundary (14) would leave 16 unmatched.
    assert boundary_matches([10, 14], [12, 16], 2) == 2


def test_f1_pools_counts_over_recordings():
    f = boundary_f1([[10, 20]], [[12, 13, 30]], 3)
    assert (f["matched"], f["true"], f["predicted"]) == (1, 2, 3)
    assert f["precision"] == pytest.approx(1 / 3) and f["recall"] == pytest.approx(1 / 2)
    assert f["f1"] == pytest.approx(2 * 1 / (2 + 3))
    pooled = boundary_f1([[5], [1, 2, 3]], [[5], []], 3)  # micro: 1 of 4 true, 1 proposed
    assert pooled["f1"] == pytest.approx(2 / 5) and pooled["recall"] == pytest.approx(1 / 4)


def test_f1_edge_cases():
    assert boundary_f1([[]], [[]], 3)["f1"] == 1.0  # nothing to find, nothing proposed
    nothing = boundary_f1([[7]], [[]], 3)
    assert nothing["f1"] == 0.0 and math.isnan(nothing["precision"])
    assert boundary_f1([[7]], [[9]], 1)["f1"] == 0.0 and boundary_f1([[7]], [[9]], 2)["f1"] == 1
    with pytest.raises(ValueError, match="recordings"):
        boundary_f1([[1]], [[1], [2]], 3)


def test_intervals_resample_recordings():
    truth = [[10, 20], [5], [30, 40, 50], [8]]
    perfect = [np.array(t) for t in truth]
    assert boundary_f1_ci(truth, perfect, 3) == (1.0, 1.0)
    lo, hi = boundary_f1_ci(truth, [[10], [], [31, 45], [8, 20]], 3)
    point = boundary_f1(truth, [[10], [], [31, 45], [8, 20]], 3)["f1"]
    assert 0.0 <= lo <= point <= hi <= 1.0 and hi > lo
    assert boundary_f1_difference_ci(truth, perfect, perfect, 3) == (0.0, 0.0)
    lo, hi = boundary_f1_difference_ci(truth, perfect, [[], [], [], []], 3)
    assert lo == hi == 1.0  # better on every recording, whatever the draw
    assert all(math.isnan(v) for v in boundary_f1_ci([[1]], [[1]], 3))

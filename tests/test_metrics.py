"""Known-answer tests of masa_rt.metrics: each case has a result derivable by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from masa_rt import metrics


def _phase_video(lengths: list[int]) -> np.ndarray:
    """Labels 0, 0, ..., 1, 1, ... with the given number of frames per phase."""
    return np.concatenate([np.full(n, p) for p, n in enumerate(lengths)])


def _one_hot(labels: np.ndarray, num: int) -> np.ndarray:
    return np.eye(num)[labels]


@pytest.fixture
def phase_videos() -> list[np.ndarray]:
    return [_phase_video(lens) for lens in ([5, 7, 4], [6, 6, 6], [3, 9, 5], [8, 4, 6])]


def test_perfect_embeddings_classify_every_frame(phase_videos):
    embs = [_one_hot(y, 3) for y in phase_videos]
    acc = metrics.phase_classification(embs[:3], phase_videos[:3], embs[3:], phase_videos[3:])
    assert set(acc) == {0.1, 0.5, 1.0}
    assert all(v == pytest.approx(100.0) for v in acc.values())


def test_classification_uses_the_first_train_videos_in_order():
    # Video 0 has only phase 0: the 10% subset (1 video) cannot train -> NaN, not a crash.
    labels = [np.zeros(6, int), _phase_video([3, 3]), _phase_video([2, 4])]
    embs = [_one_hot(y, 2) for y in labels]
    acc = metrics.phase_classification(embs, labels, embs[1:], labels[1:], fractions=(0.1, 1.0))
    assert np.isnan(acc[0.1])
    assert acc[1.0] == pytest.approx(100.0)


def test_background_frames_are_dropped_and_labels_shifted():
    labels = [np.array([0, 0, 1, 1, 2, 2, 0]), np.array([1, 2, 2, 0, 1, 1, 2])]
    embs = [_one_hot(np.where(y > 0, y - 1, 0), 2) + (y == 0)[:, None] * 9 for y in labels]
    acc = metrics.phase_classification(embs, labels, embs, labels, fractions=(1.0,),
                                       background=0)
    assert acc[1.0] == pytest.approx(100.0)


def test_progress_targets_by_hand():
    t = metrics.progress_targets(np.array([0, 0, 1, 1, 1]), num_phases=3)
    # boundary 0: last frame of phase 0 is 1 -> (t - 1) / 5; phase 1 is the last boundary
    # column but present: last frame 4 -> (t - 4) / 5.
    np.testing.assert_allclose(t[:, 0], (np.arange(5) - 1) / 5)
    np.testing.assert_allclose(t[:, 1], (np.arange(5) - 4) / 5)
    missing_last = metrics.progress_targets(np.array([0, 0, 0, 2]), num_phases=3)
    np.testing.assert_allclose(missing_last[:, 1], (np.arange(4) - 4) / 4)
    missing_middle = metrics.progress_targets(np.array([0, 0, 2, 3]), num_phases=4)
    np.testing.assert_allclose(missing_middle[:, 1], missing_middle[:, 0])


def test_linear_progress_embeddings_give_r2_one(phase_videos):
    embs = [metrics.progress_targets(y, 3) for y in phase_videos]
    r2 = metrics.phase_progress_r2(embs[:3], phase_videos[:3], embs[3:], phase_videos[3:],
                                   num_phases=3)
    assert r2 == pytest.approx(1.0, abs=1e-9)


def test_identical_videos_give_tau_one_and_reversed_minus_one():
    # Odd length: with stride 2 the reversed clip's [::2] frames are the same frames.
    video = np.random.default_rng(0).normal(size=(31, 4))
    assert metrics.kendalls_tau([video, video], ["a", "a"]) == pytest.approx(1.0)
    assert metrics.reversed_clip_tau([video, video], [video[::-1], video[::-1]],
                                     ["a", "a"]) == pytest.approx(-1.0)


def test_tau_pairs_only_within_an_activity():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    taus = metrics.pair_taus([a, a, b], [a, a, b], ["x", "x", "y"], stride=1)
    assert list(taus) == ["x"] and len(taus["x"]) == 2  # (0, 1) and (1, 0)
    assert np.isnan(metrics.kendalls_tau([a, b], ["x", "y"]))


def test_clock_scores_tau_one_and_is_fooled_by_reversal_and_crops():
    clocks = metrics.clock_embeddings([40, 40])
    np.testing.assert_allclose(clocks[0][:3, 0], [0, 1 / 40, 2 / 40])
    assert metrics.kendalls_tau(clocks, ["a", "a"]) == pytest.approx(1.0)
    assert metrics.reversed_clip_tau(clocks, clocks, ["a", "a"]) == pytest.approx(1.0)
    # A pose-like embedding (unique per frame) finds cropped frames exactly.
    video = np.random.default_rng(2).normal(size=(40, 5))
    start = metrics.crop_start(40)
    assert start == 10
    assert metrics.crop_error([video], [video[start:]]) == 0.0
    # Clock of the cropped clip restarts at 0: frame k (value k/30) matches full frame
    # round(k * 40 / 30) instead of 10 + k.
    cropped = metrics.clock_embeddings([30])
    expected = np.abs(np.round(np.arange(30) * 40 / 30) - (10 + np.arange(30))).mean() / 40
    assert metrics.crop_error(clocks[:1], cropped) == pytest.approx(expected, abs=0.01)


def test_frame_retrieval_ap_hand_made_case():
    # 1-d embeddings, one activity, three videos, stride 1.
    embs = [np.array([[0.0], [10.0]]), np.array([[0.1], [9.0]]), np.array([[0.25], [10.5]])]
    labels = [np.array([0, 1]), np.array([0, 0]), np.array([1, 1])]
    ap = metrics.frame_retrieval_ap(embs, labels, ["a"] * 3, ks=(1, 2), stride=1)
    # K=1, nearest candidate label of each query:
    #  v0: 0.0 -> 0.1 (0) hit; 10.0 -> 10.5 (1) hit             -> 1.0
    #  v1: 0.1 -> 0.0 (0) hit; 9.0 -> 10.0 (1) miss             -> 0.5
    #  v2: 0.25 -> 0.1 (0) miss; 10.5 -> 10.0 (1) hit            -> 0.5
    assert ap[1] == pytest.approx(100 * (1.0 + 0.5 + 0.5) / 3)
    # K=2:
    #  v0: 0.0 -> {0.1 (0), 0.25 (1)} 1/2; 10.0 -> {10.5 (1), 9.0 (0)} 1/2     -> 0.5
    #  v1: 0.1 -> {0.0 (0), 0.25 (1)} 1/2; 9.0 -> {10.0 (1), 10.5 (1)} 0/2     -> 0.25
    #  v2: 0.25 -> {0.1 (0), 0.0 (0)} 0/2; 10.5 -> {10.0 (1), 9.0 (0)} 1/2     -> 0.25
    assert ap[2] == pytest.approx(100 * (0.5 + 0.25 + 0.25) / 3)


def test_action_recognition_and_activity_separation_on_separated_clusters():
    rng = np.random.default_rng(3)
    centres = {"a": 0.0, "b": 20.0, "c": -20.0}
    acts = [a for a in centres for _ in range(4)]
    embs = [centres[a] + rng.normal(size=(int(rng.integers(10, 30)), 3)) for a in acts]
    sep = metrics.activity_separation(embs, acts)
    assert sep == {"nmi": pytest.approx(1.0), "purity": pytest.approx(1.0)}
    for pool in ("concat", "mean"):
        assert metrics.action_recognition(embs, acts, embs, acts, pool=pool) == 100.0


def test_sample_uniform_takes_both_ends():
    emb = np.arange(31)[:, None]
    np.testing.assert_array_equal(metrics.sample_uniform(emb, 4)[:, 0], [0, 10, 20, 30])
    assert metrics.sample_uniform(np.arange(3)[:, None], 16).shape == (16, 1)


def test_phase_change_delay_hand_made_case():
    true = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 3, 3])
    # change to 1 at frame 2, reported at 3 -> 1; to 2 at 5, never reported -> NaN;
    # to 3 at 8, reported at 8 -> 0.
    np.testing.assert_array_equal(metrics.phase_change_delay(true, pred), [1.0, np.nan, 0.0])
    # frames 2, 5, 6 and 7 are wrong
    assert metrics.streaming_phase_accuracy(true, pred) == pytest.approx(60.0)


def test_phase_accuracy_interval_resamples_streams_not_frames():
    # Two streams right throughout, two wrong throughout: pooled 50 %. Resampling whole
    # streams spreads the estimate over 0 .. 100; resampling frames would pin it near 50.
    true = [np.zeros(100, int)] * 4
    pred = [np.zeros(100, int), np.zeros(100, int), np.ones(100, int), np.ones(100, int)]
    lo, hi = metrics.streaming_phase_accuracy_ci(true, pred)
    assert lo <= 0.0 + 1e-9 and hi >= 100.0 - 1e-9
    assert metrics.streaming_phase_accuracy_ci(true, pred) == (lo, hi)  # deterministic
    # Many streams alike: a narrow interval around the pooled accuracy, unequal lengths
    # weighted by their frames as the pooled accuracy is.
    rng = np.random.default_rng(0)
    true = [rng.integers(0, 4, n) for n in rng.integers(150, 300, 200)]
    pred = [np.where(rng.random(len(t)) < 0.9, t, -1) for t in true]
    acc = metrics.streaming_phase_accuracy(np.concatenate(true), np.concatenate(pred))
    lo, hi = metrics.streaming_phase_accuracy_ci(true, pred)
    assert lo < acc < hi and hi - lo < 1.0
    assert all(map(math.isnan, metrics.streaming_phase_accuracy_ci(true[:1], pred[:1])))
    with pytest.raises(ValueError, match="2 true and 1 predicted"):
        metrics.streaming_phase_accuracy_ci(true[:2], pred[:1])


def test_progress_mae_ignores_frames_without_a_report():
    assert metrics.progress_mae([0.0, 0.5, 1.0], [0.1, np.nan, 0.7]) == pytest.approx(0.2)

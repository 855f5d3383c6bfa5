"""The aligner's phase filter (masa_rt/align/phase_filter.py): its equations, its state
across the bank's slot moves, and the references that carry its exemplars."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from test_align import make_reference, render, warp

from masa_rt.align import Aligner, AlignerBank, AlignerConfig, Reference
from masa_rt.align.phase_filter import (
    NEG,
    PhaseFilter,
    PhaseModel,
    _logmatvec,
    _transitions,
    move_into_phase,
)
from masa_rt.align.reference import motion_directions

ON = AlignerConfig.for_references(make_reference(0))  # decoder-free defaults: filter on


def test_transition_rows_are_distributions_over_the_references_phases():
    ref = make_reference(0)
    log_a = _transitions(ref, 7, advance=3.0, back=1e-3, skip=1e-3, jump=1e-4)
    a = np.exp(log_a)
    n = len(ref.phase_names)
    np.testing.assert_allclose(a[:n, :n].sum(axis=1), 1.0, atol=1e-12)
    assert (log_a[:, n:] <= NEG / 2).all()  # padding phases are never entered
    lengths = np.bincount(ref.phases)
    # leaving a phase of mean length d: advance / d (plus the small skip/jump mass)
    assert a[0, 1] == pytest.approx(3.0 / lengths[0], rel=0.05)
    assert a[n - 1, n - 1] > 0.99  # the last phase is kept


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 3, 40]), st.integers(1, 3), st.integers(2, 5),
       st.integers(0, 2**31))
def test_logmatvec_is_logsumexp_over_the_previous_phase(b, r, p, seed):
    rng = np.random.default_rng(seed)
    alpha, log_a = 8 * rng.normal(size=(b, r, p)), rng.normal(size=(r, p, p))
    alpha -= alpha.max(axis=2, keepdims=True)  # normalised, as the filter keeps it
    alpha[:, :, -1] = NEG  # a padding phase: never the previous one
    log_a[:, :, 0] = NEG  # and one never entered: NEG out, not -inf
    want = logsumexp(alpha[:, :, :, None] + log_a[None], axis=2)
    got = _logmatvec(alpha, np.exp(log_a))
    np.testing.assert_allclose(got[:, :, 1:], want[:, :, 1:], atol=1e-10)
    assert (got[:, :, 0] == NEG).all()


def test_emission_is_the_best_cosine_of_each_phase_over_tau():
    ref = make_reference(1)
    model = PhaseModel([ref], tau=0.02, advance=3.0, back=0.0, skip=0.0, jump=0.0)
    q = ref.embeddings[[5, 100]]
    sims = q @ ref.embeddings.T
    want = np.stack([[sims[i, ref.phases == k].max() for k in range(5)] for i in range(2)])
    np.testing.assert_allclose(model.emission(q)[:, 0, :], want / 0.02, rtol=1e-5)


def test_the_filter_follows_a_performance_through_its_phases():
    ref = make_reference(2)
    truth = warp(ref, np.random.default_rng(3))
    q = render(ref, truth, seed=4)
    model = PhaseModel([ref], 0.02, 3.0, 1e-3, 1e-3, 1e-4)
    filt = PhaseFilter(model, capacity=1, start_prior=3.0)
    said = np.array([filt.step(np.array([0]), q[i:i + 1], np.array([True]))[0, 0]
                     for i in range(len(q))])
    true_phase = ref.phases[np.rint(truth).astype(int)]
    assert (said == true_phase).mean() > 0.9
    assert (np.diff(said) >= 0).mean() > 0.97  # it does not flicker back and forth


def test_move_into_phase_clips_to_the_phase_and_leaves_unknown_ones():
    report = np.array([3.0, 50.0, 20.0, 7.0])
    out = move_into_phase(report, np.array([1, 1, 0, 2]), np.array([10, 10, 0, -1]),
                          np.array([19, 19, 9, -1]))
    np.testing.assert_array_equal(out, [10.0, 19.0, 9.0, 7.0])


def test_the_aligner_with_the_filter_tracks_warped_performances():
    """On performances at 0.5-2x the demo's speed per phase the reported phase stays
    right (whether the filter helps is measured on real data, docs/results.md; on these
    smooth-noise embeddings the tracker alone is already near its best)."""
    ref = make_reference(5)
    right = {True: 0, False: 0}
    total = 0
    for seed in range(4):
        truth = warp(ref, np.random.default_rng(seed + 10))
        q = render(ref, truth, seed=seed + 20)
        true_phase = ref.phases[np.rint(truth).astype(int)]
        total += len(q)
        for on in (True, False):
            est = Aligner(ref, replace(ON, phase_filter=on)).run(q)
            right[on] += sum(e.phase_id == p for e, p in zip(est, true_phase, strict=True))
    assert right[True] / total > 0.85 and right[True] >= right[False] - 0.03 * total


def test_bank_and_aligner_agree_with_the_filter_through_slot_moves():
    """Sessions removed from the middle of a bank move slots; each filter moves too."""
    ref = make_reference(6)
    streams = {f"s{k}": render(ref, warp(ref, np.random.default_rng(k)), seed=k)
               for k in range(4)}
    bank = AlignerBank(ref, ON, capacity=1)
    alone = {sid: Aligner(ref, ON) for sid in streams}
    n = min(len(q) for q in streams.values())
    for i in range(n):
        if i == n // 2:
            bank.remove("s1")  # s3 moves into s1's slot
            del alone["s1"]
        ids = list(alone)
        got = bank.step_many(ids, np.stack([streams[s][i] for s in ids]), [i / 30.0] * len(ids))
        for sid, est in zip(ids, got, strict=True):
            want = alone[sid].step(streams[sid][i], i / 30.0)
            assert (est.phase_id, round(est.ref_index, 4)) == (want.phase_id,
                                                               round(want.ref_index, 4))


def test_no_filter_with_a_decoder_or_when_turned_off():
    from masa_rt.align.phase_filter import phase_model_for

    ref = make_reference(7)
    assert phase_model_for([ref], ON, has_decoders=True) is None  # a decoder places phases
    assert phase_model_for([ref], replace(ON, phase_filter=False), False) is None
    assert Aligner(ref, replace(ON, phase_filter=False))._filter is None
    assert Aligner(ref, ON)._filter is not None


def test_exemplars_round_trip_and_bad_shapes_are_refused(tmp_path):
    ref = make_reference(8)
    extra = replace(ref, exemplar_embeddings=np.concatenate([ref.embeddings] * 2),
                    exemplar_phases=np.concatenate([ref.phases] * 2),
                    exemplar_starts=np.array([0, len(ref)]),
                    phase_frames=np.bincount(ref.phases).astype(float) * 1.5)
    extra.save(tmp_path / "r.npz")
    back = Reference.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.exemplars()[1], extra.exemplar_phases)
    np.testing.assert_array_equal(back.exemplar_starts, [0, len(ref)])
    # each demo's motion read within it: the second copy's start has none of the first's end
    np.testing.assert_array_equal(back.exemplar_motion(3)[len(ref)], 0.0)
    for bad in ([1, 5], [0, 0], [0, 2 * len(ref)]):
        with pytest.raises(ValueError, match="exemplar_starts"):
            replace(extra, exemplar_starts=np.array(bad))
    np.testing.assert_allclose(back.phase_lengths(), extra.phase_frames)
    with pytest.raises(ValueError, match="both or neither"):
        replace(ref, exemplar_embeddings=ref.embeddings)
    with pytest.raises(ValueError, match="exemplar_embeddings"):
        replace(ref, exemplar_embeddings=ref.embeddings[:, :3], exemplar_phases=ref.phases)
    with pytest.raises(ValueError, match="phase_frames"):
        replace(ref, phase_frames=np.ones(2))
    assert ref.exemplars()[0] is ref.embeddings  # one demo: its own frames


def _naive_motion(emb, starts, lag):
    out = np.zeros_like(emb)
    bounds = [*starts, len(emb)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(a, b):
            d = emb[i] - emb[max(i - lag, a)]
            n = np.linalg.norm(d)
            out[i] = d / n if n > 1e-6 else 0.0
    return out


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(1, 4),
       st.integers(0, 2**31))
def test_motion_directions_stay_within_each_sequence(sizes, lag, seed):
    emb = np.random.default_rng(seed).normal(size=(sum(sizes), 5)).astype(np.float32)
    starts = np.cumsum([0, *sizes[:-1]])
    np.testing.assert_allclose(motion_directions(emb, starts, lag),
                               _naive_motion(emb, starts, lag), atol=1e-6)


def test_the_live_motion_is_the_demos_motion():
    """The filter reads a stream's motion as ``motion_directions`` reads a demo's, lost
    frames left out."""
    ref = make_reference(9)
    model = PhaseModel([ref], 0.02, 3.0, 1e-3, 1e-3, 1e-4, motion=0.5, lag=3)
    filt = PhaseFilter(model, capacity=2, start_prior=3.0)
    q = render(ref, warp(ref, np.random.default_rng(1)), seed=2)[:40]
    ok = np.random.default_rng(3).random(len(q)) > 0.2
    got = [filt._motion(np.array([1]), q[i:i + 1])[0] for i in range(len(q)) if ok[i]]
    np.testing.assert_allclose(np.stack(got), motion_directions(q[ok], np.array([0]), 3),
                               atol=1e-6)


def test_motion_tells_the_way_down_from_the_way_up():
    """Two phases through the same poses in opposite directions (a squat's descent and
    ascent): the motion term places the phase where poses alone cannot."""
    def path(s):  # unit vectors along a quarter circle in the first two dimensions
        e = np.zeros((len(s), 8), np.float32)
        e[:, 0], e[:, 1] = np.cos(s), np.sin(s)
        return e

    down, up = np.linspace(0, np.pi / 2, 30), np.linspace(np.pi / 2, 0, 30)
    ref = Reference(name="squat", activity="squat", embeddings=path(np.r_[down, up]),
                    phases=np.repeat([0, 1], 30), phase_names=["down", "up"],
                    times=np.arange(60) / 30.0, fps=30.0)
    rng = np.random.default_rng(4)
    truth = np.repeat([0, 1], [22, 45])  # faster down, slower up than the demo
    q = path(np.r_[np.linspace(0, np.pi / 2, 22), np.linspace(np.pi / 2, 0, 45)])
    q += rng.normal(0, 0.01, q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    right = {}
    for motion in (0.0, 0.25):
        model = PhaseModel([ref], 0.02, 3.0, 1e-3, 1e-3, 1e-4, motion=motion, lag=3)
        filt = PhaseFilter(model, capacity=1, start_prior=3.0)
        said = [filt.step(np.array([0]), q[i:i + 1], np.array([True]))[0, 0]
                for i in range(len(q))]
        right[motion] = float(np.mean(np.array(said) == truth))
    assert right[0.25] > 0.9 and right[0.25] > right[0.0] + 0.1

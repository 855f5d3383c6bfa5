"""Golden tests of the online aligner on synthetic embeddings with known ground truth.

A reference is a smooth random curve on the unit sphere (64-d) cut into 5 phases. A query
replays it at per-phase speeds (0.5-2x) through ``truth`` = the reference frame at each
query frame, with a per-subject "style" offset (a smooth field over the reference, so a
held pose gives a held embedding) plus small per-frame jitter: cos(query, truth) ~ 0.95.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter1d

from masa_rt.align import (
    STATES,
    Aligner,
    AlignerBank,
    AlignerConfig,
    Estimate,
    EstimateBatch,
    Reference,
    ReferenceFormatError,
    offline_dtw,
    online_dtw_index,
    path_to_index,
    subsequence_dtw,
)

DIM = 64
LENGTHS = (30, 50, 40, 45, 35)  # 200 frames


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """(n, DIM) Gaussian-filtered white noise with unit standard deviation."""
    margin = int(4 * sigma)
    x = gaussian_filter1d(rng.standard_normal((n + 2 * margin, DIM)), sigma, axis=0)
    x = x[margin:margin + n]
    return x / x.std()


def make_reference(seed: int, activity: str = "act") -> Reference:
    rng = np.random.default_rng(seed)
    n = sum(LENGTHS)
    return Reference(
        name=f"{activity}_demo", activity=activity,
        embeddings=_unit(_smooth_noise(rng, n, 6.0)),
        phases=np.repeat(np.arange(len(LENGTHS)), LENGTHS),
        phase_names=[f"{activity}_p{i}" for i in range(len(LENGTHS))],
        times=np.arange(n) / 30.0, fps=30.0, model_fingerprint="synthetic",
    )


def warp(ref: Reference, rng: np.random.Generator, start: float = 0.0,
         stop: float | None = None) -> np.ndarray:
    """True reference index per query frame, at a random speed in [0.5, 2] per phase."""
    speeds = rng.uniform(0.5, 2.0, len(ref.phase_names))
    stop = len(ref) - 1 if stop is None else stop
    idx, x = [], start
    while x <= stop:
        idx.append(x)
        x += speeds[ref.phases[int(round(x))]]
    return np.array(idx)


def render(ref: Reference, truth: np.ndarray, seed: int) -> np.ndarray:
    """Query embeddings at fractional reference indices ``truth``."""
    rng = np.random.default_rng(seed)
    base = ref.embeddings + 0.04 * _smooth_noise(rng, len(ref), 4.0)  # the subject's style
    i0 = np.clip(np.floor(truth).astype(int), 0, len(ref) - 1)
    i1 = np.minimum(i0 + 1, len(ref) - 1)
    w = (truth - i0)[:, None]
    q = (1 - w) * base[i0] + w * base[i1]
    return _unit(q + 0.004 * rng.standard_normal(q.shape)).astype(np.float32)


def indices(est: list[Estimate]) -> np.ndarray:
    return np.array([e.ref_index for e in est])


def states(est: list[Estimate]) -> list[str]:
    return [e.state for e in est]


@pytest.fixture(scope="module")
def ref() -> Reference:
    return make_reference(0)


# -- Reference ------------------------------------------------------------------------------

def test_reference_normalises_and_derives(ref: Reference) -> None:
    assert np.allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, atol=1e-5)
    assert ref.phase_bounds.tolist() == [[0, 29], [30, 79], [80, 119], [120, 164], [165, 199]]
    assert ref.phase_progress[30] == 0.0 and ref.phase_progress[79] == 1.0
    assert ref.phase_progress[55] == pytest.approx(25 / 49)
    assert ref.progress[0] == 0.0 and ref.progress[-1] == 1.0


def test_reference_rejects_inconsistent_shapes(ref: Reference) -> None:
    with pytest.raises(ReferenceFormatError, match="phases"):
        Reference("x", "a", ref.embeddings, ref.phases[:-1], ref.phase_names, ref.times, 30.0)
    with pytest.raises(ReferenceFormatError, match="phases"):
        Reference("x", "a", ref.embeddings, ref.phases + 5, ref.phase_names, ref.times, 30.0)


def test_reference_save_load_round_trip(tmp_path) -> None:
    ref = make_reference(0)
    ref.meta = {"subject": "s1", "model": {"d": DIM}}
    path = tmp_path / "ref.npz"
    ref.save(path)
    back = Reference.load(path)
    assert (back.name, back.activity, back.fps) == (ref.name, ref.activity, ref.fps)
    assert back.phase_names == ref.phase_names
    assert back.model_fingerprint == "synthetic" and back.meta == ref.meta
    np.testing.assert_array_equal(back.embeddings, ref.embeddings)
    np.testing.assert_array_equal(back.phases, ref.phases)
    np.testing.assert_array_equal(back.times, ref.times)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temp file left behind


def test_reference_load_errors_are_one_line(ref: Reference, tmp_path) -> None:
    fields = {"format_version": 1, "name": "x", "activity": "a", "embeddings": ref.embeddings,
              "phases": ref.phases[:-3], "phase_names": np.array(ref.phase_names),
              "times": ref.times, "fps": 30.0, "model_fingerprint": "", "meta": "{}"}
    np.savez(tmp_path / "short.npz", **fields)
    del fields["times"]
    np.savez(tmp_path / "missing.npz", **fields)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    for name, pattern in [("short", "phases: expected shape"), ("missing", "missing fields times"),
                          ("junk", "not a readable reference")]:
        with pytest.raises(ReferenceFormatError, match=pattern) as info:
            Reference.load(tmp_path / f"{name}.npz")
        assert "\n" not in str(info.value) and name in str(info.value)


# -- Tracking -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_tracks_time_warped_query(ref: Reference, seed: int) -> None:
    truth = warp(ref, np.random.default_rng(seed))
    est = Aligner(ref).run(render(ref, truth, seed))
    phase = np.array([e.phase_id for e in est])
    accuracy = np.mean(phase == ref.phases[np.rint(truth).astype(int)])
    progress_mae = np.mean(np.abs(np.array([e.progress for e in est]) - truth / (len(ref) - 1)))
    assert accuracy >= 0.95
    assert progress_mae <= 0.03
    assert states(est)[-1] == "finished"
    assert "paused" not in states(est)[:-5] and "off_script" not in states(est)
    assert np.median([e.confidence for e in est]) > 0.7


def test_estimate_fields_and_waiting_state(ref: Reference) -> None:
    aligner = Aligner(ref)
    assert aligner.last.state == "waiting" and aligner.last.phase_id == -1
    assert aligner.step(None, 0.0).state == "waiting"  # nothing seen yet: not "lost"
    est = aligner.step(ref.embeddings[0], 0.033)
    d = est.to_dict()
    assert d["state"] == "tracking" and d["activity"] == "act" and d["phase_name"] == "act_p0"
    assert 0.0 <= d["confidence"] <= 1.0 and d["t"] == pytest.approx(0.033)
    json.dumps(d)  # plain python types only
    aligner.reset()
    assert aligner.last.state == "waiting"


def test_pause_holds_position(ref: Reference) -> None:
    rng = np.random.default_rng(5)
    before = warp(ref, rng, stop=95.0)
    truth = np.concatenate([before, np.full(45, before[-1]), warp(ref, rng, start=before[-1])])
    est = Aligner(ref).run(render(ref, truth, 5))
    pause = slice(len(before), len(before) + 45)
    cfg = AlignerConfig()
    during = states(est)[pause][2 * cfg.pause_lag + cfg.pause_frames:]  # detection latency
    assert during == ["paused"] * len(during)
    held = indices(est)[pause]
    assert np.abs(held - before[-1]).max() <= 3.0  # no drift while still
    assert states(est)[len(before) + 60] == "tracking"
    assert states(est)[-1] == "finished"


def test_slow_user_is_not_paused(ref: Reference) -> None:
    truth = np.arange(0.0, len(ref) - 1, 0.35)  # a third of the reference's speed
    est = Aligner(ref).run(render(ref, truth, 17))
    assert "paused" not in states(est)
    assert np.abs(indices(est) - truth).mean() < 2.0


def _recovery_frames(est: list[Estimate], truth: np.ndarray, event: int, tol: float) -> int:
    """Frames after ``event`` until the estimate is within ``tol`` of the truth for good."""
    err = np.abs(indices(est)[event:] - truth[event:]) > tol
    bad = np.flatnonzero(err)
    return 0 if bad.size == 0 else int(bad[-1]) + 1


def test_restart_relocalises(ref: Reference) -> None:
    rng = np.random.default_rng(6)
    first = warp(ref, rng, stop=130.0)
    truth = np.concatenate([first, warp(ref, rng)])
    est = Aligner(ref).run(render(ref, truth, 6))
    assert _recovery_frames(est, truth, len(first), tol=4.0) <= 12


def test_start_midway_relocalises(ref: Reference) -> None:
    truth = warp(ref, np.random.default_rng(18), start=100.0)
    est = Aligner(ref).run(render(ref, truth, 18))
    assert _recovery_frames(est, truth, 0, tol=4.0) <= 12


def test_skipped_phase_relocalises(ref: Reference) -> None:
    rng = np.random.default_rng(7)
    first = warp(ref, rng, stop=79.0)  # phases 0 and 1, then phase 2 (80-119) is skipped
    truth = np.concatenate([first, warp(ref, rng, start=120.0)])
    est = Aligner(ref).run(render(ref, truth, 7))
    assert _recovery_frames(est, truth, len(first), tol=4.0) <= 12
    phase = np.array([e.phase_id for e in est])
    assert 2 not in phase[len(first) + 12:]


def test_repeated_phase_follows_back(ref: Reference) -> None:
    rng = np.random.default_rng(8)
    first = warp(ref, rng, stop=119.0)  # phases 0-2, then phase 1 again (from 30)
    truth = np.concatenate([first, warp(ref, rng, start=30.0)])
    est = Aligner(ref).run(render(ref, truth, 8))
    assert _recovery_frames(est, truth, len(first), tol=4.0) <= 12


def test_lost_tracking_holds_and_recovers(ref: Reference) -> None:
    truth = warp(ref, np.random.default_rng(9))
    q = render(ref, truth, 9)
    q[40:50] = np.nan  # the pose estimator lost the hands
    valid = np.ones(len(q), dtype=bool)
    valid[70:75] = False  # or the engine says so explicitly
    est = Aligner(ref).run(q, valid=valid)
    for lost in (slice(40, 50), slice(70, 75)):
        assert set(states(est)[lost]) == {"tracking_lost"}
        assert np.ptp(indices(est)[lost]) == 0.0  # position held
        assert all(e.confidence == 0.0 for e in est[lost])
    assert states(est)[55] == "tracking"
    assert np.abs(indices(est)[80:] - truth[80:]).mean() < 3.0


def test_unrelated_motion_is_off_script(ref: Reference) -> None:
    truth = warp(ref, np.random.default_rng(10), stop=100.0)
    q = render(ref, truth, 10)
    noise = _unit(np.random.default_rng(11).standard_normal((40, DIM))).astype(np.float32)
    est = Aligner(ref).run(np.concatenate([q, noise]))
    after = states(est)[len(q) + AlignerConfig().off_script_frames:]
    assert after == ["off_script"] * len(after)
    assert np.abs(indices(est)[len(q):] - truth[-1]).max() <= 4.0  # held, not wandering
    assert max(e.confidence for e in est[len(q) + 5:]) < 0.2


def test_identifies_activity_among_references() -> None:
    refs = [make_reference(20 + i, activity=name) for i, name in enumerate("abc")]
    truth = warp(refs[1], np.random.default_rng(12))
    est = Aligner(refs).run(render(refs[1], truth, 12))
    activity = [e.activity for e in est]
    assert activity[-1] == "b"
    assert activity[10:].count("b") >= 0.95 * len(activity[10:])
    assert np.abs(indices(est)[20:] - truth[20:]).mean() < 3.0


def test_activity_switch_has_hysteresis() -> None:
    refs = [make_reference(30, activity="a"), make_reference(31, activity="b")]
    ta, tb = (warp(r, np.random.default_rng(13 + i)) for i, r in enumerate(refs))
    q = np.concatenate([render(refs[0], ta, 13), render(refs[1], tb, 14)])
    est = Aligner(refs).run(q)
    activity = [e.activity for e in est]
    switches = sum(x != y for x, y in zip(activity[10:], activity[11:], strict=False))
    assert switches == 1 and activity[-1] == "b"
    assert activity.index("b", 10) - len(ta) <= 30  # recognised within a second (30 fps)


def test_bank_matches_single_aligners(ref: Reference) -> None:
    queries = {s: render(ref, warp(ref, np.random.default_rng(s)), s) for s in (40, 41, 42)}
    singles = {s: Aligner(ref).run(q) for s, q in queries.items()}
    bank = AlignerBank(ref)
    n = min(len(q) for q in queries.values())
    for f in range(n):
        ids = list(queries)
        out = bank.step_many(ids, np.stack([queries[s][f] for s in ids]), [f / 30.0] * 3)
        for s, e in zip(ids, out, strict=True):
            assert e.ref_index == pytest.approx(singles[s][f].ref_index, abs=1e-6)
            assert e.state == singles[s][f].state
    assert len(bank) == 3 and 41 in bank
    # A fresh aligner shares the compiled references instead of copying them.
    single = Aligner(ref)
    assert single.fresh()._model is single._model
    lost = bank.step_many([40], np.full((1, DIM), np.nan), [9.0])[0]
    assert lost.state == "tracking_lost"


# -- Bank == single aligners, property style -------------------------------------------------
#
# Embeddings with entries +-1/8 in 64-d are exactly unit and every dot product between them is
# exact in float32 whatever the summation order, so a bank of sessions (one matmul over all)
# and single aligners (one matmul each) see bit-identical costs and must agree exactly.

_SMALL = AlignerConfig(band=6, pause_lag=2, pause_frames=2, off_script_frames=3,
                       relocalise_margin=4, relocalise_patience=2, activity_patience=3)


def _dyadic_walk(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 64) +-1/8 frames, each flipping 2 signs of the previous one (cos 0.94)."""
    x = np.where(rng.random(DIM) < 0.5, -0.125, 0.125)
    out = np.empty((n, DIM), dtype=np.float32)
    for i in range(n):
        x = x.copy()
        x[rng.choice(DIM, 2, replace=False)] *= -1
        out[i] = x
    return out


def _dyadic_refs(rng: np.random.Generator, n_refs: int) -> list[Reference]:
    refs = []
    for k in range(n_refs):
        n = int(rng.integers(40, 90))
        refs.append(Reference(
            name=f"r{k}", activity=f"act{k}", embeddings=_dyadic_walk(rng, n),
            phases=np.minimum(np.arange(n) * 3 // n, 2), phase_names=["a", "b", "c"],
            times=np.arange(n) / 30.0, fps=30.0))
    return refs


class _Stream:
    """A user following a reference with noise, pauses, jumps, lost and unrelated frames."""

    def __init__(self, rng: np.random.Generator, refs: list[Reference]) -> None:
        self.rng, self.refs = rng, refs
        self.k, self.x, self.speed = int(rng.integers(len(refs))), 0.0, rng.uniform(0.5, 2)
        self.hold, self.unrelated, self.frame, self.t = 0, 0, None, 0.0

    def next(self) -> tuple[np.ndarray, float, bool]:
        rng, ref = self.rng, self.refs[self.k]
        self.t += 1 / 30.0
        u = rng.random()
        if u < 0.04:  # restart somewhere, maybe in another activity
            self.k = int(rng.integers(len(self.refs)))
            self.x = float(rng.integers(len(self.refs[self.k])))
        elif u < 0.08:
            self.hold = int(rng.integers(3, 9))
        elif u < 0.10:
            self.unrelated = int(rng.integers(2, 7))
        if u > 0.97:
            return np.full(DIM, np.nan, dtype=np.float32), self.t, True
        if u > 0.94:
            return np.zeros(DIM, dtype=np.float32) + 0.125, self.t, False
        if 0.91 < u <= 0.94 or self.unrelated:  # unrelated motion
            self.unrelated = max(self.unrelated - 1, 0)
            return np.where(rng.random(DIM) < 0.5, -0.125, 0.125).astype(np.float32), self.t, True
        if self.hold and self.frame is not None:
            self.hold -= 1
            return self.frame, self.t, True
        i = min(int(self.x), len(ref) - 1)
        q = ref.embeddings[i].copy()
        q[rng.choice(DIM, 3, replace=False)] *= -1  # cos 0.91 to the true frame
        self.frame = q
        self.x = self.x + self.speed if self.x < len(ref) - 1 else 0.0
        return q, self.t, True


def _bank_vs_singles(seed: int, steps: int = 60) -> list[Estimate]:
    """Drive a bank and one single aligner per session with the same random sessions
    (added, removed, stepped in random subsets and orders); assert identical estimates."""
    rng = np.random.default_rng(seed)
    refs = _dyadic_refs(rng, int(rng.integers(1, 4)))
    bank = AlignerBank(refs, _SMALL, capacity=2)  # small: it has to grow
    template = Aligner(refs, _SMALL)
    singles: dict[str, Aligner] = {}
    streams: dict[str, _Stream] = {}
    seen: list[Estimate] = []
    known: set[str] = set()  # the sessions the bank has been told about
    next_id = 0
    for _ in range(steps):
        if not singles or rng.random() < 0.25:
            sid = f"s{next_id}"
            next_id += 1
            singles[sid], streams[sid] = template.fresh(), _Stream(rng, refs)
            if rng.random() < 0.5:
                bank.add(sid)  # else created on first sight
                known.add(sid)
        if len(singles) > 1 and rng.random() < 0.12:
            sid = str(rng.choice(sorted(singles)))
            bank.remove(sid)
            del singles[sid], streams[sid]
            known.discard(sid)
        ids = sorted(singles)
        if rng.random() < 0.4:  # else every session steps, which takes the in-place path
            ids = [s for s in ids if rng.random() < 0.6]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        frames = [streams[s].next() for s in ids]
        q = np.array([f[0] for f in frames], dtype=np.float32).reshape(len(ids), DIM)
        out = bank.step_many(ids, q, [f[1] for f in frames], [f[2] for f in frames])
        assert isinstance(out, EstimateBatch) and len(out) == len(ids)
        for sid, (e, t, ok), est in zip(ids, frames, out, strict=True):
            assert est.to_dict() == singles[sid].step(e, t, ok).to_dict(), sid
            seen.append(est)
        known.update(ids)
        assert len(bank) == len(known) and set(bank.sessions) == known
    for sid, single in singles.items():  # via JSON: t is NaN before a session's first step
        assert (json.dumps(bank.last(sid).to_dict(), sort_keys=True)
                == json.dumps(single.last.to_dict(), sort_keys=True))
    return seen


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31))
def test_bank_equals_single_aligners_random_sessions(seed: int) -> None:
    _bank_vs_singles(seed)


def test_bank_vs_singles_covers_every_state() -> None:
    seen = [e for seed in range(3) for e in _bank_vs_singles(seed, steps=120)]
    assert {e.state for e in seen} == set(STATES)
    assert len({e.activity for e in seen}) > 1


def test_bank_session_lifecycle(ref: Reference) -> None:
    bank = AlignerBank(ref, capacity=1)
    assert bank.last("x").state == "waiting" and "x" not in bank
    for s in "abc":
        bank.add(s)
    q = np.stack([ref.embeddings[0]] * 3)
    out = bank.step_many(["c", "a", "b"], q, [0.0] * 3)
    assert [e.state for e in out] == ["tracking"] * 3 == out.states
    bank.remove("a")
    bank.remove("nope")  # unknown: nothing happens
    assert bank.sessions == ["c", "b"] or set(bank.sessions) == {"b", "c"}
    assert bank.last("c").state == "tracking"
    bank.reset("c")
    assert bank.last("c").state == "waiting" and bank.last("b").state == "tracking"
    with pytest.raises(ValueError, match="more than once"):
        bank.step_many(["b", "b"], q[:2], [1.0, 1.0])
    with pytest.raises(ValueError, match="size"):
        bank.step_many(["b"], np.zeros((1, DIM + 1)), [1.0])
    empty = bank.step_many([], np.zeros((0, DIM)), [])
    assert len(empty) == 0 and list(empty) == []


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="band"):
        AlignerConfig(band=0)
    with pytest.raises(ValueError, match="smoothing"):
        AlignerConfig(smoothing=1.0)


# -- Batch DTW ------------------------------------------------------------------------------

def test_offline_dtw_identical_is_diagonal(ref: Reference) -> None:
    path = offline_dtw(ref.embeddings, ref.embeddings)
    np.testing.assert_array_equal(path, np.stack([np.arange(len(ref))] * 2, axis=1))


def test_offline_dtw_recovers_warp(ref: Reference) -> None:
    truth = warp(ref, np.random.default_rng(15))
    q = render(ref, truth, 15)
    path = offline_dtw(q, ref.embeddings)
    assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (len(q) - 1, len(ref) - 1)
    assert np.all(np.diff(path, axis=0) >= 0) and np.all(np.diff(path, axis=0).sum(1) >= 1)
    assert np.abs(path_to_index(path, len(q)) - truth).mean() < 1.5


def _naive_open_end(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Open-end DTW by the textbook triple loop: for each query prefix, the reference
    frame whose (0, 0) -> (t, j) path, divided by (t + 1) + (j + 1), is cheapest."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    c = 1.0 - qn @ rn.T
    d = np.full((len(q) + 1, len(r) + 1), np.inf)
    d[0, 0] = 0.0
    for i in range(1, len(q) + 1):
        for j in range(1, len(r) + 1):
            best = min(d[i - 1, j - 1], d[i - 1, j], d[i, j - 1])
            d[i, j] = c[i - 1, j - 1] + best
    t, j = np.meshgrid(np.arange(len(q)), np.arange(len(r)), indexing="ij")
    return np.argmin(d[1:, 1:] / (t + j + 2), axis=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_online_dtw_is_open_end_dtw_and_causal(nq: int, nr: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q, r = rng.normal(size=(nq, 4)), rng.normal(size=(nr, 4))
    idx = online_dtw_index(q, r)
    np.testing.assert_array_equal(idx, _naive_open_end(q, r))
    k = int(rng.integers(1, nq + 1))  # an answer never changes with frames after it
    np.testing.assert_array_equal(online_dtw_index(q[:k], r), idx[:k])


def test_online_dtw_follows_a_warp(ref: Reference) -> None:
    np.testing.assert_array_equal(online_dtw_index(ref.embeddings, ref.embeddings),
                                  np.arange(len(ref)))
    truth = warp(ref, np.random.default_rng(15))
    idx = online_dtw_index(render(ref, truth, 15), ref.embeddings)
    assert np.abs(idx - truth).mean() < 3.0


def test_subsequence_dtw_finds_segment(ref: Reference) -> None:
    truth = np.arange(60.0, 110.0, 0.75)
    start, end, cost = subsequence_dtw(render(ref, truth, 16), ref.embeddings)
    assert abs(start - 60) <= 2 and abs(end - 109) <= 2
    assert 0.0 <= cost < 0.1

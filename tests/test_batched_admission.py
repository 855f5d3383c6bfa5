"""Batched admission (``StreamBank.push_many``, ``Pipeline(batched=True)``) gives exactly
what the per-session path gives: the same model frames, bit for bit, the same encoder and
aligner inputs, the same answers in the same order, the same counters.

Random per-session time sequences: duplicate and backwards stamps, silences over
``max_gap_s``, capture rates below the model's (several model frames, the cap) and above
it (none), stamps a hair either side of a grid time, missing joints and lost frames, and
sessions opened, closed and reset midway, with ``step`` run whole or one round at a time.
"""

from __future__ import annotations

import math
import struct
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.pipeline import Pipeline
from engine.streams import StreamBank, StreamConfig
from masa_rt.preprocess import InputSpec

FPS = 30.0
SIDS = ("s0", "s1", "s2", "s3")
# Capture-time steps: duplicates, backwards, faster and slower than the model, a hair
# either side of the grid (the resampler's 1e-6 s tolerance), several frames, the cap
# (over 6 frames at 30 Hz), silences over max_gap_s = 0.5.
DTS = (0.0, -0.02, 1 / 90, 1 / 60, 1 / FPS, 1 / FPS + 5e-7, 1 / FPS - 5e-7, 1 / FPS + 2e-6,
       1 / FPS - 2e-6, 2 / FPS, 0.1, 6 / FPS, 0.21, 0.3, 0.45, 0.6, 2.0)
dt_st = st.one_of(st.sampled_from(DTS), st.floats(1e-4, 0.25))
kind_st = st.sampled_from(("ok", "ok", "ok", "some_nan", "lost"))


def _bits(v) -> object:
    """A value as what tells bit-different values apart (floats by their bytes)."""
    if isinstance(v, float | np.floating):
        return struct.pack("<d", float(v))
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, tuple | list):
        return tuple(_bits(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _bits(x)) for k, x in v.items()))
    return v


def _joints(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    j = rng.normal(0, 0.1, shape).astype(np.float32)
    if kind == "some_nan":
        j[rng.random(shape[0]) < 0.3] = np.nan
    elif kind == "lost":
        j[:] = np.nan
    return j


# -- the stream bank alone ------------------------------------------------------------------


class _SlotBackend:
    """Just the slot bookkeeping of a backend: pushing frames never calls the model."""

    def __init__(self, input_dim: int) -> None:
        self.input_dim, self.free = input_dim, list(range(8))

    def allocate(self) -> int:
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def reset(self, slots) -> None:
        pass


def _frame_bits(f) -> tuple:
    return (_bits(f.t), _bits(f.joints), f.extra, f.lost)


def _bank_bits(bank: StreamBank, sids) -> tuple:
    out = [_bits(dict(bank.counters))]
    for sid in sids:
        s = bank.state(sid)
        rs = s.resampler
        prev = None if rs._prev is None else (_bits(rs._prev[0]), _bits(rs._prev[1]))
        out.append((s.slot, s.frames_in, s.frames_out, s.last_seq, _bits(s.last_t),
                    _bits(s.counters), rs.stale, rs.gaps, rs.capped,
                    None if rs._t0 is None else _bits(rs._t0), rs._k, prev))
    return tuple(out)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(st.integers(0, 3), dt_st, kind_st), max_size=6),
                          st.sampled_from(("", "", "", "reset"))), min_size=1, max_size=40),
       st.integers(0, 2**31 - 1),
       st.sampled_from([(0.5, 6), (0.02, 6), (0.05, 1), (0.5, None), (math.inf, None)]))
def test_push_many_equals_push(rounds, seed, limits):
    """Each round, some streams get one capture frame: ``push_many`` on one bank, ``push``
    one by one on the other; the model frames and every counter agree bit for bit. Limits:
    the serving defaults, and silences and caps shorter than a model frame or none."""
    spec = InputSpec(layout="mediapipe_hand21", fps=FPS)
    cfg = StreamConfig(max_gap_s=limits[0], max_frames_per_push=limits[1])
    banks = [StreamBank(_SlotBackend(spec.input_dim), spec, cfg) for _ in range(2)]
    for b in banks:
        for sid in SIDS:
            b.open(sid)
    rng = np.random.default_rng(seed)
    t = {sid: 5.0 + i / 7 for i, sid in enumerate(SIDS)}
    seq = dict.fromkeys(SIDS, 0)
    for frames, extra in rounds:
        if extra == "reset":
            sid = SIDS[int(rng.integers(4))]
            for b in banks:
                b.reset(sid)
        chosen = {}
        for i, dt, kind in frames:  # one frame per stream per round: the last one drawn
            chosen[SIDS[i]] = (dt, kind)
        sids = list(chosen)
        if not sids:
            continue
        joints, times, seqs = [], [], []
        for sid in sids:
            dt, kind = chosen[sid]
            t[sid] += dt
            seq[sid] += 1
            joints.append(_joints(rng, (21, 3), kind))
            times.append(t[sid])
            seqs.append(seq[sid])
        pushed = banks[0].push_many(sids, joints, times, seqs)
        assert pushed is not None
        for i, sid in enumerate(sids):
            if pushed.made[i] >= 0:
                assert i not in pushed.scalar
                got = [pushed.frame(pushed.made[i])]
            else:
                got = pushed.scalar.get(i, [])
            want = banks[1].push(sid, joints[i], times[i], seq=seqs[i])
            assert [_frame_bits(f) for f in got] == [_frame_bits(f) for f in want], sid
        assert _bank_bits(banks[0], SIDS) == _bank_bits(banks[1], SIDS)


def test_push_many_takes_the_vectorised_way_in_the_common_case():
    """Past the first frame, a frame on the grid or between two grid times is computed in
    the batch, not by ``push``: the test above compares the vectorised code, not just
    ``push`` with itself."""
    spec = InputSpec(layout="mediapipe_hand21", fps=FPS)
    bank = StreamBank(_SlotBackend(spec.input_dim), spec)
    rng = np.random.default_rng(0)
    for sid in SIDS:
        bank.open(sid)
    scalar = []
    push = bank.push
    bank.push = lambda *a, **k: scalar.append(a[0]) or push(*a, **k)
    j = [_joints(rng, (21, 3), k) for k in ("ok", "some_nan", "lost", "ok")]
    first = bank.push_many(list(SIDS), j, [1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0])
    assert scalar == list(SIDS) and first.made == [-1] * 4  # first frames: push
    scalar.clear()
    pushed = bank.push_many(list(SIDS), j[::-1], [1.01, 1.02, 1 + 1 / FPS, 1.04], [1] * 4)
    assert scalar == [] and pushed.made == [-1, -1, 0, 1] and pushed.scalar == {}
    assert pushed.lost.tolist() == [False, False]


# -- the pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tiny_model):
    """Two pipelines on the tiny two-hand model and its reference (with a phase decoder):
    batched admission and the per-session path, their encoder and aligner inputs
    recorded."""
    onnx, ref = tiny_model
    out = []
    for batched in (True, False):
        pipe = Pipeline.from_files(onnx, [ref], capacity=len(SIDS))
        pipe.batched = batched
        pipe.batch_min = 1  # batch even one session (the serving default leaves 1-7 alone)
        calls: list = []
        step = pipe.backend.step
        pipe.backend.step = (lambda s, f, step=step, calls=calls:
                             calls.append(("encode", _bits(s), _bits(f))) or step(s, f))
        for name, bank in [("all", pipe._bank_all), *pipe._banks.items()]:
            def step_many(ids, emb, times, valid, x=None, name=name, inner=bank.step_many,
                          calls=calls):
                calls.append(("align", name, list(ids), _bits(emb), _bits(times),
                              _bits(valid), _bits(x)))
                return inner(ids, emb, times, valid, x)
            bank.step_many = step_many
        out.append((pipe, calls))
    return out


def _result_bits(results) -> list:
    return [(sid, seq, _bits(t), tuple(_bits(getattr(est, f.name)) for f in fields(est)))
            for sid, seq, t, est in results]


def _pipeline_bits(pipe: Pipeline) -> tuple:
    return (pipe.pending(), pipe.sessions, _bank_bits(pipe.bank, pipe.sessions),
            tuple((sid, s.current, len(s.queue), len(s.frames), s.bank is pipe._bank_all)
                  for sid, s in pipe._sessions.items()))


op_st = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3), dt_st, kind_st),
    st.tuples(st.just("submit"), st.integers(0, 3), dt_st, kind_st),
    st.tuples(st.just("round"), st.sampled_from((1 / FPS, 1 / 90, 1 / 60)), kind_st),
    st.tuples(st.just("round"), st.sampled_from((1 / FPS, 1 / 90, 1 / 60)), kind_st),
    st.tuples(st.just("round"), st.sampled_from((1 / FPS, 1 / 90, 1 / 60)), kind_st),
    st.tuples(st.just("step"), st.sampled_from((None, 1, 2))),
    st.tuples(st.just("step"), st.sampled_from((None, 1, 2))),
    st.tuples(st.just("open"), st.integers(0, 3), st.booleans(), st.sampled_from((30., 90.))),
    st.tuples(st.just("close"), st.integers(0, 3)),
    st.tuples(st.just("reset"), st.integers(0, 3)),
)


def _run_both(pipelines, ops, seed, batch_min: int = 1) -> None:
    """Run ``ops`` on the batched and the per-session pipeline; compare after every op.
    ``batch_min``: smaller waves are admitted one by one (the round still in arrays)."""
    (fast, fast_calls), (slow, slow_calls) = pipelines
    assert fast.batched and not slow.batched
    fast.batch_min = batch_min
    for pipe in (fast, slow):
        for sid in list(pipe.sessions):
            pipe.close_session(sid)
        pipe.bank.counters.clear()
    fast_calls.clear()
    slow_calls.clear()
    layout, ref_name = fast.spec.layout, next(iter(fast.references))
    shape = None
    for pipe in (fast, slow):
        for sid in SIDS[:3]:
            shape = pipe.open_session(sid, layout, FPS)["shape"]
    rng = np.random.default_rng(seed)
    t = {sid: 3.0 + i / 11 for i, sid in enumerate(SIDS)}
    seq = dict.fromkeys(SIDS, 0)

    def submit(sid, dt, kind):
        if sid not in fast.sessions:
            return
        t[sid] += dt
        seq[sid] += 1
        j = _joints(rng, shape, kind)
        for pipe in (fast, slow):
            pipe.submit(sid, seq[sid], t[sid], j)

    for op in [*ops, ("step", None)]:
        if op[0] == "submit":
            submit(SIDS[op[1]], op[2], op[3])
        elif op[0] == "round":  # every session one frame, as the bench and a busy server
            for sid in list(fast.sessions):
                submit(sid, op[1], op[2] if rng.random() < 0.2 else "ok")
        elif op[0] == "step":
            got = [_result_bits(pipe.step(max_rounds=op[1])) for pipe in (fast, slow)]
            assert got[0] == got[1], op
        elif op[0] == "open":
            for pipe in (fast, slow):
                pipe.open_session(SIDS[op[1]], layout, op[3], ref_name if op[2] else None)
        elif op[0] == "close":
            for pipe in (fast, slow):
                pipe.close_session(SIDS[op[1]])
        elif op[0] == "reset" and SIDS[op[1]] in fast.sessions:
            for pipe in (fast, slow):
                pipe.reset_session(SIDS[op[1]])
        assert _pipeline_bits(fast) == _pipeline_bits(slow), op
    assert fast.pending() == 0
    assert fast_calls == slow_calls


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=1, max_size=80), st.integers(0, 2**31 - 1),
       st.sampled_from((1, 1, 2, 3)))
def test_batched_pipeline_equals_per_session(pipelines, ops, seed, batch_min):
    _run_both(pipelines, ops, seed, batch_min)


def test_batched_pipeline_backlog_one_round_at_a_time(pipelines):
    """A backlog stepped one round per call (the server's way) leaves admitted model
    frames between calls; sessions holding one are closed, reset and reopened, others join
    and answer in the same calls, with missing joints and a lost frame."""
    dt = 1 / FPS
    backlog = [("submit", i, dt, kind) for _ in range(3)
               for i, kind in enumerate(("ok", "some_nan", "lost"))]
    ops = [*backlog, ("step", 1), ("step", 1), ("close", 1), ("reset", 2),
           ("open", 3, True, 90.0), ("open", 1, False, FPS), *backlog,
           ("submit", 3, 1 / 90, "ok"), ("step", 1), ("round", dt, "ok"), ("step", 2),
           ("round", dt, "some_nan"), ("round", 1 / 90, "ok"), ("step", 1), ("step", 1)]
    _run_both(pipelines, ops, 7)


def test_batched_pipeline_rounds_skip_the_per_session_push(pipelines):
    """The bench's pattern (every session one frame on the model grid per round) goes
    through ``push_many`` and the array round, not ``StreamBank.push`` per session."""
    (fast, _), _ = pipelines
    for sid in list(fast.sessions):
        fast.close_session(sid)
    for sid in SIDS:
        fast.open_session(sid, fast.spec.layout, FPS)
    rng = np.random.default_rng(1)
    fast.batch_min = 1
    pushes, rounds = [], []
    push, encode = fast.bank.push, fast._encode_rows
    fast.bank.push = lambda *a, **k: pushes.append(a[0]) or push(*a, **k)
    fast._encode_rows = lambda *a: rounds.append(len(a[0])) or encode(*a)
    try:
        for k in range(6):
            for sid in SIDS:
                fast.submit(sid, k, 2.0 + k / FPS, _joints(rng, (42, 3), "ok"))
            assert len(fast.step()) == len(SIDS)
    finally:
        del fast.bank.push, fast._encode_rows
        for sid in SIDS:
            fast.close_session(sid)
    assert pushes == list(SIDS)  # the first frames only
    assert rounds == [len(SIDS)] * 6  # the first frames' too: ModelFrames made into rows

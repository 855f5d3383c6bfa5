"""Streams through the ONNX Runtime backend equal the offline causal model (the exactness
test, METHOD.md §3), plus resampling to the model's rate and the bank's bookkeeping."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backends import CapacityError, get_backend  # noqa: E402
from engine.streams import (  # noqa: E402
    Resampler,
    StreamBank,
    StreamConfig,
    StreamError,
    interpolate,
)
from masa_rt.preprocess import frame_features  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
W = 8  # window of the test model: streams below run ~3.5 windows
FPS = 30.0


def _joints(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random-walk hand (n, 21, 3) with a few missing joints and one lost frame."""
    j = np.cumsum(rng.normal(0, 0.02, (n, 21, 3)), axis=0) + rng.normal(0, 0.1, (1, 21, 3))
    j = j.astype(np.float32)
    j[rng.random((n, 21)) < 0.05] = np.nan
    return j


def _offline(model, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(feats)[None])[0].numpy()  # (T, d)


def test_streamed_equals_offline_with_reset(engine_model):
    """3 streams, ~3.5 windows each, interleaved at random; stream 1 is reset mid-way;
    stream 2 is captured at 90 Hz and resampled to the model's 30 Hz."""
    model, spec, onnx_path, _ckpt = engine_model
    rng = np.random.default_rng(1)
    bank = StreamBank(get_backend("onnxruntime", onnx_path, capacity=4), spec)
    rates = [FPS, FPS, 3 * FPS]
    clips = [_joints(rng, n) for n in (28, 30, 3 * 27)]
    times = [5.0 + i + np.arange(len(c)) / r
             for i, (c, r) in enumerate(zip(clips, rates, strict=True))]
    for s in range(3):
        bank.open(s)
    reset_at = 13  # stream 1: history before this frame must not leak
    pos, feats, embs = [0, 0, 0], [[[]], [[]], [[]]], [[[]], [[]], [[]]]
    while any(p < len(c) for p, c in zip(pos, clips, strict=True)):
        live = [s for s in range(3) if pos[s] < len(clips[s]) and rng.random() < 0.7]
        batch = []
        for s in live:
            if s == 1 and pos[s] == reset_at:
                bank.reset(1)
                feats[1].append([])
                embs[1].append([])
            for mf in bank.push(s, clips[s][pos[s]], times[s][pos[s]], seq=pos[s]):
                batch.append((s, bank.features([mf])[0]))  # one model frame per stream here
            pos[s] += 1
        for (s, f), e in zip(batch, bank.step(batch), strict=True):
            feats[s][-1].append(f)
            embs[s][-1].append(e)
    assert [len(e[-1]) for e in embs] == [28, 30 - reset_at, 27]
    for s in range(3):
        for k, (seg_f, seg_e) in enumerate(zip(feats[s], embs[s], strict=True)):
            if s < 2:  # capture rate == model rate: model input = the raw frames, featurised
                start = (0, reset_at)[k]
                ref = frame_features(clips[s][start:start + len(seg_f)], spec)
                np.testing.assert_array_equal(np.stack(seg_f), ref)
            offline = _offline(model, np.stack(seg_f))
            np.testing.assert_allclose(np.stack(seg_e), offline, atol=1e-4, rtol=0)


def test_cost_per_frame_does_not_grow_with_stream_length(engine_model):
    """Structural: the state a stream holds is the same after 5 windows as after 1 frame."""
    _model, spec, onnx_path, _ckpt = engine_model
    backend = get_backend("onnxruntime", onnx_path, capacity=2)
    bank = StreamBank(backend, spec)
    bank.open("a")
    joints = _joints(np.random.default_rng(2), 5 * W)
    sizes = []
    for i, j in enumerate(joints):
        (mf,) = bank.push("a", j, i / FPS)
        bank.step([("a", bank.features([mf])[0])])
        sizes.append((backend.state_nbytes(), len(vars(bank.state("a").resampler))))
    assert len(set(sizes)) == 1
    assert backend.state_nbytes() == 2 * backend.info.slot_nbytes  # one ring per slot


def test_resampler_90_to_30_interpolates_linear_motion():
    rs = Resampler(30.0)
    rng = np.random.default_rng(3)
    t = 2.0 + np.cumsum(rng.uniform(0.8, 1.2, 200) / 90.0)  # jittered 90 Hz capture
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    out = [o for ti in t for o in rs.push((a + b * ti).astype(np.float32), ti)]
    got_t = np.array([o[0] for o in out])
    np.testing.assert_allclose(got_t, t[0] + np.arange(len(out)) / 30.0, atol=1e-9)
    assert len(out) == int((t[-1] - t[0]) * 30.0 + 1e-6) + 1
    for tk, x in out:
        np.testing.assert_allclose(x, a + b * tk, atol=1e-4)


def test_resampler_missing_joints_stale_frames_and_gaps():
    nan = np.float32(np.nan)
    a = np.array([[0.0, 0.0], [nan, nan], [nan, nan]], np.float32)
    b = np.array([[2.0, 4.0], [1.0, 1.0], [nan, nan]], np.float32)
    mid = interpolate(a, b, 0.25)
    np.testing.assert_allclose(mid[0], [0.5, 1.0])
    np.testing.assert_array_equal(mid[1], [1.0, 1.0])  # missing on one side: the other side
    assert np.isnan(mid[2]).all()  # missing on both: stays missing
    rs = Resampler(10.0, max_gap_s=0.5)
    assert len(rs.push(a, 1.0)) == 1
    assert rs.push(a, 1.0) == [] and rs.stale == 1  # a stamp that does not increase
    (t_gap, _), = rs.push(b, 3.0)  # a 2 s gap: re-anchor, no invented frames
    assert t_gap == 3.0


def test_bank_errors(engine_model):
    _model, spec, onnx_path, _ckpt = engine_model
    bank = StreamBank(get_backend("onnxruntime", onnx_path, capacity=1), spec)
    bank.open("a")
    with pytest.raises(StreamError, match="already open"):
        bank.open("a")
    with pytest.raises(CapacityError, match="slots are in use"):
        bank.open("b")
    with pytest.raises(StreamError, match="unknown session"):
        bank.push("nope", np.zeros((21, 3), np.float32), 0.0)
    bank.close("a")
    bank.open("b")  # the slot is free again


def test_resampler_caps_the_frames_one_capture_frame_makes():
    """Issue #7: a capture frame after a gap under max_gap_s made up to 15 model frames (at
    30 fps); with ``max_frames`` a longer gap re-anchors the grid, as a silence does."""
    x = np.zeros(3, np.float32)
    rs = Resampler(30.0, max_gap_s=0.5, max_frames=6)
    assert len(rs.push(x, 1.0)) == 1
    assert len(rs.push(x, 1.0 + 3 / 30)) == 3  # a 10 Hz stream interpolates as before
    assert len(rs.push(x, 1.0 + 9 / 30)) == 6  # exactly the cap: still interpolated
    (t, _), = rs.push(x, 1.0 + 9 / 30 + 0.4)  # would make 12: one frame, grid re-anchored
    assert t == pytest.approx(1.0 + 9 / 30 + 0.4) and (rs.gaps, rs.capped) == (1, 1)
    assert len(rs.push(x, t + 2 / 30)) == 2  # interpolating again on the new grid
    assert len(rs.push(x, t + 5.0)) == 1 and (rs.gaps, rs.capped) == (2, 1)  # a silence
    assert len(rs.push(x, 1e300)) == 1 and rs.capped == 1  # hostile stamp: no work either
    uncapped = Resampler(30.0, max_gap_s=0.5)  # offline recordings (engine.reference)
    uncapped.push(x, 1.0)
    assert len(uncapped.push(x, 1.4)) == 12 and uncapped.gaps == 0
    with pytest.raises(ValueError, match="max_frames"):
        Resampler(30.0, max_frames=0)


class _SlotBackend:
    """Just the slot bookkeeping of a backend: StreamBank.push never calls the model."""

    def __init__(self, input_dim: int) -> None:
        self.input_dim, self.free = input_dim, [0, 1]

    def allocate(self) -> int:
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)


def test_bank_counts_capped_interpolation_and_gaps():
    from masa_rt.preprocess import InputSpec

    spec = InputSpec(layout="mediapipe_hand21", fps=FPS)
    bank = StreamBank(_SlotBackend(spec.input_dim), spec,
                      StreamConfig(max_gap_s=0.5, max_frames_per_push=4))
    j = np.zeros((21, 3), np.float32)
    bank.open("a")
    assert [len(bank.push("a", j, t)) for t in (0.0, 4 / FPS, 0.4, 2.0)] == [1, 4, 1, 1]
    assert bank.state("a").counters == {"interp_capped": 1, "gap_reset": 1}
    bank.close("a")  # the bank's totals outlive the stream
    assert bank.counters == {"interp_capped": 1, "gap_reset": 1}
    assert StreamConfig().max_frames_per_push == 6  # the serving default

"""The pipeline: sessions, one batched encoder call per round, aligners, and refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.backends import get_backend  # noqa: E402
from engine.pipeline import Pipeline, ReferenceMismatchError  # noqa: E402
from masa_rt.align import Aligner, Reference  # noqa: E402
from masa_rt.preprocess import frame_features  # noqa: E402
from masa_rt.protocol import ProtocolError  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
W = 8
FPS = 30.0


def _walk(rng, n: int) -> np.ndarray:
    return (np.cumsum(rng.normal(0, 0.05, (n, 21, 3)), axis=0)
            + rng.normal(0, 0.1, (1, 21, 3))).astype(np.float32)


def _embed(model, spec, joints: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(frame_features(joints, spec))[None])[0].numpy()


@pytest.fixture(scope="module")
def setup(engine_model):
    """A pipeline with two references made from random walks, and the demo joints."""
    model, spec, onnx_path, _ckpt = engine_model
    rng = np.random.default_rng(0)
    demos = {name: _walk(rng, 40) for name in ("pour", "stir")}
    fp = get_backend("onnxruntime", onnx_path, capacity=1).info.fingerprint
    refs = [Reference(name=n, activity=n, embeddings=_embed(model, spec, j),
                      phases=np.repeat([0, 1], 20), phase_names=["a", "b"],
                      times=np.arange(40) / FPS, fps=FPS, model_fingerprint=fp)
            for n, j in demos.items()]
    return model, spec, onnx_path, refs, demos


def _pipeline(setup, capacity: int = 4) -> Pipeline:
    _model, spec, onnx_path, refs, _demos = setup
    return Pipeline(get_backend("onnxruntime", onnx_path, capacity=capacity), spec, refs)


def test_serving_modules_do_not_import_torch():
    code = ("import sys, engine.pipeline, engine.streams, engine.backends.onnxruntime_backend; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_estimates_equal_offline_alignment(setup):
    """30 Hz and 90 Hz sessions, frames queued several at a time: every frame answered once,
    in order, and the 30 Hz session's estimates equal an aligner fed offline embeddings."""
    model, spec, _onnx, refs, demos = setup
    pipe = _pipeline(setup)
    calls = []
    step = pipe.backend.step
    pipe.backend.step = lambda s, f: calls.append(len(s)) or step(s, f)
    info = pipe.open_session("a", "mediapipe_hand21", FPS, reference="pour")
    assert info["shape"] == (21, 3) and info["references"] == ["pour"]
    pipe.open_session("b", "mediapipe_hand21", 3 * FPS)
    joints = demos["pour"][:30] + np.float32(0.01)
    results = []
    for i in range(30):
        pipe.submit("a", i, 1.0 + i / FPS, joints[i])
        for k in range(3):
            pipe.submit("b", 3 * i + k, 1.0 + (3 * i + k) / (3 * FPS), joints[i])
        if i % 3 == 2:  # a backlog of 3 frames per session: 3 rounds, not 3 x sessions
            n_calls = len(calls)
            results += pipe.step()
            assert len(calls) - n_calls == 3
    by = {s: [r for r in results if r[0] == s] for s in "ab"}
    assert [r[1] for r in by["a"]] == list(range(30))
    assert [r[1] for r in by["b"]] == list(range(90))
    assert all(r[2] == 1.0 + r[1] / FPS for r in by["a"])  # the capture time comes back
    offline = Aligner(refs[0]).run(_embed(model, spec, joints), 1.0 + np.arange(30) / FPS)
    for (_s, _q, _t, got), want in zip(by["a"], offline, strict=True):
        assert (got.phase_id, got.state) == (want.phase_id, want.state)
        assert got.ref_index == pytest.approx(want.ref_index, abs=1e-3)


def test_lost_tracking_and_reset(setup):
    pipe = _pipeline(setup)
    demo = setup[4]["pour"]
    pipe.open_session("a", "mediapipe_hand21", FPS)
    for i in range(10):
        pipe.submit("a", i, i / FPS, demo[i])
    pipe.submit("a", 10, 10 / FPS, np.full((21, 3), np.nan, np.float32))
    *_, (_, seq, _, est) = pipe.step()
    assert (seq, est.state) == (10, "tracking_lost")
    pipe.reset_session("a")
    pipe.submit("a", 11, 11 / FPS, demo[0])
    (_, _, _, est), = pipe.step()
    assert est.state != "tracking_lost"


def test_refusals(setup):
    pipe = _pipeline(setup, capacity=1)
    with pytest.raises(ProtocolError) as e:
        pipe.open_session("a", "h2o_hands", FPS)
    assert e.value.reason == "wrong_layout"
    with pytest.raises(ProtocolError) as e:
        pipe.open_session("a", "mediapipe_hand21", FPS, reference="juggle")
    assert e.value.reason == "unknown_reference"
    pipe.open_session("a", "mediapipe_hand21", FPS)
    with pytest.raises(ProtocolError) as e:
        pipe.open_session("b", "mediapipe_hand21", FPS)
    assert e.value.reason == "overloaded"
    with pytest.raises(ProtocolError) as e:
        pipe.submit("zz", 0, 0.0, np.zeros((21, 3), np.float32))
    assert e.value.reason == "unknown_session"


def test_from_files_refuses_reference_of_another_model(setup, tmp_path):
    _model, _spec, onnx_path, refs, _demos = setup
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    refs[0].save(good)
    Reference(**{**{k: getattr(refs[1], k) for k in ("name", "activity", "embeddings",
                                                      "phases", "phase_names", "times",
                                                      "fps")},
                 "model_fingerprint": "0123456789abcdef"}).save(bad)
    pipe = Pipeline.from_files(onnx_path, [good], capacity=2)
    assert pipe.sessions == [] and pipe.spec.layout == "mediapipe_hand21"
    with pytest.raises(ReferenceMismatchError,
                       match=r"bad.npz was built with model 0123456789abcdef, server runs "
                             r"model \w+: rebuild it with masa-rt reference build"):
        Pipeline.from_files(onnx_path, [good, bad])


def test_a_reference_of_another_width_is_refused_at_load(setup):
    from dataclasses import replace

    _model, spec, onnx_path, refs, _demos = setup
    narrow = replace(refs[0], embeddings=refs[0].embeddings[:, :7])
    with pytest.raises(ReferenceMismatchError, match=r"7 wide, the model's are \d+"):
        Pipeline(get_backend("onnxruntime", onnx_path, capacity=1), spec, [narrow])

"""The shipped models: one per layout, picked by a demo's layout or by the model that
built a reference, each with a checked ONNX export beside it."""

from __future__ import annotations

import numpy as np
import pytest

from masa_rt.sequence import Sequence, save_sequence
from masa_rt.shipped import (
    SHIPPED_MODELS,
    NoShippedModelError,
    shipped_model_path,
    shipped_onnx_path,
)


def _penn13_demo(path, frames: int = 60) -> None:
    """A 2D body sequence in the penn13 layout: arms raised and lowered, two phases."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 40, (13, 2)).astype(np.float32) + 200
    lift = np.sin(np.linspace(0, np.pi, frames))[:, None, None]
    joints = np.repeat(base[None], frames, axis=0)
    joints[:, 3:7, 1] -= 80 * lift[:, :, 0]  # elbows and wrists up, then down
    phases = (np.arange(frames) >= frames // 2).astype(np.int32)
    save_sequence(path, Sequence(joints=joints, layout="penn13", fps=30.0, phases=phases,
                                 phase_names=("raise", "lower"), activity="raise_arms"))


def test_every_shipped_model_and_its_export_are_in_the_package():
    from engine.backends import read_model_info

    for layout in SHIPPED_MODELS:
        assert shipped_model_path(layout).is_file() and shipped_onnx_path(layout).is_file()
        info = read_model_info(shipped_onnx_path(layout))
        assert info.input_spec["layout"] == layout
    assert shipped_model_path(None) == shipped_model_path("h2o_hands")  # the default
    with pytest.raises(NoShippedModelError, match="no shipped model reads layout 'coco17'"):
        shipped_model_path("coco17")


def test_a_body_demo_is_built_and_served_with_the_body_model(tmp_path):
    pytest.importorskip("torch")
    from engine.backends import read_model_info
    from engine.reference import build_reference
    from engine.serve_commands import prepare
    from masa_rt.checkpoint import model_fingerprint

    _penn13_demo(tmp_path / "demo.npz")
    ref = build_reference([tmp_path / "demo.npz"], None, tmp_path / "ref.npz",
                          decoder={"steps": 0})
    assert ref.model_fingerprint == model_fingerprint(shipped_model_path("penn13"))
    assert ref.raw_embeddings is not None and ref.raw_embeddings.shape == (60, 26)
    onnx, refs = prepare(None, [str(tmp_path / "ref.npz")])
    assert onnx == shipped_onnx_path("penn13")  # the export that built it, not the default
    assert read_model_info(onnx).fingerprint == ref.model_fingerprint
    assert refs == [tmp_path / "ref.npz"]


def test_a_3d_body_demo_is_built_with_the_body25_model(tmp_path):
    pytest.importorskip("torch")
    from engine.reference import build_reference
    from masa_rt.checkpoint import model_fingerprint
    from masa_rt.synth import generate

    seq = generate("squat", np.random.default_rng(3))  # body25, 3D
    save_sequence(tmp_path / "squat.npz", seq)
    ref = build_reference([tmp_path / "squat.npz"], None, tmp_path / "ref.npz",
                          decoder={"steps": 0})
    assert ref.model_fingerprint == model_fingerprint(shipped_model_path("body25"))
    assert ref.phase_names == list(seq.phase_names)

"""masa_rt.preprocess: the one frame -> model input function shared by train and serve."""

import subprocess
import sys

import numpy as np
import pytest

from masa_rt.preprocess import InputSpec, assemble, frame_features, normalise_joints
from masa_rt.skeleton import get_layout

LAYOUT = "h2o_hands"


def _joints(T=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, 42, 3)).astype(np.float32)


def test_shapes_and_dtype():
    spec = InputSpec(LAYOUT, fps=30)
    seq = frame_features(_joints(), spec)
    assert seq.shape == (5, 42 * 3) and seq.dtype == np.float32
    assert frame_features(_joints()[0], spec).shape == (42 * 3,)
    assert frame_features(_joints()[None], spec).shape == (1, 5, 42 * 3)
    assert spec.input_dim == 126


def test_one_frame_equals_its_row_in_a_sequence():
    # per_frame: a live frame gets exactly the row the offline sequence gets
    spec = InputSpec(LAYOUT, fps=30)
    j = _joints()
    seq = frame_features(j, spec)
    for t in range(len(j)):
        np.testing.assert_array_equal(frame_features(j[t], spec), seq[t])


def test_missing_joint_becomes_zero_and_leaves_others_alone():
    spec = InputSpec(LAYOUT, fps=30)
    j = _joints()
    tip = get_layout(LAYOUT).index("l_index4")  # neither root nor reference bone
    holed = j.copy()
    holed[2, tip] = np.nan
    a, b = frame_features(j, spec), frame_features(holed, spec)
    assert np.isfinite(b).all()
    np.testing.assert_array_equal(b.reshape(5, 42, 3)[2, tip], 0)
    mask = np.ones((5, 42), bool)
    mask[2, tip] = False
    np.testing.assert_allclose(b.reshape(5, 42, 3)[mask], a.reshape(5, 42, 3)[mask], atol=1e-6)


def test_all_missing_frame_is_zero_not_an_error():
    spec = InputSpec(LAYOUT, fps=30)
    j = _joints()
    j[1] = np.nan
    out = frame_features(j, spec)
    np.testing.assert_array_equal(out[1], 0)
    assert np.isfinite(out).all()


def test_translation_and_scale_invariance_per_frame():
    spec = InputSpec(LAYOUT, fps=30)
    j = _joints()
    rng = np.random.default_rng(1)
    moved = 2.5 * j + rng.normal(size=(5, 1, 3)).astype(np.float32) * 10  # per-frame shift
    np.testing.assert_allclose(frame_features(moved, spec), frame_features(j, spec), atol=1e-4)


def test_normalised_root_is_origin():
    spec = InputSpec(LAYOUT, fps=30)
    n = normalise_joints(_joints(), spec)
    root = n[:, list(get_layout(LAYOUT).root)].mean(axis=1)
    np.testing.assert_allclose(root, 0, atol=1e-5)


def test_first_frame_mode_keeps_global_motion():
    spec = InputSpec(LAYOUT, fps=30, root_mode="first_frame")
    j = _joints()
    moved = j + np.arange(5, dtype=np.float32)[:, None, None]  # drifts over time
    a, b = frame_features(j, spec), frame_features(moved, spec)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert not np.allclose(a[4], b[4])


def test_features_concatenated_by_input_kind():
    j = _joints()
    f = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    f[0, 0] = np.nan
    both = frame_features(j, InputSpec(LAYOUT, 30, input_kind="both", feature_dim=4), f)
    assert both.shape == (5, 126 + 4)
    np.testing.assert_array_equal(both[:, 126:][1:], f[1:])
    assert both[0, 126] == 0  # NaN feature -> 0
    only = frame_features(None, InputSpec(LAYOUT, 30, input_kind="features", feature_dim=4), f)
    np.testing.assert_array_equal(only, both[:, 126:])


def test_missing_or_wrong_features_raise():
    spec = InputSpec(LAYOUT, 30, input_kind="both", feature_dim=4)
    with pytest.raises(ValueError, match="features: required"):
        frame_features(_joints(), spec)
    with pytest.raises(ValueError, match="expected last dim 4"):
        frame_features(_joints(), spec, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="leading dims"):
        assemble(_joints(), spec, np.zeros((4, 4), np.float32))


def test_spec_round_trip_and_validation():
    spec = InputSpec("penn13", fps=30.0, root_mode="first_frame")
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert spec.input_dim == 13 * 2
    with pytest.raises(ValueError, match="unknown keys"):
        InputSpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="root_mode"):
        InputSpec(LAYOUT, 30, root_mode="first")
    with pytest.raises(ValueError, match="feature_dim"):
        InputSpec(LAYOUT, 30, input_kind="both")
    with pytest.raises(ValueError, match="unknown layout"):
        InputSpec("nope", 30)


def test_module_does_not_import_torch():
    # the serving engine imports preprocess and must stay torch-free
    code = "import sys, masa_rt.preprocess; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

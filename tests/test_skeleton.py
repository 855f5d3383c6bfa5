"""Tests for masa_rt.skeleton: layout tables, geometry invariants, conversions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt import skeleton as sk

LAYOUT_NAMES = sorted(sk.LAYOUTS)


def _joints(layout: sk.Layout, seed: int, frames: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(frames, layout.num_joints, layout.dims))


layouts = st.sampled_from(LAYOUT_NAMES).map(sk.get_layout)
seeds = st.integers(0, 2**32 - 1)


# --- layout tables -------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_layout_tables_are_consistent(name: str) -> None:
    lay = sk.get_layout(name)
    j = lay.num_joints
    assert len(lay.parents) == len(lay.mirror) == j
    assert len(set(lay.joint_names)) == j
    assert all(p == -1 or 0 <= p < i for i, p in enumerate(lay.parents))
    assert all(lay.mirror[lay.mirror[i]] == i for i in range(j))
    assert all(0 <= k < j for k in lay.root)
    assert all(0 <= a < j and 0 <= b < j and a != b for a, b in lay.ref_bone)


@pytest.mark.parametrize("name,joints,dims", [
    ("h2o_hands", 42, 3), ("mediapipe_hand21", 21, 3), ("openxr_hands26", 52, 3),
    ("body25", 25, 3), ("penn13", 13, 2),
])
def test_layout_sizes(name: str, joints: int, dims: int) -> None:
    lay = sk.get_layout(name)
    assert (lay.num_joints, lay.dims, lay.up_axis) == (joints, dims, 1)


def test_named_joints_land_where_the_sources_put_them() -> None:
    h2o, oxr = sk.get_layout("h2o_hands"), sk.get_layout("openxr_hands26")
    assert h2o.joint_names[:6] == ("l_wrist", "l_thumb1", "l_thumb2", "l_thumb3", "l_thumb4",
                                   "l_index1")
    assert h2o.joint_names[21] == "r_wrist" and h2o.root == (0, 21)
    assert h2o.ref_bone == ((0, h2o.index("l_middle1")), (21, h2o.index("r_middle1")))
    assert oxr.joint_names[:3] == ("l_palm", "l_wrist", "l_thumb_metacarpal")
    assert oxr.joint_names[25] == "l_little_tip" and oxr.joint_names[26] == "r_palm"
    body = sk.get_layout("body25")
    assert body.joint_names[8] == "MidHip" and body.root == (8,)
    assert body.mirror[body.index("LBigToe")] == body.index("RBigToe")
    penn = sk.get_layout("penn13")
    assert penn.root == (penn.index("l_hip"), penn.index("r_hip"))
    assert penn.mirror[penn.index("head")] == penn.index("head")
    mp = sk.get_layout("mediapipe_hand21")
    assert mp.mirror == tuple(range(21)) and mp.joint_names[5] == "index_mcp"


def test_unknown_layout_lists_known_ones() -> None:
    known = "body25, coco17, h2o_hands, mediapipe_hand21, mediapipe_pose33"
    with pytest.raises(sk.UnknownLayoutError, match=f"known layouts: {known}"):
        sk.get_layout("hands17")
    assert issubclass(sk.UnknownLayoutError, ValueError)


def test_bad_layout_table_is_rejected() -> None:
    with pytest.raises(ValueError, match="mirror"):
        sk.Layout("bad", ("a", "b"), (-1, 0), (1, 1), root=(0,), ref_bone=((0, 1),), dims=3)
    with pytest.raises(ValueError, match="parents"):  # a cycle
        sk.Layout("bad", ("a", "b"), (1, 0), (0, 1), root=(0,), ref_bone=((0, 1),), dims=3)
    with pytest.raises(ValueError, match="parents"):  # its own parent
        sk.Layout("bad", ("a", "b"), (0, -1), (0, 1), root=(0,), ref_bone=((0, 1),), dims=3)
    # a parent after its child is a tree all the same (declared layouts keep their order)
    lay = sk.Layout("ok", ("a", "b"), (1, -1), (0, 1), root=(0,), ref_bone=((0, 1),), dims=3)
    assert sk.topological_order(lay.parents) == [1, 0]


# --- mirror --------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(layouts, seeds, st.integers(0, 1))
def test_mirror_twice_is_identity(lay: sk.Layout, seed: int, axis: int) -> None:
    x = _joints(lay, seed)
    np.testing.assert_array_equal(sk.mirror(sk.mirror(x, lay, axis), lay, axis), x)


def test_mirror_swaps_hands_and_negates_axis() -> None:
    lay = sk.get_layout("h2o_hands")
    x = _joints(lay, 0)
    m = sk.mirror(x, lay, axis=0)
    np.testing.assert_array_equal(m[:, 21, 0], -x[:, 0, 0])
    np.testing.assert_array_equal(m[:, 21, 1:], x[:, 0, 1:])


# --- normalise -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(layouts, seeds, st.floats(0.1, 10.0), st.floats(-100, 100), st.booleans())
def test_normalise_invariant_to_translation_and_scale(
    lay: sk.Layout, seed: int, scale: float, shift: float, first_frame: bool
) -> None:
    x = _joints(lay, seed)
    mode = "first_frame" if first_frame else "per_frame"
    moved = scale * x + shift * np.arange(1, lay.dims + 1)
    np.testing.assert_allclose(sk.normalise(moved, lay, mode), sk.normalise(x, lay, mode),
                               atol=1e-9)


def test_normalise_centres_root_and_unit_ref_bone() -> None:
    lay = sk.get_layout("body25")
    y = sk.normalise(_joints(lay, 1, frames=3), lay)
    np.testing.assert_allclose(y[:, 8], 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y[:, 1] - y[:, 8], axis=-1), 1.0)


def test_normalise_first_frame_keeps_global_motion() -> None:
    lay = sk.get_layout("mediapipe_hand21")
    x = np.repeat(_joints(lay, 2, frames=1), 3, axis=0)
    x[1] += 5.0
    y = sk.normalise(x, lay, "first_frame")
    np.testing.assert_allclose(y[0, 0], 0, atol=1e-12)
    assert np.all(y[1] > y[0])


@settings(max_examples=30, deadline=None)
@given(layouts, seeds, st.data())
def test_nan_joints_stay_nan_and_do_not_poison(lay: sk.Layout, seed: int, data) -> None:
    x = _joints(lay, seed)
    # Root and reference-bone joints change every other joint when missing, by design.
    protected = set(lay.root) | {k for pair in lay.ref_bone for k in pair}
    candidates = [i for i in range(lay.num_joints) if i not in protected]
    missing = np.zeros(lay.num_joints, bool)
    missing[data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True))] = True
    x_nan = x.copy()
    x_nan[:, missing] = np.nan
    cases = [
        (lambda a: sk.normalise(a, lay), missing),
        (lambda a: sk.rotate(a, np.eye(lay.dims)), missing),
        (lambda a: sk.mirror(a, lay), missing[list(lay.mirror)]),  # NaNs move with joints
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op, expect_nan in cases:
            out, ref = op(x_nan), op(x)
            assert np.isnan(out[:, expect_nan]).all()
            np.testing.assert_allclose(out[:, ~expect_nan], ref[:, ~expect_nan])


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_all_nan_frame_stays_nan_without_warnings(name: str) -> None:
    lay = sk.get_layout(name)
    x = _joints(lay, 3, frames=3)
    x[1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_frame = sk.normalise(x, lay)
        first = sk.normalise(x[None], lay, "first_frame")[0]
        all_nan = sk.normalise(np.full_like(x, np.nan), lay, "first_frame")
    assert np.isnan(per_frame[1]).all() and np.isfinite(per_frame[[0, 2]]).all()
    assert np.isnan(first[1]).all() and np.isfinite(first[[0, 2]]).all()
    assert np.isnan(all_nan).all()


def test_first_frame_skips_leading_missing_frames() -> None:
    lay = sk.get_layout("penn13")
    x = _joints(lay, 4, frames=3)
    x[0] = np.nan
    y = sk.normalise(x, lay, "first_frame")
    np.testing.assert_allclose(y[1], sk.normalise(x[1], lay))


def test_zero_or_missing_ref_bone_leaves_scale_one() -> None:
    lay = sk.get_layout("body25")
    x = _joints(lay, 5, frames=2)
    x[0, 1] = x[0, 8]          # neck on midhip: zero-length reference bone
    x[1, 1] = np.nan           # neck missing: no reference bone at all
    y = sk.normalise(x, lay)
    assert np.isfinite(y[0]).all()
    np.testing.assert_allclose(y[0], x[0] - x[0, 8])
    np.testing.assert_allclose(y[1, 2:], x[1, 2:] - x[1, 8])


def test_normalise_rejects_wrong_shape_and_mode() -> None:
    lay = sk.get_layout("h2o_hands")
    with pytest.raises(ValueError, match=r"\(\.\.\., 42, 3\)"):
        sk.normalise(np.zeros((4, 21, 3)), lay)
    with pytest.raises(ValueError, match="root_mode"):
        sk.normalise(np.zeros((4, 42, 3)), lay, "median")


# --- rotate --------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(0, 2), st.floats(-np.pi, np.pi))
def test_rotation_preserves_bone_lengths_and_inverts(seed: int, axis: int, angle: float) -> None:
    lay = sk.get_layout("h2o_hands")
    x = _joints(lay, seed)
    R = sk.rotation_about(axis, angle)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    y = sk.rotate(x, R)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    np.testing.assert_allclose(y[..., axis], x[..., axis], atol=1e-12)
    np.testing.assert_allclose(sk.rotate(y, R.T), x, atol=1e-12)


def test_rotate_broadcasts_per_frame_matrices() -> None:
    lay = sk.get_layout("penn13")
    x = _joints(lay, 6, frames=5)
    angles = np.linspace(0, 1, 5)
    y = sk.rotate(x, sk.rotation_2d(angles))
    for t in range(5):
        np.testing.assert_allclose(y[t], x[t] @ sk.rotation_2d(angles[t]).T)
    np.testing.assert_allclose(sk.rotation_about(2, np.pi / 2) @ [1, 0, 0], [0, 1, 0],
                               atol=1e-12)
    with pytest.raises(ValueError, match="R"):
        sk.rotate(x, np.eye(3))


# --- convert -------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(seeds)
def test_openxr_to_h2o_copies_shared_joints_exactly(seed: int) -> None:
    oxr, h2o = sk.get_layout("openxr_hands26"), sk.get_layout("h2o_hands")
    x = _joints(oxr, seed).astype(np.float32)
    y = sk.convert(x, oxr, h2o)
    assert y.shape == (4, 42, 3) and y.dtype == np.float32
    pairs = {"wrist": "wrist", "thumb1": "thumb_metacarpal", "thumb4": "thumb_tip",
             "index1": "index_proximal", "index2": "index_intermediate",
             "middle3": "middle_distal", "pinky1": "little_proximal", "pinky4": "little_tip"}
    for side in "lr":
        for h_name, o_name in pairs.items():
            np.testing.assert_array_equal(y[:, h2o.index(f"{side}_{h_name}")],
                                          x[:, oxr.index(f"{side}_{o_name}")])
    # Every h2o joint is an exact copy of some distinct openxr joint.
    sources = {i for k in range(42) for i in range(52) if np.array_equal(y[:, k], x[:, i])}
    assert len(sources) == 42


def test_h2o_to_openxr_roundtrip_and_missing_joints() -> None:
    oxr, h2o = sk.get_layout("openxr_hands26"), sk.get_layout("h2o_hands")
    x = _joints(h2o, 7)
    back = sk.convert(x, h2o, oxr)
    missing = np.isnan(back).all(axis=(0, 2))
    assert {oxr.joint_names[i] for i in np.flatnonzero(missing)} == {
        f"{s}_{j}" for s in "lr" for j in
        ("palm", "index_metacarpal", "middle_metacarpal", "ring_metacarpal",
         "little_metacarpal")}
    np.testing.assert_array_equal(sk.convert(back, oxr, h2o), x)


@pytest.mark.parametrize("hand,offset", [("left", 0), ("right", 21)])
def test_mediapipe_to_h2o_and_back(hand: str, offset: int) -> None:
    mp = sk.get_layout("mediapipe_hand21")
    x = _joints(mp, 8)
    y = sk.convert(x, mp, "h2o_hands", hand=hand)
    np.testing.assert_array_equal(y[:, offset:offset + 21], x)
    assert np.isnan(np.delete(y, range(offset, offset + 21), axis=1)).all()
    np.testing.assert_array_equal(sk.convert(y, "h2o_hands", mp, hand=hand), x)


def test_convert_errors_are_clear() -> None:
    x = np.zeros((2, 21, 3))
    with pytest.raises(ValueError, match="hand"):
        sk.convert(x, "mediapipe_hand21", "h2o_hands")
    with pytest.raises(sk.UnsupportedConversionError, match="body25 to h2o_hands"):
        sk.convert(np.zeros((2, 25, 3)), "body25", "h2o_hands")
    with pytest.raises(ValueError, match="joints"):
        sk.convert(x, "h2o_hands", "openxr_hands26")
    np.testing.assert_array_equal(sk.convert(x, "mediapipe_hand21", "mediapipe_hand21"), x)


# --- flatten -------------------------------------------------------------------------------

def test_flatten_frames_zero_fills_missing_and_valid_mask() -> None:
    lay = sk.get_layout("penn13")
    x = _joints(lay, 9, frames=2)
    x[1, 3, 0] = np.nan
    flat = sk.flatten_frames(x)
    assert flat.shape == (2, 26) and flat.dtype == np.float32
    assert flat[1, 6] == 0 and np.isfinite(flat).all()
    mask = sk.valid_mask(x)
    assert mask.shape == (2, 13) and not mask[1, 3] and mask.sum() == 25


def test_coco17_converts_to_penn13_by_name_with_the_nose_as_head() -> None:
    coco = sk.get_layout("coco17")
    x = np.arange(17 * 2, dtype=np.float32).reshape(17, 2)
    x[coco.joint_names.index("l_knee")] = np.nan
    y = sk.convert(x, "coco17", "penn13")
    penn = sk.get_layout("penn13").joint_names
    np.testing.assert_array_equal(y[penn.index("head")], x[coco.joint_names.index("nose")])
    for name in penn[1:]:
        if name != "l_knee":
            np.testing.assert_array_equal(y[penn.index(name)], x[coco.joint_names.index(name)])
    assert np.isnan(y[penn.index("l_knee")]).all()  # missing stays missing
    # mirroring then converting is converting then mirroring (left/right kept apart)
    np.testing.assert_array_equal(sk.convert(sk.mirror(x, coco), coco, "penn13"),
                                  sk.mirror(y, "penn13"))
    with pytest.raises(sk.UnsupportedConversionError, match="coco17 -> penn13"):
        sk.conversion_map("penn13", "coco17")
    with pytest.raises(sk.UnsupportedConversionError, match="hand"):
        sk.conversion_map("mediapipe_hand21", "h2o_hands")  # which hand is it?


def test_mediapipe_pose33_converts_to_penn13_and_mirrors_left_and_right() -> None:
    mp = sk.get_layout("mediapipe_pose33")
    assert mp.num_joints == 33 and mp.dims == 2
    names = mp.joint_names
    assert names[mp.mirror[names.index("mouth_left")]] == "mouth_right"
    assert names[mp.mirror[names.index("left_eye_inner")]] == "right_eye_inner"
    x = np.random.default_rng(0).normal(size=(33, 2)).astype(np.float32)
    y = sk.convert(x, mp, "penn13")
    penn = sk.get_layout("penn13").joint_names
    np.testing.assert_array_equal(y[penn.index("head")], x[names.index("nose")])
    np.testing.assert_array_equal(y[penn.index("r_knee")], x[names.index("right_knee")])
    np.testing.assert_array_equal(sk.convert(sk.mirror(x, mp), mp, "penn13"),
                                  sk.mirror(y, "penn13"))

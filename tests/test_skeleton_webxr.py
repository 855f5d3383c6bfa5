"""The ``webxr_hands25`` layout (WebXR Hand Input) and its conversion to ``h2o_hands``."""

from __future__ import annotations

import numpy as np

from masa_rt.skeleton import LAYOUTS, conversion_map, convert


def test_webxr_layout_is_two_hands_of_the_spec_joints():
    lay = LAYOUTS["webxr_hands25"]
    assert lay.num_joints == 50 and lay.dims == 3
    assert lay.joint_names[:5] == ("l_wrist", "l_thumb-metacarpal", "l_thumb-phalanx-proximal",
                                   "l_thumb-phalanx-distal", "l_thumb-tip")
    assert lay.joint_names[24] == "l_pinky-finger-tip" and lay.joint_names[25] == "r_wrist"
    assert lay.parents[lay.index("l_index-finger-metacarpal")] == lay.index("l_wrist")
    assert lay.mirror[0] == 25


def test_webxr_to_h2o_copies_the_same_anatomy_as_openxr():
    src, h2o = LAYOUTS["webxr_hands25"], LAYOUTS["h2o_hands"]
    m = conversion_map("webxr_hands25", "h2o_hands")
    pairs = {h2o.joint_names[d]: src.joint_names[s] for d, s in enumerate(m)}
    assert pairs["l_wrist"] == "l_wrist" and pairs["r_thumb1"] == "r_thumb-metacarpal"
    assert pairs["l_index1"] == "l_index-finger-phalanx-proximal"
    assert pairs["r_pinky4"] == "r_pinky-finger-tip"
    assert not any("metacarpal" in n and "thumb" not in n for n in pairs.values())
    # Through the hub, WebXR and OpenXR agree joint for joint on everything MANO keeps.
    joints = np.random.default_rng(0).normal(size=(4, 50, 3)).astype(np.float32)
    via_openxr = convert(convert(joints, "webxr_hands25", "openxr_hands26"), "openxr_hands26",
                         "h2o_hands")
    np.testing.assert_array_equal(convert(joints, "webxr_hands25", "h2o_hands"), via_openxr)

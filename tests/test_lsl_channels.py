"""clients.lsl_channels: an LSL stream's channel labels / count -> a masa-rt layout."""

from __future__ import annotations

import numpy as np
import pytest

from clients.lsl_channels import ChannelMapError, map_channels
from masa_rt.skeleton import get_layout


def _labels(layout: str, sep: str = "_") -> list[str]:
    lay = get_layout(layout)
    return [f"{j}{sep}{a}" for j in lay.joint_names for a in "xyz"[:lay.dims]]


@pytest.mark.parametrize("layout", ["h2o_hands", "penn13", "coco17", "openxr_hands26"])
def test_labels_alone_name_the_layout(layout):
    labels = _labels(layout)
    cmap = map_channels(labels, len(labels))
    assert cmap.layout == layout and not cmap.missing_joints
    sample = np.arange(len(labels), dtype=np.float32)
    assert np.array_equal(cmap.joints(sample).reshape(-1), sample)  # wire order: as is


def test_channels_in_any_order_and_spelling_land_on_their_joints():
    labels = _labels("penn13", sep=".")
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = [labels[i].upper() for i in order]
    cmap = map_channels(shuffled, len(shuffled), "penn13")
    sample = order.astype(np.float32)  # channel k carries the value of coordinate order[k]
    assert np.array_equal(cmap.joints(sample).reshape(-1), np.arange(len(labels)))


def test_joints_the_stream_lacks_are_nan():
    labels = [f"{j}_{a}" for j in ("l_wrist", "r_wrist") for a in "xyz"]
    cmap = map_channels(labels, 6, "h2o_hands")
    joints = cmap.joints(np.ones(6, np.float32))
    names = get_layout("h2o_hands").joint_names
    observed = [names[j] for j in np.flatnonzero(~np.isnan(joints).any(axis=1))]
    assert observed == ["l_wrist", "r_wrist"] and len(cmap.missing_joints) == 40


def test_unlabelled_channels_need_the_layout_and_its_count():
    assert map_channels(None, 26, "penn13").layout == "penn13"
    assert map_channels([""] * 26, 26, "penn13").layout == "penn13"
    with pytest.raises(ChannelMapError, match="have no labels: name the layout"):
        map_channels(None, 126)  # a count never decides the layout
    with pytest.raises(ChannelMapError, match="27 unlabelled channels, but layout penn13 has 13"):
        map_channels(None, 27, "penn13")


@pytest.mark.parametrize("labels, layout, message", [
    (["wrist"], "mediapipe_hand21", "channel 0 label 'wrist' is not <joint>_<x|y|z>"),
    (["wrist_x", "wrist_x"], "mediapipe_hand21", "channels 0 and 1 are both 'wrist_x'"),
    (["elbow_x"], "mediapipe_hand21", r"channel 0 \(elbow_x\) is not a joint of layout"),
    (["head_x", "head_y", "head_z"], "penn13", r"channel 2 \(head_z\): layout penn13 is 2D"),
    (["wrist_x", "wrist_y"], "mediapipe_hand21", "joint wrist has only some of its 3 axes"),
    (["wrist_x"], "no_such", "unknown layout 'no_such'"),
    (["foo_x", "foo_y"], None, "fit no layout"),
    (["l_shoulder_x", "l_shoulder_y"], None, "fit layouts coco17, penn13 in part"),
])
def test_channels_that_do_not_map_are_one_line(labels, layout, message):
    with pytest.raises(ChannelMapError, match=message) as err:
        map_channels(labels, len(labels), layout)
    assert "\n" not in str(err.value)


def test_a_description_that_disagrees_with_the_count_is_refused():
    with pytest.raises(ChannelMapError, match="says 3 channels but describes 2"):
        map_channels(["a_x", "a_y"], 3)


def test_the_bridge_and_the_recorder_import_without_torch_or_pylsl():
    """Serving-side modules: torch never; pylsl only when a bridge starts (an extra)."""
    import subprocess
    import sys

    code = ("import sys, clients.lsl_bridge, clients.lsl_channels, engine.recorder, "
            "masa_rt.labels; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'pylsl' not in sys.modules, 'pylsl imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

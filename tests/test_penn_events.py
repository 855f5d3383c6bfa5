"""Penn Action key-event rules on hand-made trajectories, and ``import-penn --events``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt import penn_events as pe
from masa_rt.cli import main
from masa_rt.penn import import_penn
from masa_rt.sequence import load_sequence
from tests.test_penn import write_mat

LEG = 50.0  # thigh = shin length, pixels


def squat_joints(bend: np.ndarray) -> np.ndarray:
    """A side-view squatter whose knees bend by ``bend`` radians (0 = standing)."""
    ankle = np.array([200.0, 300.0])
    knee = ankle + LEG * np.stack([np.sin(bend), -np.cos(bend)], -1)
    hip = knee + LEG * np.stack([-np.sin(bend), -np.cos(bend)], -1)
    shoulder = hip + [10.0, -60.0]
    pts = {pe.HEAD: shoulder + [0, -20], pe.L_SH: shoulder, pe.R_SH: shoulder,
           pe.L_EL: shoulder + [20, 10], pe.R_EL: shoulder + [20, 10],
           pe.L_WR: shoulder + [40, 0], pe.R_WR: shoulder + [40, 0],
           pe.L_HIP: hip, pe.R_HIP: hip, pe.L_KNEE: knee, pe.R_KNEE: knee,
           pe.L_ANK: ankle + 0 * hip, pe.R_ANK: ankle + 0 * hip}
    return np.stack([pts[j] for j in range(13)], 1).astype(np.float32)


def cosine_reps(reps: int, period: int, depth: float = 1.0, lead: int = 5) -> np.ndarray:
    """Bend angle: standing for ``lead`` frames, then ``reps`` smooth squats."""
    t = np.arange(reps * period)
    bend = 0.1 + depth * 0.5 * (1 - np.cos(2 * np.pi * t / period))
    return np.concatenate([np.full(lead, 0.1), bend, np.full(lead, 0.1)])


def test_three_squats_give_exact_boundaries():
    period, lead = 40, 5
    labels = pe.label_video("squat", squat_joints(cosine_reps(3, period, lead=lead)))
    assert isinstance(labels, pe.Labels)
    bottoms = lead + period // 2 + period * np.arange(3)
    tops = lead + period * np.arange(1, 3)
    assert np.abs(labels.keys - bottoms).max() <= 1
    assert np.abs(np.sort(labels.events) - np.sort([*bottoms, *tops])).max() <= 2
    runs = labels.phases[np.r_[0, np.flatnonzero(np.diff(labels.phases)) + 1]]
    assert runs.tolist() == [0, 1, 0, 1, 0, 1]
    assert labels.phase_names == ("descend", "ascend")
    assert labels.phases.dtype == np.int32 and len(labels.phases) == 3 * period + 2 * lead
    assert pe.second_agreement("squat", squat_joints(cosine_reps(3, period)), labels)


@settings(max_examples=25, deadline=None)
@given(reps=st.integers(1, 4), period=st.integers(30, 60), depth=st.floats(0.6, 1.2))
def test_squat_finds_every_rep(reps, period, depth):
    labels = pe.label_video("squat", squat_joints(cosine_reps(reps, period, depth)))
    assert isinstance(labels, pe.Labels)
    assert len(labels.keys) == reps
    assert set(np.unique(labels.phases)) <= {0, 1}
    assert np.all(np.diff(labels.events) > 0)


def test_tiny_motion_is_undecided():
    joints = squat_joints(cosine_reps(2, 40, depth=0.05))
    result = pe.label_video("squat", joints)
    assert isinstance(result, pe.Undecided) and result.reason == "motion too small"


def test_mostly_invisible_hips_are_undecided():
    joints = squat_joints(cosine_reps(2, 40))
    joints[::2, [pe.L_HIP, pe.R_HIP]] = np.nan  # half the frames
    result = pe.label_video("squat", joints)
    assert result == pe.Undecided("joints missing",
                                  "hip height over ankles invisible in 50% of frames")


def test_short_clip_is_undecided():
    result = pe.label_video("squat", squat_joints(np.full(10, 0.1)))
    assert isinstance(result, pe.Undecided) and result.reason == "too short"


def test_a_held_bottom_is_undecided():
    bend = np.concatenate([np.linspace(0.1, 1.1, 20), np.full(30, 1.1), np.linspace(1.1, 0.1, 20)])
    result = pe.label_video("squat", squat_joints(bend))
    assert isinstance(result, pe.Undecided) and result.reason == "no clear extremum"
    assert "held" in result.detail


def golf_joints(knots_t: list[int], knots_h: list[float]) -> np.ndarray:
    """A golfer whose wrists rise ``h`` torso lengths over the hips at the knot frames."""
    t = np.arange(knots_t[-1] + 1)
    h = np.interp(t, knots_t, knots_h)
    joints = squat_joints(np.full(len(t), 0.1))
    hip_y = joints[:, pe.L_HIP, 1]
    torso = hip_y - joints[:, pe.L_SH, 1]
    for w in pe.WRISTS:
        joints[:, w] = np.stack([joints[:, pe.L_ANK, 0], hip_y + 20 - h * torso], -1)
    return joints


def test_one_golf_swing_has_three_phases():
    joints = golf_joints([0, 10, 25, 35, 45, 55], [0, 0, 1.5, 0, 1.8, 1.8])
    labels = pe.label_video("golf_swing", joints)
    assert isinstance(labels, pe.Labels)
    assert labels.phase_names == ("backswing", "downswing", "follow_through")
    assert np.abs(labels.events - [25, 35]).max() <= 1
    assert labels.phases[0] == 0 and labels.phases[30] == 1 and labels.phases[-1] == 2
    assert pe.second_agreement("golf_swing", joints, labels) is True


def test_two_golf_swings_are_undecided():
    joints = golf_joints([0, 10, 25, 35, 45, 55, 70, 80, 90],
                         [0, 0, 1.5, 0, 1.8, 0, 1.5, 0, 1.8])
    result = pe.label_video("golf_swing", joints)
    assert isinstance(result, pe.Undecided) and result.reason == "several swings"


def test_a_swing_without_follow_through_is_undecided():
    joints = golf_joints([0, 10, 25, 35, 45], [0, 0, 1.5, 0, 0])
    result = pe.label_video("golf_swing", joints)
    assert isinstance(result, pe.Undecided) and result.reason == "incomplete swing"


def test_agreement_needs_same_count_and_timing():
    assert pe.agreement(np.array([10, 50]), np.array([52, 12]), tol=3)
    assert not pe.agreement(np.array([10, 50]), np.array([10, 55]), tol=3)
    assert not pe.agreement(np.array([10]), np.array([10, 50]), tol=3)


# ---------------------------------------------------------------------------------------
# import-penn --events
# ---------------------------------------------------------------------------------------

def write_video(path, joints: np.ndarray, action: str, train: int) -> None:
    t = len(joints)
    write_mat(path, t=t, action=action, train=train, x=joints[..., 0].astype(float),
              y=joints[..., 1].astype(float), visibility=np.ones((t, 13), np.uint8),
              nframes=np.array([[t]], np.int32))


@pytest.fixture
def labels_dir(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    write_video(folder / "0001.mat", squat_joints(cosine_reps(2, 40)), "squat", 1)
    write_video(folder / "0002.mat", squat_joints(cosine_reps(1, 40)), "squat", -1)
    write_video(folder / "0003.mat", squat_joints(cosine_reps(2, 40, depth=0.05)), "squat", 1)
    write_mat(folder / "0004.mat", t=30, action="strum_guitar")  # no rule for this action
    return folder


def test_import_with_events_labels_and_counts(labels_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import-penn", str(labels_dir), "--out", str(out), "--events"]) == 0
    assert "squat" in capsys.readouterr().out.split("event phase labels")[1]
    first = load_sequence(out / "0001.npz")
    assert first.phase_names == ("descend", "ascend") and len(first.phases) == 90
    assert load_sequence(out / "0003.npz").phases is None  # undecided, still written
    assert load_sequence(out / "0004.npz").phases is None
    squat = json.loads((out / "events.json").read_text())["actions"]["squat"]
    assert squat["videos"] == {"train": 2, "val": 1}
    assert squat["labelled"] == {"train": 1, "val": 1}
    assert squat["undecided"] == {"motion too small": 1}
    assert squat["labelled_ids"] == {"train": ["0001"], "val": ["0002"]}
    assert squat["second_signal"] == {"name": "knee angle", "checked": 2, "agree": 2}
    assert list(json.loads((out / "events.json").read_text())["actions"]) == ["squat"]


def test_import_without_events_is_unchanged(labels_dir, tmp_path):
    manifest = import_penn(labels_dir, tmp_path / "out", progress=False)
    assert len(manifest.files) == 4
    assert not (tmp_path / "out" / "events.json").exists()
    assert all(load_sequence(tmp_path / "out" / e.file).phases is None for e in manifest.files)


def test_two_workers_give_the_same_events(labels_dir, tmp_path):
    import_penn(labels_dir, tmp_path / "a", workers=1, progress=False, events=True)
    import_penn(labels_dir, tmp_path / "b", workers=2, progress=False, events=True)
    assert (tmp_path / "a" / "events.json").read_text() == \
        (tmp_path / "b" / "events.json").read_text()
    np.testing.assert_array_equal(load_sequence(tmp_path / "a" / "0001.npz").phases,
                                  load_sequence(tmp_path / "b" / "0001.npz").phases)

"""Tests for masa_rt.synth: geometry, timing ground truth, variation, perturbations, files."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from masa_rt import skeleton
from masa_rt.sequence import Dataset, load_sequence
from masa_rt.synth import (
    ACTIVITIES,
    BODY_ACTIVITIES,
    HAND_ACTIVITIES,
    Perturbation,
    Variation,
    generate,
    minimum_jerk,
    run_cli,
    sequence_rng,
    write_dataset,
    write_datasets,
    write_examples,
)
from masa_rt.synth.activities import resolve
from masa_rt.synth.hand import HandPose, HandShape, hand_fk

# Everything random about the subject and viewpoint, but no noise and no missing joints:
# geometry must then be exact up to float32 rounding.
NOISELESS = Variation(tremor_m=0.0, noise_m=0.0, drop_rate=0.0, dropouts_per_10s=0.0)


def rng(k: int = 0) -> np.random.Generator:
    return np.random.default_rng(k)


def bone_lengths(joints: np.ndarray, layout: str) -> np.ndarray:
    """(T, bones) length of every parent -> child bone."""
    lay = skeleton.get_layout(layout)
    child = [i for i, p in enumerate(lay.parents) if p >= 0]
    parent = [lay.parents[i] for i in child]
    return np.linalg.norm(joints[:, child] - joints[:, parent], axis=-1)


def runs(values: np.ndarray) -> list[int]:
    """Values with consecutive duplicates collapsed: [0, 0, 1, 1, 0] -> [0, 1, 0]."""
    keep = np.concatenate([[True], values[1:] != values[:-1]])
    return values[keep].tolist()


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

def test_minimum_jerk_endpoints_and_shape():
    t = np.linspace(0, 1, 1001)
    s = minimum_jerk(t)
    assert s[0] == 0.0 and s[-1] == 1.0 and minimum_jerk(np.array(0.5)) == pytest.approx(0.5)
    assert np.all(np.diff(s) >= 0)
    v = np.gradient(s, t)
    a = np.gradient(v, t)
    assert abs(v[0]) < 1e-5 and abs(v[-1]) < 1e-5          # starts and stops at rest
    assert abs(a[1]) < 0.1 and abs(a[-2]) < 0.1             # ... and without a jolt
    assert v.max() == pytest.approx(1.875, abs=1e-3)        # 30/16, the textbook peak


def test_activity_catalogue():
    assert len(HAND_ACTIVITIES) >= 6 and len(BODY_ACTIVITIES) >= 4
    for name in HAND_ACTIVITIES:
        assert 4 <= len(ACTIVITIES[name].phases) <= 10
    for name in BODY_ACTIVITIES:
        assert 3 <= len(ACTIVITIES[name].phases) <= 6
    # Shared sub-motions make activities similar: several share 'lift' and 'release'.
    with_lift = [n for n in HAND_ACTIVITIES if "lift" in ACTIVITIES[n].phase_names]
    assert len(with_lift) >= 3
    assert all("return" in ACTIVITIES[n].phase_names for n in HAND_ACTIVITIES)
    assert resolve(["body", "pour_milk"]) == ["pour_milk", *BODY_ACTIVITIES]
    with pytest.raises(ValueError, match="make_tea"):
        resolve(["make_tea"])


def test_hand_looks_like_a_hand():
    shape = HandShape.default()

    def pose(grasp: str) -> np.ndarray:
        return hand_fk(HandPose((0, 1, 0), (0, 0, 0), grasp).vector()[None], shape, "right")[0]

    open_, power = pose("open"), pose("power")
    # Palm down, fingers forward (-z): every fingertip is in front of the wrist.
    tips = [4, 8, 12, 16, 20]
    assert np.all(open_[tips, 2] < open_[0, 2] - 0.05)
    # Right hand: thumb towards the midline (-x), pinky outwards.
    assert open_[1, 0] < open_[0, 0] < open_[17, 0]
    # A closed grasp brings the fingertips down (palmar, -y) and the thumb to the fingers.
    assert np.all(power[tips[1:], 1] < open_[tips[1:], 1] - 0.02)
    assert (np.linalg.norm(power[4] - power[8]) < np.linalg.norm(open_[4] - open_[8]) - 0.03)
    # Left hand = the mirror image of the right hand.
    left = hand_fk(HandPose((0, 1, 0)).mirrored().vector()[None], shape, "left")[0]
    right = hand_fk(HandPose((0, 1, 0)).vector()[None], shape, "right")[0]
    np.testing.assert_allclose(left, right * np.array([-1, 1, 1]), atol=1e-12)


# ---------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("activity", list(ACTIVITIES))
def test_sequence_fields_and_unperturbed_ground_truth(activity):
    spec = ACTIVITIES[activity]
    seq = generate(activity, sequence_rng(7, activity, 0))
    seq.validate()
    t = seq.num_frames
    assert seq.layout == spec.layout and seq.fps == 30.0
    assert seq.joints.shape == (t, 42 if spec.group == "hands" else 25, 3)
    assert seq.joints.dtype == np.float32 and seq.activity == activity and seq.source == "synth"
    assert seq.phase_names == spec.phase_names
    assert np.all(np.diff(seq.phases) >= 0)                     # in order ...
    assert set(seq.phases.tolist()) == set(range(len(spec.phases)))  # ... and all present
    ct = seq.canonical_time
    assert ct.min() >= 0 and ct.max() <= 1 and np.all(np.diff(ct) >= 0)
    assert ct[0] == 0 and ct[-1] > 0.97
    np.testing.assert_allclose(np.diff(seq.timestamps), 1 / 30)


def test_determinism_by_seed():
    a = generate("stir_cup", sequence_rng(3, "stir_cup", 5), features=8)
    b = generate("stir_cup", sequence_rng(3, "stir_cup", 5), features=8)
    c = generate("stir_cup", sequence_rng(4, "stir_cup", 5), features=8)
    np.testing.assert_array_equal(a.joints, b.joints)  # NaN positions included
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.canonical_time, b.canonical_time)
    assert a.num_frames != c.num_frames or not np.array_equal(a.joints, c.joints,
                                                              equal_nan=True)
    # Sequences of one dataset are independent streams: index and activity matter.
    assert not np.array_equal(sequence_rng(3, "stir_cup", 5).random(4),
                              sequence_rng(3, "stir_cup", 6).random(4))
    assert not np.array_equal(sequence_rng(3, "stir_cup", 5).random(4),
                              sequence_rng(3, "squat", 5).random(4))


def test_clean_is_canonical():
    for activity in ("pour_milk", "squat"):
        seq = generate(activity, rng(1), clean=True)
        total = ACTIVITIES[activity].durations.sum()
        assert seq.num_frames == int(np.floor(total * 30 + 1e-9)) + 1
        assert not np.isnan(seq.joints).any()
        # Speed 1, no pause: canonical time is elapsed time over the canonical duration.
        np.testing.assert_allclose(seq.canonical_time, seq.timestamps / total, atol=1e-6)
        other = generate(activity, rng(2), clean=True)
        np.testing.assert_array_equal(seq.joints, other.joints)  # no randomness left


@pytest.mark.parametrize("activity", ["pour_milk", "jumping_jack"])
def test_bone_lengths_constant_within_a_sequence(activity):
    clean = generate(activity, rng(0), clean=True)
    lengths = bone_lengths(clean.joints.astype(np.float64), clean.layout)
    np.testing.assert_allclose(lengths, lengths[:1].repeat(len(lengths), 0), atol=2e-6)
    # A random subject (size, bones, mirror, viewpoint) is rigid too, but not canonical.
    seq = generate(activity, rng(5), variation=NOISELESS)
    varied = bone_lengths(seq.joints.astype(np.float64), seq.layout)
    np.testing.assert_allclose(varied, varied[:1].repeat(len(varied), 0), atol=5e-6)
    assert np.abs(varied[0] / lengths[0] - 1).max() > 0.03


def test_mirroring_swaps_hands():
    base = Variation(tremor_m=0.0, noise_m=0.0, drop_rate=0.0, dropouts_per_10s=0.0,
                     yaw_deg=0.0, shift_m=0.0)
    right = generate("pour_milk", rng(9), variation=Variation(**{**base.__dict__,
                                                                "mirror_prob": 0.0}))
    left = generate("pour_milk", rng(9), variation=Variation(**{**base.__dict__,
                                                               "mirror_prob": 1.0}))
    np.testing.assert_allclose(left.joints, skeleton.mirror(right.joints, "h2o_hands"),
                               atol=1e-6)

    def travel(joints: np.ndarray, wrist: int) -> float:
        return float(np.linalg.norm(np.diff(joints[:, wrist], axis=0), axis=1).sum())

    # The pouring hand is the right one; a left-handed subject pours with the left.
    assert travel(right.joints, 21) > 1.5 * travel(right.joints, 0)
    assert travel(left.joints, 0) > 1.5 * travel(left.joints, 21)
    np.testing.assert_array_equal(left.phases, right.phases)


def test_missing_joints_roughly_as_configured():
    only_random = Variation(drop_rate=0.01, dropouts_per_10s=0.0)
    ratio = np.mean([np.isnan(generate("wipe_table", rng(k), variation=only_random)
                              .joints[..., 0]).mean() for k in range(6)])
    assert 0.006 < ratio < 0.015
    # Whole-hand dropouts: frames where one hand is entirely gone and the other is not.
    lost = generate("wipe_table", rng(1), variation=Variation(drop_rate=0.0,
                                                              dropouts_per_10s=20.0))
    nan = np.isnan(lost.joints[..., 0])
    one_hand_gone = nan[:, :21].all(1) ^ nan[:, 21:].all(1)
    assert one_hand_gone.sum() >= 3
    assert not nan.all(1).all()


def test_viewpoint_and_subject_vary():
    wrists = [generate("squat", rng(k), variation=NOISELESS).joints[0, 8] for k in range(8)]
    spread = np.ptp(np.stack(wrists), axis=0)
    assert spread[0] > 0.1 and spread[2] > 0.1  # translated about the floor plane


# ---------------------------------------------------------------------------------------
# Perturbations (clean, so only the scripted deviation changes the timeline)
# ---------------------------------------------------------------------------------------

def test_pause_freezes_pose_and_canonical_time():
    seq = generate("pour_milk", rng(0), clean=True,
                   perturb=Perturbation(pause_phase=2, pause_seconds=1.0))
    ct = seq.canonical_time
    still = np.nonzero(np.diff(ct) == 0)[0]
    assert len(still) >= 29
    assert set(seq.phases[still].tolist()) == {2}
    np.testing.assert_array_equal(seq.joints[still[0]], seq.joints[still[-1] + 1])
    d = ACTIVITIES["pour_milk"].durations
    assert ct[still[0]] == pytest.approx((d[:2].sum() + 0.5 * d[2]) / d.sum(), abs=1e-6)
    assert seq.num_frames == generate("pour_milk", rng(0), clean=True).num_frames + 30


def test_skip_removes_a_phase():
    seq = generate("open_bottle", rng(0), clean=True, perturb=Perturbation(skip_phase=3))
    assert 3 not in seq.phases and runs(seq.phases) == [0, 1, 2, 4, 5, 6, 7]
    assert np.diff(seq.canonical_time).max() > 0.05  # jumps over the skipped phase
    assert np.all(np.diff(seq.canonical_time) >= 0)


def test_repeat_goes_back():
    seq = generate("stir_cup", rng(0), clean=True, perturb=Perturbation(repeat_phase=4))
    assert runs(seq.phases) == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]
    assert np.diff(seq.canonical_time).min() < 0
    # While undoing, the pose still matches the canonical pose at that canonical time.
    ref = generate("stir_cup", rng(0), clean=True)
    k = int(np.argmin(np.diff(seq.canonical_time))) + 1
    j = int(np.argmin(np.abs(ref.canonical_time - seq.canonical_time[k])))
    assert np.abs(seq.joints[k] - ref.joints[j]).max() < 0.01


def test_restart_goes_to_zero():
    seq = generate("squat", rng(0), clean=True, perturb=Perturbation(restart_at_phase=3))
    assert runs(seq.phases) == [0, 1, 2, 0, 1, 2, 3, 4]
    drop = int(np.argmin(np.diff(seq.canonical_time))) + 1
    assert seq.canonical_time[drop] < 0.05 and seq.canonical_time[drop - 1] > 0.5
    assert seq.canonical_time[-1] > 0.97


def test_bad_perturbations_raise():
    with pytest.raises(ValueError, match="skip_phase"):
        generate("squat", rng(0), perturb=Perturbation(skip_phase=99))
    with pytest.raises(ValueError, match="at most one"):
        generate("squat", rng(0), perturb=Perturbation(skip_phase=1, repeat_phase=2))
    with pytest.raises(ValueError, match="restart_at_phase"):
        generate("squat", rng(0), perturb=Perturbation(restart_at_phase=0))
    with pytest.raises(ValueError, match="activity"):
        generate("make_tea", rng(0))


def test_features_follow_the_pose():
    a = generate("pour_milk", rng(0), clean=True, features=32)
    b = generate("pour_milk", rng(1), clean=True, features=32)  # same poses, other noise
    c = generate("squat", rng(0), clean=True, features=32)
    assert a.features.shape == (a.num_frames, 32) and a.features.dtype == np.float32
    assert np.abs(a.features).max() < 1 and 0.1 < a.features.std() < 0.8  # not saturated
    assert 0 < np.abs(a.features - b.features).mean() < 0.1
    # Features change with the phase: first and middle frames are far apart.
    assert np.abs(a.features[0] - a.features[a.num_frames // 2]).mean() > 0.1
    assert c.features.shape == (c.num_frames, 32)
    assert generate("squat", rng(0)).features is None


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def test_write_dataset_round_trip(tmp_path):
    m = write_dataset(tmp_path, seed=1, activities=["pour_milk", "stir_cup"], per_activity=3,
                      val_fraction=0.34, features=4)
    ds = Dataset(tmp_path)
    assert ds.manifest.layout == m.layout == "h2o_hands" and ds.manifest.fps == 30
    assert ds.manifest.activities == ["pour_milk", "stir_cup"]
    assert sorted(ds.files()) == sorted(f"{a}_{i:03d}.npz" for a in ("pour_milk", "stir_cup")
                                        for i in range(3))
    assert ds.files("val") == ["pour_milk_002.npz", "stir_cup_002.npz"]
    seq = ds.load("stir_cup_001.npz")
    assert seq.activity == "stir_cup" and seq.features.shape[1] == 4
    again = generate("stir_cup", sequence_rng(1, "stir_cup", 1), features=4)
    np.testing.assert_array_equal(seq.joints, again.joints)  # files are reproducible
    with pytest.raises(ValueError, match="one layout"):
        write_dataset(tmp_path / "mixed", seed=1, activities=["pour_milk", "squat"])


def test_write_datasets_splits_by_layout(tmp_path):
    out = write_datasets(tmp_path, seed=0, activities=["screw_lid", "lunge"], per_activity=1)
    assert set(out) == {tmp_path / "hands", tmp_path / "body"}
    assert Dataset(tmp_path / "body").manifest.layout == "body25"
    assert Dataset(tmp_path / "hands").files() == ["screw_lid_000.npz"]
    assert Dataset(tmp_path / "hands").files("val") == []  # one sequence: all train


def test_examples_and_cli(tmp_path, capsys):
    paths = write_examples(tmp_path / "ex", ["pour_milk"])
    seq = load_sequence(paths[0])
    assert paths[0].name == "pour_milk.npz" and not np.isnan(seq.joints).any()
    assert seq.phase_names[:3] == ("reach_carton", "grasp_carton", "lift")
    args = argparse.Namespace(out=str(tmp_path / "ds"), seed=2, activities=["body"],
                              per_activity=2, val_fraction=0.5, features=0, examples="")
    assert run_cli(args) == 0
    assert len(Dataset(tmp_path / "ds").files("val")) == len(BODY_ACTIVITIES)
    assert "body25" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, said", [
    ("--per-activity", "0", "argument --per-activity: expected an integer >= 1, found '0'"),
    ("--val-fraction", "1", "argument --val-fraction: expected a finite number >= 0 and < 1"),
    ("--features", "-1", "argument --features: expected an integer >= 0"),
])
def test_cli_names_the_flag(tmp_path, capsys, flag, value, said):
    from masa_rt.cli import main

    with pytest.raises(SystemExit) as info:
        main(["synth", "--out", str(tmp_path / "ds"), flag, value])
    assert info.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(ValueError, match="--per-activity"):
        write_dataset(tmp_path / "ds", 0, ["pour_milk"], per_activity=0)

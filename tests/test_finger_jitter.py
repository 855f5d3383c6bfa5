"""``trainer.demo_replay.vary_fingers``: a demo replayed with other finger postures at its
phase keys, checked against the generator's own hand kinematics (``masa_rt.synth.hand``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt.preprocess import InputSpec
from masa_rt.skeleton import get_layout
from masa_rt.synth.generate import generate
from masa_rt.synth.hand import POSE_DIM, HandShape, two_hand_fk
from trainer.demo_replay import flex_fingers, vary_fingers
from trainer.phase_decoder import decoder_config, train_phase_decoder

PARENTS = get_layout("h2o_hands").parents
BONES = [(j, p) for j, p in enumerate(PARENTS) if p >= 0]
BASES = [0, 21] + [h * 21 + 1 + 4 * f for h in range(2) for f in range(5)]  # wrists, bases


def _hands(curls: np.ndarray) -> np.ndarray:
    """(T, 42, 3) two hands, both with ``curls`` (T, 6), at unrelated wrist poses."""
    t = len(curls)
    left = np.concatenate([np.tile([-0.2, 1.0, -0.3, 10.0, -20.0, 5.0], (t, 1)), curls], 1)
    right = np.concatenate([np.tile([0.2, 1.1, -0.3, -30.0, 10.0, 40.0], (t, 1)), curls], 1)
    assert left.shape[1] == POSE_DIM
    return two_hand_fk(np.concatenate([left, right], axis=1), HandShape.default())


def _lengths(joints: np.ndarray) -> np.ndarray:
    return np.stack([np.linalg.norm(joints[:, j] - joints[:, p], axis=-1) for j, p in BONES], 1)


def test_flexing_a_bent_hand_is_the_generator_at_the_new_curl() -> None:
    curls = np.array([[0.3, 0.4, 0.5, 0.3, 0.6, 0.5], [0.9, 0.9, 0.8, 0.85, 0.9, 0.9]])
    for delta in (0.07, -0.05, 0.3):  # 0.3 takes the second hand's curls past 1: clipped
        offsets = np.full((2, 2, 5), delta)
        want = _hands(np.clip(curls + np.r_[[delta] * 5, 0.0], 0.0, 1.0))
        np.testing.assert_allclose(flex_fingers(_hands(curls), offsets), want, atol=2e-6)


def test_a_straight_finger_bends_towards_the_palm() -> None:
    """At curl 0 a finger's own bending plane is undefined; the palm's axis stands in
    (the four fingers' splay aside: within a millimetre of the generator's)."""
    curls = np.array([[0.3, 0.0, 0.0, 0.0, 0.0, 0.3]])
    got = flex_fingers(_hands(curls), np.full((1, 2, 5), 0.07))
    want = _hands(curls + np.r_[0.0, [0.07] * 4, 0.0])
    fingers = [h * 21 + 5 + k for h in range(2) for k in range(16)]
    np.testing.assert_allclose(got[:, fingers], want[:, fingers], atol=1e-3)
    # Curl 0 cannot open further: a negative offset leaves the straight fingers alone.
    np.testing.assert_allclose(flex_fingers(_hands(curls), np.full((1, 2, 5), -0.1))[:, fingers],
                               _hands(curls)[:, fingers], atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
       st.lists(st.floats(-0.5, 0.5), min_size=10, max_size=10))
def test_flexing_keeps_bones_wrists_and_finger_bases(curls, offsets) -> None:
    joints = _hands(np.array([curls]))
    out = flex_fingers(joints, np.array(offsets).reshape(1, 2, 5))
    np.testing.assert_allclose(_lengths(out), _lengths(joints), atol=1e-6)
    np.testing.assert_allclose(out[:, BASES], joints[:, BASES], atol=1e-7)
    assert np.isfinite(out).all()


def test_vary_fingers_offsets_postures_at_the_keys_and_keeps_still_fingers_still() -> None:
    demo = generate("pour_milk", np.random.default_rng(0), clean=True)
    joints, phases = demo.joints, demo.phases
    out = vary_fingers(joints, phases, np.random.default_rng(3), 0.05)
    np.testing.assert_allclose(_lengths(out), _lengths(joints), atol=1e-5)
    moved = np.linalg.norm(out - joints, axis=-1).max(axis=1)  # (T,) largest move
    assert moved.max() > 2e-3  # fingertips move by millimetres at 0.05 ...
    assert moved.max() < 0.05  # ... not by centimetres
    # A finger joint that holds still through a phase in the demo holds still in the replay.
    held = 0
    for p in range(phases.max() + 1):
        run = np.flatnonzero(phases == p)
        still = np.ptp(joints[run], axis=0).max(axis=-1) < 1e-7  # (J,) still joints
        if still.any():
            held += 1
            assert np.ptp(out[run][:, still], axis=0).max() < 1e-5
    assert held >= 2  # pour_milk's idle hand waits through several phases
    np.testing.assert_allclose(vary_fingers(joints, phases, np.random.default_rng(3), 0.0),
                               joints, atol=1e-6)


def test_finger_jitter_is_checked_and_needs_a_two_hand_model() -> None:
    with pytest.raises(ValueError, match="finger_jitter"):
        decoder_config({"finger_jitter": -0.1})
    demo = generate("pour_milk", np.random.default_rng(0), clean=True)
    body = InputSpec(layout="body25", fps=30.0)
    with pytest.raises(ValueError, match="finger_jitter needs a h2o_hands model"):
        train_phase_decoder([(demo.joints, demo.phases)], body, 9,
                            decoder_config({"finger_jitter": 0.05, "steps": 1}))

"""benchmarks/phase_ceiling.py replays the harness's val streams by re-drawing the
generator's random numbers in the generator's order: check it stays in step with
``masa_rt.synth.generate``, or its oracle and subject streams would silently describe
other sequences."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the script imports the harness and the model loader

from engine.harness import VAL_SEED_BASE  # noqa: E402
from masa_rt.synth import Variation, generate, sequence_rng  # noqa: E402

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "phase_ceiling.py"
_spec = importlib.util.spec_from_file_location("phase_ceiling", _path)
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)

# The generator's defaults with every observation effect off: its output is then the
# subject's joints before observation, which subject_joints claims to rebuild.
UNOBSERVED = replace(Variation(), mirror_prob=0.0, yaw_deg=0.0, shift_m=0.0, tremor_m=0.0,
                     noise_m=0.0, drop_rate=0.0, dropouts_per_10s=0.0)


@pytest.mark.parametrize("activity", ["pour_milk", "wipe_table"])
def test_subject_joints_rebuild_the_generated_subject(activity):
    seq = generate(activity, sequence_rng(VAL_SEED_BASE + 0, activity, 2), variation=UNOBSERVED)
    frames, joints = ceiling.subject_joints(activity, 0, 2, UNOBSERVED)
    np.testing.assert_array_equal(frames.phase, seq.phases)
    np.testing.assert_allclose(joints, seq.joints, atol=1e-5)


def test_oracle_frames_follow_the_val_timeline():
    seq = generate("stir_cup", sequence_rng(VAL_SEED_BASE + 3, "stir_cup", 1))
    np.testing.assert_array_equal(ceiling.oracle_frames("stir_cup", 3, 1).phase, seq.phases)

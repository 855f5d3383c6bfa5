"""Procedural multi-activity pose sequences with exact ground truth.

Two-hand kitchen activities (``h2o_hands``, the H2O stand-in) and body exercises
(``body25``), built from keyed phases, minimum-jerk motion and forward kinematics, then
varied like real recordings: subject size, handedness, speed, pauses, viewpoint, tremor,
tracking noise, missing joints. Every frame carries its phase and canonical time.

- :func:`generate` -- one :class:`~masa_rt.sequence.Sequence` from a ``Generator``.
- :func:`write_dataset` / :func:`write_datasets` -- dataset folders with a manifest.
- :func:`write_examples` -- clean demonstrations (``examples/demos/pour_milk.npz``).
- :func:`run_cli` -- ``masa-rt synth``.
"""

from masa_rt.synth.activities import (
    ACTIVITIES,
    BODY_ACTIVITIES,
    HAND_ACTIVITIES,
    ActivitySpec,
    BodyPhase,
    HandPhase,
)
from masa_rt.synth.generate import (
    CLEAN,
    FPS,
    Perturbation,
    Variation,
    generate,
    minimum_jerk,
    plan_datasets,
    run_cli,
    sequence_rng,
    write_dataset,
    write_datasets,
    write_examples,
)
from masa_rt.synth.hand import HandPose

__all__ = [
    "ACTIVITIES", "BODY_ACTIVITIES", "CLEAN", "FPS", "HAND_ACTIVITIES", "ActivitySpec",
    "BodyPhase", "HandPhase", "HandPose", "Perturbation", "Variation", "generate",
    "minimum_jerk", "plan_datasets", "run_cli", "sequence_rng", "write_dataset",
    "write_datasets", "write_examples",
]

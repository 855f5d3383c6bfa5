"""The aligner's parameters (``AlignerConfig``) and the defaults for references without a
phase decoder (``DECODER_FREE``); docs/aligner.md, "Parameters", says when to change each."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from masa_rt.align.reference import Reference


@dataclass(frozen=True)
class AlignerConfig:
    """Aligner parameters. Counts are in frames of the stream (the engine resamples streams
    to the model's rate, which is also the references' rate); costs are ``1 - cos``."""

    # Tracker (banded online DTW).
    band: int = 20  # look-ahead of the tracker window, reference frames
    back: int = 2  # tolerated backward motion (jitter, overshoot), reference frames
    max_step: int = 4  # most reference frames advanced per query frame (user up to 4x faster)
    # Move penalties: 0 since learned embeddings (the stream's speed varies 0.5-2x per phase;
    # any bias toward moving or staying costs accuracy; harness, docs/aligner.md).
    stay_penalty: float = 0.0  # cost of not advancing
    skip_penalty: float = 0.005  # per extra frame skipped beyond the first
    back_penalty: float = 0.02  # per frame moved backwards
    smoothing: float = 0.0  # EMA factor of the reported index (0 = raw argmin)
    # Pause: the stream's embedding speed (mean of the last `pause_lag` frames against the
    # mean of the `pause_lag` before, so per-frame jitter averages out) below a fraction of
    # the reference's median speed, measured the same way, for `pause_frames` frames.
    pause_speed_ratio: float = 0.2
    pause_lag: int = 4
    pause_frames: int = 4
    # Off script: no frame of any reference is this similar, for this many frames.
    off_script_sim: float = 0.5
    off_script_frames: int = 10
    # Relocaliser (global streaming subsequence DTW with forgetting).
    relocalise_memory: float = 4.0  # time constant of forgetting, frames
    relocalise_margin: int = 8  # a jump must move at least this far, reference frames
    relocalise_cost_margin: float = 0.04  # ... and be this much cheaper (mean cost) ...
    relocalise_patience: int = 2  # ... for this many consecutive frames
    finish_tolerance: int = 2  # "finished" within this many frames of the end
    # Activity choice among several references: EMA of each one's best recent cost.
    activity_memory: float = 10.0  # frames
    activity_margin: float = 0.02
    activity_patience: int = 8
    # References with a phase decoder: cost += decoder_weight * -log(p(the frame's phase) /
    # p(the decoder's best phase)). 0.1 weighs a confident decoder (p 0.9 against 0.1: 2.2
    # nats) about like a cosine gap of 0.2. The defaults above and this weight were tuned
    # together for references with 128-wide decoders (docs/changelog.md, "Tenth round");
    # references without decoders get DECODER_FREE (see for_references).
    decoder_weight: float = 0.1
    # Where the active reference's decoder gives one phase more than this probability and
    # the tracked frame lies in the phase before or after it, the *reported* position
    # moves to the nearest frame of the decoder's phase (the tracker itself is untouched):
    # a confident decoder places boundaries sooner than the tracker, whose steps are
    # bounded, catches up with them (docs/changelog.md, "Eleventh round"). 1: never; nor with
    # decoder_weight 0, which leaves the decoders out altogether.
    decoder_phase_confidence: float = 0.5
    # Hysteresis on each decoder's phase: the phase it named on the last frame gets this
    # much log-probability on top (e**0.5 ~ 1.65 times as probable), as an HMM's
    # self-transitions do. The frames around a boundary are nearly still and alike on
    # both sides, and the shipped decoders called the next phase a frame or two early
    # more often than late (368 against 206 wrong frames within three of a boundary, 72
    # clean streams). 0.5: +0.12 to +0.18 on the harness's scenario mean, shipped causal
    # and lookahead references, seeds 0 and 1, no scenario lower by more than 0.07;
    # 0.4 and 0.7 alike, 1.0 lower (docs/changelog.md, "Sixteenth round"). 0: off.
    decoder_stickiness: float = 0.5
    # The phase filter (masa_rt/align/phase_filter.py), for references without a phase
    # decoder: an online HMM over the reference's phases whose likeliest phase places the
    # reported position. Emissions max cos / tau over the demos' frames of each phase; a
    # phase of mean length d is left with probability advance / d per frame; back, skip
    # and jump: small chances to go back one phase, skip one, or land anywhere; a
    # session starts in the first phase, the others start_prior nats behind. Chosen on
    # the Penn Action train split (docs/changelog.md). ``motion``: weight of the motion
    # term in the emission, cos(the frame's direction of motion over ``motion_lag``
    # frames, the exemplar's), which tells phases through the same poses apart by the
    # way they go (a squat's way down and way up); chosen on the Penn and synthetic
    # train splits (0.25 of 0 / 0.25 / 0.5 / 1).
    phase_filter: bool = True
    phase_filter_tau: float = 0.02
    phase_filter_advance: float = 3.0
    phase_filter_back: float = 1e-3
    phase_filter_skip: float = 1e-3
    phase_filter_jump: float = 1e-4
    phase_filter_start_prior: float = 3.0
    phase_filter_motion: float = 0.25
    phase_filter_motion_lag: int = 3

    def __post_init__(self) -> None:
        ints = {"band": 1, "back": 0, "max_step": 1, "pause_lag": 1, "pause_frames": 1,
                "off_script_frames": 1, "relocalise_margin": 0, "relocalise_patience": 1,
                "finish_tolerance": 0, "activity_patience": 1, "phase_filter_motion_lag": 1}
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise ValueError(f"AlignerConfig.{name}: expected >= {low}, "
                                 f"found {getattr(self, name)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"AlignerConfig.smoothing: expected [0, 1), found {self.smoothing}")
        if not (math.isfinite(self.decoder_weight) and self.decoder_weight >= 0):
            raise ValueError(f"AlignerConfig.decoder_weight: expected a number >= 0, "
                             f"found {self.decoder_weight}")
        if not (math.isfinite(self.decoder_stickiness) and self.decoder_stickiness >= 0):
            raise ValueError(f"AlignerConfig.decoder_stickiness: expected a number >= 0, "
                             f"found {self.decoder_stickiness}")
        if not 0.0 <= self.decoder_phase_confidence <= 1.0:
            raise ValueError(f"AlignerConfig.decoder_phase_confidence: expected [0, 1], "
                             f"found {self.decoder_phase_confidence}")
        for name in ("phase_filter_tau", "phase_filter_advance"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"AlignerConfig.{name}: expected a number > 0, "
                                 f"found {getattr(self, name)}")
        if not (math.isfinite(self.phase_filter_motion) and self.phase_filter_motion >= 0):
            raise ValueError(f"AlignerConfig.phase_filter_motion: expected a number >= 0, "
                             f"found {self.phase_filter_motion}")
        for name in ("phase_filter_back", "phase_filter_skip", "phase_filter_jump"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"AlignerConfig.{name}: expected [0, 0.5), "
                                 f"found {getattr(self, name)}")
        for name in ("relocalise_memory", "activity_memory"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"AlignerConfig.{name}: expected >= 1 frame, "
                                 f"found {getattr(self, name)}")

    @classmethod
    def for_references(cls, references: Reference | Sequence[Reference],
                       **changes: Any) -> AlignerConfig:
        """The defaults for these references: the class defaults (tuned with phase
        decoders, as ``masa-rt reference build`` makes them) if any has a decoder, else
        the values tuned for embeddings alone (``DECODER_FREE``; older references, raw
        keypoints, ``--decoder-steps 0``); ``changes`` (fields, as ``--aligner KEY=VALUE``
        gives them) on top."""
        refs = [references] if isinstance(references, Reference) else list(references)
        if any(r.decoder is not None for r in refs):
            return cls(**changes)
        return cls(**{**DECODER_FREE, **changes})


# The defaults for references without a phase decoder (embeddings alone): smoothing and
# slower relocalising keep the reported position steadier (fourth round, changelog.md).
# A wider band (24 reference frames, was 12) and a small cost for standing still (0.03,
# was 0) since issue 27: without a decoder's boundaries the tracker stalled where the next
# stretch of the reference resembled the user less than the frame it held (a squat's
# descent against an averaged bottom), while offline DTW, forced through, was right. Tuned
# on data the reported benchmarks do not use (Penn key-event *train* videos against
# references from other train videos; synth seed 11; harness seed 1): Penn 81.3 -> 86.5 %,
# synth K=1 / K=5 74.9 -> 76.3 / 76.2 -> 76.6, harness scenario mean 69.3 -> 72.6 (clean
# +6.7, pause -0.6).
DECODER_FREE: dict[str, Any] = {
    "band": 24, "stay_penalty": 0.03, "skip_penalty": 0.0, "smoothing": 0.3,
    "relocalise_memory": 8.0, "relocalise_cost_margin": 0.08, "relocalise_patience": 4}

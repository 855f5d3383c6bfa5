"""Train a reference's phase decoder (``masa_rt.phase_decoder``) from its labelled demos.

The demonstrations of a reference carry phase labels; that is all the supervision there
is, one or a few performances. Each step replays a batch of them as other people would
perform them (``trainer.demo_replay``: scripted deviations, per-phase timing and pauses,
bone lengths), then through the trainer's own augmentation
(``masa_rt.augment.augment_view``: one view of the pair): rotation about the vertical,
mirror, per-hand offsets that drift, joint dropout and noise. The labels follow each
frame through both, so they stay exact. The torch module below has the numpy decoder's
exact layout and is converted to it at the end; ``tests/test_phase_decoder.py`` checks the
two agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from masa_rt.augment import AugmentConfig, augment_view
from masa_rt.phase_decoder import PhaseDecoder
from masa_rt.preprocess import InputSpec, frame_features, normalise_joints
from masa_rt.skeleton import get_layout
from trainer.data import _pad
from trainer.demo_replay import (
    EDITS,
    FINGER_LAYOUT,
    RetimeConfig,
    retime_demo,
    scripted_edit,
    vary_bones,
    vary_fingers,
)

__all__ = ["DecoderConfig", "DecoderNet", "decoder_config", "train_phase_decoder"]

log = logging.getLogger(__name__)

MAX_LOOKAHEAD = 30  # frames: one second at the shipped model's rate


def _augment() -> AugmentConfig:
    # The shipped encoder's augmentation (configs/hands_shipped.yaml) with more frequent
    # speed changes (about one per phase) and per-hand offsets at the synthetic subjects'
    # scale (docs/results.md §3, "Fifth round"); the crop lets the decoder start anywhere,
    # as a stream joined late or restarted does.
    return AugmentConfig(crop="independent", rotate_max_deg=45.0, temporal="warp",
                         warp_segments=8, joint_dropout=0.1, part_jitter_std=0.1,
                         part_jitter_deg=4.0)


@dataclass
class DecoderConfig:
    """How a reference's phase decoder is trained (``masa-rt reference build``)."""

    # 0 = no decoder. 4,800 rather than 2,400: +0.7 / +1.0 points clean phase accuracy on
    # harness seeds 0 / 1 and +0.7 to +2.2 in every other scenario (docs/results.md §3,
    # "Twelfth round"); 2,400 rather than 1,200: +1.5 clean ("Tenth round"). No serving
    # cost; a build takes twice as long (--decoder-steps 2400 for a quicker one).
    steps: int = 4800
    # 128 rather than 64: +0.7 to +2.3 points in seven of eight harness scenarios (clean
    # 89.4 against 87.7 %; docs/results.md §3, "Ninth round"), for 2.5-4.5x the decoder's
    # time per frame; --decoder-hidden 64 where many streams x references must fit a CPU.
    # 256 gains +0.2 on the mean of all scenarios, inside the draw noise ("Thirteenth
    # round"), for about 4x the products: not worth it.
    hidden: int = 128
    layers: int = 2
    batch_size: int = 16
    lr: float = 2e-3  # peak of a one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    augment: AugmentConfig = field(default_factory=_augment)
    # Share of drawn demos replayed with a scripted deviation first (a skipped, repeated
    # or restarted phase, ``scripted_edit``), so the decoder has seen what the harness's
    # perturbed scenarios and real users do; the rest play in order.
    edit_prob: float = 0.3
    # Frames of lookahead L (0 = causal): the decoder learns the phase of the frame L
    # steps before its newest input, and the aligner then runs L frames behind (each
    # estimate describes the user L / fps seconds ago). The boundary that a causal
    # observer cannot place until the next phase's motion shows is then placed with that
    # motion in view (docs/results.md §3, "Eleventh round"). 0 by default: estimates of
    # the current frame.
    lookahead: int = 0
    # Replay the demo phase by phase as people perform it (``RetimeConfig``: a speed per
    # phase, eased pauses partway through some phases) instead of the augmentation's
    # speed warp; the augmentation then keeps every frame of the retimed replay. The
    # trainer's warp holds a frame abruptly anywhere, phase changes included, so a
    # decoder trained on it never sees a user slow to a stop short of a key pose with the
    # phase that stop belongs to (docs/results.md §3, "Thirteenth round": +1.7 to +3.2
    # points clean on four activities, seeds 0 and 1; "Fourteenth round": the shipped
    # references, both sets). None: the warp (``--no-decoder-retime``).
    retime: RetimeConfig | None = field(default_factory=RetimeConfig)
    # Per replay, every bone's length scaled by its own factor in 1 +- bone_jitter (a
    # subject with other hands: the synthetic subjects' spread is 0.08,
    # ``Variation.bone_jitter``). The augmentation scales the whole skeleton only. 0: off:
    # 0.08 moved the harness's scenario means by +0.1 to +0.7 points on four activities,
    # inside what a new draw of the same decoders moves them (docs/results.md §3,
    # "Fourteenth round").
    bone_jitter: float = 0.0
    # Per replay, each finger's curl at each phase key offset by N(0, finger_jitter) (units
    # of a full curl, eased from key to key: ``trainer.demo_replay.vary_fingers``), as a
    # subject who grips a little differently: the synthetic subjects' key jitter is 0.05.
    # The augmentation moves whole hands only. ``h2o_hands`` models only. 0: off.
    finger_jitter: float = 0.0
    # Decoders trained apart (seeds seed .. seed + members - 1: their own initial weights
    # and replays) whose log-probabilities the aligner averages (``DecoderEnsemble``). Two
    # scored +0.16 to +0.44 points over their members' mean on the harness's scenario
    # mean, four activities, both seeds (docs/results.md §3, "Fifteenth round"), for
    # members x the build time and the decoders' time per frame. 1 by default, so a
    # build takes what it took; the shipped causal references carry three, the lookahead
    # ones two (built apart and combined, scripts/build_shipped_model.sh).
    members: int = 1

    def __post_init__(self) -> None:
        # Checked here, so a config built in code fails as a CLI flag does.
        if self.steps < 0:
            raise ValueError(f"DecoderConfig.steps: expected >= 0 (0: no decoder), found "
                             f"{self.steps}")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"DecoderConfig: hidden and layers must be >= 1, found "
                             f"{self.hidden}, {self.layers}")
        if not 0.0 <= self.edit_prob <= 1.0:
            raise ValueError(f"DecoderConfig.edit_prob: expected 0 .. 1, found "
                             f"{self.edit_prob}")
        if not 0 <= self.lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"DecoderConfig.lookahead: expected 0 .. {MAX_LOOKAHEAD} frames, "
                             f"found {self.lookahead}")
        if self.members < 1:
            raise ValueError(f"DecoderConfig.members: expected >= 1, found {self.members}")
        if not 0.0 <= self.finger_jitter <= 1.0:
            raise ValueError(f"DecoderConfig.finger_jitter: expected 0 .. 1, found "
                             f"{self.finger_jitter}")
        if not 0.0 <= self.bone_jitter < 1.0:
            raise ValueError(f"DecoderConfig.bone_jitter: expected 0 .. 1 (exclusive), found "
                             f"{self.bone_jitter}")

    @property
    def view_augment(self) -> AugmentConfig:
        """The augmentation each batch's view gets: ``augment``, without its own timing
        (every frame kept) where ``retime`` already timed the replay."""
        if self.retime is None:
            return self.augment
        return replace(self.augment, temporal="drop", keep_ratio=(1.0, 1.0))


def decoder_config(options: Mapping[str, Any] | None = None) -> DecoderConfig:
    """``DecoderConfig`` with ``options`` (field: value; None keeps the default) applied,
    checked: a CLI flag or a caller's typo fails here with the field's name. ``retime``
    may be a bool (True: ``RetimeConfig()``; False: off, the augmentation's warp)."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(DecoderConfig)})
    if unknown:
        raise ValueError(f"phase decoder: unknown option(s) {unknown}; known: "
                         f"{', '.join(f.name for f in fields(DecoderConfig))}")
    if isinstance(given.get("retime"), bool):  # a CLI switch: the default ranges, or off
        given["retime"] = RetimeConfig() if given["retime"] else None
    return replace(DecoderConfig(), **given)  # checked by DecoderConfig.__post_init__


class DecoderNet(nn.Module):
    """``masa_rt.phase_decoder.PhaseDecoder`` in torch, for training."""

    def __init__(self, input_dim: int, num_phases: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(input_dim, hidden), nn.Linear(hidden, hidden)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, num_phases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, P) logits, causal."""
        return self.out(self.gru(self.fc2(F.relu(self.fc1(x))))[0])

    def to_numpy(self, lookahead: int = 0) -> PhaseDecoder:
        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        arrays = {"w1": a(self.fc1.weight), "b1": a(self.fc1.bias), "w2": a(self.fc2.weight),
                  "b2": a(self.fc2.bias), "wo": a(self.out.weight), "bo": a(self.out.bias)}
        for i in range(self.gru.num_layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                short = name.replace("weight", "w").replace("bias", "b")
                arrays[f"{short}{i}"] = a(getattr(self.gru, f"{name}_l{i}"))
        return PhaseDecoder(arrays, lookahead)


def _batch(demos: list[tuple[np.ndarray, np.ndarray]], spec: InputSpec,
           cfg: DecoderConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of ``batch_size`` demos drawn at random (``edit_prob`` of them
    with a scripted deviation) -> inputs (B, M, D) and labels (B, M) (-100 on padding)."""
    drawn = []
    layout = get_layout(spec.layout)
    for i in rng.integers(0, len(demos), cfg.batch_size):
        joints, phases = demos[i]
        if cfg.bone_jitter > 0:  # no draw at 0: the batches of a decoder without it
            joints = vary_bones(joints, layout.parents, rng, cfg.bone_jitter)
        if cfg.finger_jitter > 0:  # on the demo in its own order, before any retiming
            joints = vary_fingers(joints, phases, rng, cfg.finger_jitter)
        if cfg.retime is not None:
            joints, phases = retime_demo(joints, phases, rng, cfg.retime)
        # No draw at edit_prob 0: the batches are then exactly those of a decoder trained
        # without edits (the fifth round's).
        if cfg.edit_prob > 0 and rng.random() < cfg.edit_prob:
            joints, phases = scripted_edit(joints, phases, EDITS[rng.integers(len(EDITS))],
                                           rng)
        drawn.append((joints, phases))
    joints, lengths = _pad([j for j, _ in drawn])
    view = augment_view(joints, lengths, rng, cfg.view_augment,
                        mirror_index=np.array(layout.mirror), up_axis=layout.up_axis)
    mask, g = view["mask"], view["g"]
    x = np.where(mask[..., None], frame_features(view["joints"], spec), 0.0)
    y = np.full(g.shape, -100, dtype=np.int64)
    for b, (_, phases) in enumerate(drawn):
        y[b, mask[b]] = phases[g[b, mask[b]]]
    if cfg.lookahead:
        # Input i names the phase of frame i - L; no target where input i is padding.
        L = cfg.lookahead
        late = np.full_like(y, -100)
        late[:, L:] = np.where(mask[:, L:], y[:, :-L], -100)
        y = late
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def train_phase_decoder(demos: Sequence[tuple[np.ndarray, np.ndarray]], spec: InputSpec,
                        num_phases: int, cfg: DecoderConfig | None = None,
                        progress: Callable[[int, float], None] | None = None) -> PhaseDecoder:
    """Demos as ``(joints (T, J, C) raw, phases (T,) int)`` at the model's frame rate ->
    a trained :class:`PhaseDecoder` over ``num_phases`` phases.

    ``progress(step, loss)`` is called every 50 steps (a CLI shows it).
    """
    cfg = cfg or DecoderConfig()
    if cfg.steps < 1:  # the config allows 0 (no decoder); training needs a step
        raise ValueError(f"DecoderConfig.steps: expected >= 1, found {cfg.steps}")
    if not spec.uses_joints or spec.feature_dim:
        raise ValueError("phase decoder: needs skeleton-only input (input_kind 'skeleton')")
    if cfg.finger_jitter > 0 and spec.layout != FINGER_LAYOUT:
        raise ValueError(f"phase decoder: finger_jitter needs a {FINGER_LAYOUT} model; this "
                         f"one reads {spec.layout!r} (set it to 0)")
    normed = []
    for joints, phases in demos:
        phases = np.asarray(phases, dtype=np.int64)
        if len(joints) != len(phases) or len(joints) < 2:
            raise ValueError(f"phase decoder: a demo has {len(joints)} frames and "
                             f"{len(phases)} labels")
        if phases.min() < 0 or phases.max() >= num_phases:
            raise ValueError(f"phase decoder: labels outside [0, {num_phases})")
        normed.append((normalise_joints(np.asarray(joints, dtype=np.float32), spec), phases))
    torch.manual_seed(cfg.seed)
    net = DecoderNet(spec.input_dim, num_phases, cfg.hidden, cfg.layers)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    for step in range(cfg.steps):
        x, y = _batch(normed, spec, cfg, np.random.default_rng([cfg.seed, step]))
        loss = F.cross_entropy(net(x).reshape(-1, num_phases), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None and (step % 50 == 0 or step == cfg.steps - 1):
            progress(step, float(loss.item()))
    return net.eval().to_numpy(cfg.lookahead)

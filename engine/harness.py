"""Streaming accuracy harness (EVALUATION.md, "Streaming alignment").

For every hand activity the reference is built as a user builds one: from ordinary
generated performances (random subject, size, view, timing; no perturbation), the first
``K`` of the training data's (``reference_demos``, default 1; the medoid average for K > 1,
as ``masa-rt reference build``). The generator's clean canonical demonstration is an
option (``canonical=True``), reported as an extra row, never the headline. The val
streams are freshly generated sequences of that activity, from a seed namespace disjoint
from any training data (``sequence_rng(VAL_SEED_BASE + seed, activity, index)``), in
several scenarios: normal variation, a long pause, a skipped phase, a repeated phase, a
restart, 20 % of frames dropped, NaN joints with a 1 s total loss. Each stream runs
through the online :class:`~masa_rt.align.Aligner` frame by frame (many streams stepped
together in an :class:`~masa_rt.align.AlignerBank`, which behaves exactly as one aligner
per stream) and is scored against the generator's exact ground truth:

- **phase accuracy**: per frame, reported phase == true phase (percent; a frame with no
  report counts as wrong);
- **progress MAE**: |reported overall progress - true progress|, where true progress is
  the frame's canonical time mapped onto the reference (an interpolation of the
  reference's own canonical time; for the clean demo that is ``frame / (T - 1)``);
- **phase-change delay**: frames from a true phase change until the reported phase is the
  new one (missed changes are counted apart);
- **activity identification**: all hand references loaded in one aligner; share of frames
  (after the first second) whose reported activity is right, and share of streams whose
  last frame names the right activity.

Methods compared in the same run, on the same streams:

- ``learned``: the model's embeddings (the causal encoder run offline on the whole
  stream, which equals the streamed encoder: the exactness test);
- ``raw``: the normalised keypoints (``frame_features``), L2-normalised: what the learned
  embedding adds;
- ``offline_dtw``: full DTW of the whole stream (learned embeddings) against the
  reference, the offline upper bound. It is monotonic by construction, so it cannot
  follow a restart or a repeat: there it is an upper bound only in name. Its activity is
  the reference with the lowest mean cost along the path.

``run_engine_check`` runs a few streams through the real serving path (ONNX export,
``engine.pipeline.Pipeline`` with ONNX Runtime, resampling, lost-frame handling) and
compares its estimates with the harness's, frame by frame.

torch is imported here (it runs the model); the serving path never imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from masa_rt.align import (
    AlignerBank,
    AlignerConfig,
    Reference,
    offline_dtw,
    online_dtw_index,
    path_to_index,
)
from masa_rt.metrics import streaming_summary
from masa_rt.preprocess import InputSpec, frame_features, raw_embedding
from masa_rt.synth import (
    ACTIVITIES,
    HAND_ACTIVITIES,
    Perturbation,
    Variation,
    generate,
    sequence_rng,
)

__all__ = [
    "METHODS",
    "SCENARIOS",
    "VAL_SEED_BASE",
    "Scenario",
    "Stream",
    "embed_learned",
    "embed_raw",
    "json_safe",
    "make_references",
    "make_streams",
    "markdown_report",
    "method_config",
    "run_engine_check",
    "run_harness",
    "run_per_activity",
    "run_with_activity",
    "score",
]

log = logging.getLogger(__name__)

VAL_SEED_BASE = 10_000  # val streams: sequence_rng(VAL_SEED_BASE + seed, ...), not training's
REFERENCE_SEED = 0  # the clean demo's generator (as ``synth.write_examples``)
# Multi-demo references (``reference_demos > 1``) draw demos ``0 .. K-1`` of the training
# data (``masa-rt synth`` seed 0, ``sequence_rng(TRAIN_SEED, activity, i)``; with the
# shipped 40 per activity and val fraction 0.25, indices < 30 are its train split), never
# from the val namespace the harness scores.
TRAIN_SEED = 0
MAX_REFERENCE_DEMOS = 30
ACTIVITY_WARMUP_S = 1.0  # activity id is scored after the first second
METHODS = ("learned", "raw", "offline_dtw")
STREAMING_METHODS = ("learned", "raw")

Embedder = Callable[[np.ndarray], np.ndarray]  # (T, D) model input -> (T, d) embeddings


# ---------------------------------------------------------------------------------------
# Scenarios and streams
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """How a val stream deviates from a normal performance.

    ``structure`` scripts the generator (``pause``, ``skip``, ``repeat``, ``restart``; the
    phase is drawn per stream); the other fields damage the observation afterwards.
    ``clean=True`` asks the generator for the canonical performance (the reference itself:
    the known-answer case of the tests).
    """

    name: str
    description: str
    structure: str | None = None
    clean: bool = False
    drop_frac: float = 0.0  # frames removed at random (true timestamps kept)
    nan_joint_frac: float = 0.0  # joints set to NaN at random
    nan_burst_s: float = 0.0  # one stretch of whole-frame NaN (tracking lost)
    pause_s: float = 2.0
    variation: Variation | None = None  # the generator's variation (None: training's)

    def perturbation(self, num_phases: int, rng: np.random.Generator) -> Perturbation | None:
        """The generator's script for one stream (the phase is drawn from ``rng``)."""
        inner = (1, max(num_phases - 1, 2))  # neither the first nor the last phase
        if self.structure is None:
            return None
        if self.structure == "pause":
            return Perturbation(pause_phase=int(rng.integers(*inner)), pause_seconds=self.pause_s)
        if self.structure == "skip":
            return Perturbation(skip_phase=int(rng.integers(*inner)))
        if self.structure == "repeat":
            return Perturbation(repeat_phase=int(rng.integers(1, max(num_phases - 2, 2))))
        if self.structure == "restart":
            return Perturbation(restart_at_phase=int(rng.integers(2, max(num_phases - 1, 3))))
        raise ValueError(f"scenario {self.name}: unknown structure {self.structure!r}")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("clean", "normal variation (speed 0.5-2x per phase, subject, viewpoint, "
             "mirror, noise, short pauses)"),
    Scenario("same_view", "as clean, but no mirrored (left-handed) subjects and no "
             "viewpoint change: what raw keypoints lose to view and handedness",
             variation=Variation(mirror_prob=0.0, yaw_deg=0.0, shift_m=0.0)),
    Scenario("pause", "a 2 s hold halfway through a random inner phase", structure="pause"),
    Scenario("skip", "a random inner phase never happens", structure="skip"),
    Scenario("repeat", "starts the next phase, undoes back to the start of the last one "
             "and does it again", structure="repeat"),
    Scenario("restart", "after a few phases, starts over from phase 0", structure="restart"),
    Scenario("dropped", "20 % of frames dropped at random; the aligner gets the true "
             "timestamps", drop_frac=0.2),
    Scenario("nan_joints", "10 % of joints NaN, plus a 1 s stretch with every joint NaN",
             nan_joint_frac=0.1, nan_burst_s=1.0),
)}


@dataclass
class Stream:
    """One val stream as the aligner sees it, with its ground truth per presented frame."""

    activity: str
    scenario: str
    index: int
    joints: np.ndarray  # (n, J, C) raw joints, NaN = missing
    times: np.ndarray  # (n,) seconds, true capture times
    phases: np.ndarray  # (n,) true phase
    progress: np.ndarray  # (n,) true progress on the reference, [0, 1]
    lost: np.ndarray  # (n,) every joint missing: not encoded, aligner gets valid=False
    x: np.ndarray  # (n_live, D) model input of the frames that are not lost
    emb: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n_live, d)

    def __len__(self) -> int:
        return len(self.times)

    def inputs(self) -> np.ndarray:
        """(n, D) model inputs with zero rows on lost frames (the phase decoders' input)."""
        out = np.zeros((len(self), self.x.shape[1]), dtype=np.float32)
        out[~self.lost] = self.x
        return out

    def full(self, method: str) -> np.ndarray:
        """(n, d) embeddings with zero rows on lost frames."""
        e = self.emb[method]
        out = np.zeros((len(self), e.shape[1]), dtype=np.float32)
        out[~self.lost] = e
        return out


embed_raw = raw_embedding  # normalised keypoints as the embedding


def embed_learned(model: Any) -> Embedder:
    """The model's causal encoder on a whole (T, D) stream (equal to the streamed one)."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.encode(torch.from_numpy(np.ascontiguousarray(x))[None])[0].numpy()

    return run


def make_references(activities: Sequence[str], spec: InputSpec,
                    embedders: dict[str, Embedder], fingerprint: str = "",
                    reference_demos: int = 1, refine: int = 0,
                    decoder: Mapping[str, Any] | None = None, decoder_demos: int = 1,
                    canonical: bool = False,
                    ) -> tuple[dict[str, dict[str, Reference]], dict[str, np.ndarray]]:
    """``refs[method][activity]`` and each reference's canonical time ``(T,)`` (used to
    map a stream's canonical time onto the reference).

    ``reference_demos = K``: training demos ``0 .. K-1`` (ordinary performances; the
    medoid average for K > 1, ``engine.reference.reference_from_demos``, the ``masa-rt
    reference build`` path); the medoid is chosen on the first embedder's embeddings and used
    for every method, so all methods share one timeline and one ground truth.
    ``decoder`` (not None): the learned references get a phase decoder trained on the
    same demos' labels, as ``masa-rt reference build`` trains it with these options
    (``engine.reference.with_phase_decoder``; ``{}``: its defaults). None: no decoder.
    ``canonical``: the activity's clean demo instead (one demo; the old harness's
    reference, kept as a labelled extra row). ``decoder_demos = K > 1`` (canonical only):
    the decoder also learns from the labels of training demos ``0 .. K-2``, as ``masa-rt
    reference build CLEAN D0 .. D(K-2) --policy first`` does.
    """
    if canonical and reference_demos != 1:
        raise ValueError(f"reference_demos: the canonical reference is one demo, found "
                         f"{reference_demos}")
    if not 1 <= reference_demos <= MAX_REFERENCE_DEMOS:
        raise ValueError(f"reference_demos: expected 1 .. {MAX_REFERENCE_DEMOS} (the train "
                         f"split), found {reference_demos}")
    if not 1 <= decoder_demos <= MAX_REFERENCE_DEMOS + 1 or (
            decoder_demos > 1 and not canonical):
        raise ValueError(f"decoder_demos: expected 1 .. {MAX_REFERENCE_DEMOS + 1} with the "
                         f"canonical reference, found {decoder_demos} (canonical "
                         f"{canonical})")
    refs: dict[str, dict[str, Reference]] = {m: {} for m in embedders}
    canon: dict[str, np.ndarray] = {}
    for act in activities:
        seqs = _reference_sequences(act, spec, reference_demos, canonical)
        if not canonical:
            canon[act] = _multi_demo_references(act, spec, embedders, fingerprint, seqs,
                                                refine, refs)
        else:
            demo = seqs[0]
            x = frame_features(demo.joints, spec)
            canon[act] = np.asarray(demo.canonical_time, dtype=np.float64)
            for method, embed in embedders.items():
                refs[method][act] = Reference(
                    name=act, activity=act, embeddings=embed(x), phases=demo.phases,
                    phase_names=list(demo.phase_names), times=np.asarray(demo.timestamps),
                    fps=spec.fps, model_fingerprint=fingerprint if method == "learned" else "",
                    meta={"source": "synth clean demo", "embedding": method})
        if decoder is not None and "learned" in refs:
            from engine.reference import with_phase_decoder

            extra = _training_demos(act, decoder_demos - 1)
            demos = [{"joints": s.joints, "phases": s.phases} for s in [*seqs, *extra]]
            refs["learned"][act] = with_phase_decoder(refs["learned"][act], demos, spec,
                                                      decoder)
    return refs, canon


def use_references(built: dict[str, Reference],
                   given: Mapping[str, Reference]) -> dict[str, Reference]:
    """``given`` in place of ``built`` (activity -> reference), refused unless each is the
    same demo embedded by the same model: the streams' ground truth (true progress, phase
    per reference frame) maps onto that demo's frames, so another demo would be scored
    against the wrong truth."""
    out = {}
    for act, ref in built.items():
        if act not in given:
            raise ValueError(f"references: none given for {act!r} (given: "
                             f"{', '.join(sorted(given)) or 'none'})")
        mine = given[act]
        if not (len(mine) == len(ref) and mine.dim == ref.dim
                and np.allclose(mine.embeddings, ref.embeddings, atol=1e-4)):
            raise ValueError(
                f"references: {act!r} is not the harness's reference ({len(mine)} frames "
                f"against {len(ref)}: another demo or another model); build it with "
                f"`masa-rt reference build examples/demos/{act}.npz --checkpoint ...`")
        out[act] = mine
    return out


def load_references(folder: str | Path, activities: Sequence[str]) -> dict[str, Reference]:
    """``folder/<activity>.npz`` for every activity (clear error for a missing one)."""
    out = {}
    for act in activities:
        path = Path(folder) / f"{act}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"--references: no {path} (one <activity>.npz per "
                                    f"activity: {', '.join(activities)})")
        out[act] = Reference.load(path)
    return out


def _reference_sequences(act: str, spec: InputSpec, k: int, canonical: bool) -> list[Any]:
    """The demos an activity's reference is built from: the training data's first ``k``
    sequences, or the clean demo (``canonical``)."""
    if canonical:
        return [generate(act, np.random.default_rng(REFERENCE_SEED), clean=True, fps=spec.fps)]
    return _training_demos(act, k)


def _training_demos(act: str, k: int) -> list[Any]:
    """Exactly the training data's first ``k`` sequences of ``act`` (``write_dataset``)."""
    return [generate(act, sequence_rng(TRAIN_SEED, act, i), subject=f"synth{TRAIN_SEED}_{i:03d}")
            for i in range(k)]


def _multi_demo_references(act: str, spec: InputSpec, embedders: dict[str, Embedder],
                           fingerprint: str, seqs: list[Any], refine: int,
                           refs: dict[str, dict[str, Reference]]) -> np.ndarray:
    """Fill ``refs[method][act]`` from K training demos ``seqs``; return the medoid's
    canonical time on the reference's frames."""
    from engine.reference import embed_demo, reference_from_demos

    k = len(seqs)
    labels = [f"train seed {TRAIN_SEED} {act} #{i}" for i in range(k)]
    medoid = None
    for method, embed in embedders.items():
        demos = [embed_demo(None, spec, s, lab, embed=embed)
                 for s, lab in zip(seqs, labels, strict=True)]
        ref = reference_from_demos(
            demos, list(seqs[0].phase_names), activity=act, name=act, fps=spec.fps,
            labels=labels, policy="medoid", refine=refine, medoid=medoid,
            model_fingerprint=fingerprint if method == "learned" else "",
            meta={"source": f"synth train demos 0..{k - 1}", "embedding": method})
        medoid = ref.meta.get("medoid_index", 0)  # one demo: "single demo", no medoid
        refs[method][act] = ref
    seq = seqs[medoid]
    seq_t = (np.asarray(seq.timestamps, dtype=np.float64) if seq.timestamps is not None
             else np.arange(seq.num_frames) / seq.fps)
    return np.interp(refs[next(iter(embedders))][act].times, seq_t,
                     np.asarray(seq.canonical_time, dtype=np.float64))


def _true_progress(canonical_time: np.ndarray, ref_canon: np.ndarray) -> np.ndarray:
    """A stream frame's canonical time -> progress on the reference (``frame / (T - 1)``)."""
    t = len(ref_canon)
    return np.interp(canonical_time, ref_canon, np.arange(t) / (t - 1))


def make_streams(activities: Sequence[str], scenarios: Sequence[Scenario], per_activity: int,
                 seed: int, spec: InputSpec, ref_canon: dict[str, np.ndarray],
                 embedders: dict[str, Embedder]) -> list[Stream]:
    """Generate, damage and embed every val stream (deterministic in ``seed``)."""
    streams = []
    for k, scen in enumerate(scenarios):
        for act in activities:
            for i in range(per_activity):
                rng = sequence_rng(VAL_SEED_BASE + seed, act, k * 1000 + i)
                num_phases = len(ACTIVITIES[act].phases)
                seq = generate(act, rng, clean=scen.clean, fps=spec.fps,
                               variation=scen.variation,
                               perturb=scen.perturbation(num_phases, rng),
                               subject=f"val{seed}_{scen.name}_{i:03d}")
                streams.append(_observe(seq, scen, act, i, rng, spec, ref_canon[act],
                                        embedders))
    return streams


def _observe(seq: Any, scen: Scenario, act: str, index: int, rng: np.random.Generator,
             spec: InputSpec, ref_canon: np.ndarray, embedders: dict[str, Embedder]) -> Stream:
    joints = np.array(seq.joints, dtype=np.float32)
    n = len(joints)
    times = np.asarray(seq.timestamps, dtype=np.float64)
    if scen.nan_joint_frac > 0:
        joints[rng.random(joints.shape[:2]) < scen.nan_joint_frac] = np.nan
    if scen.nan_burst_s > 0:
        length = min(int(round(scen.nan_burst_s * spec.fps)), n - 2)
        start = int(rng.integers(int(0.2 * n), max(int(0.8 * n) - length, int(0.2 * n) + 1)))
        joints[start:start + length] = np.nan
    keep = np.ones(n, dtype=bool)
    if scen.drop_frac > 0:
        keep = rng.random(n) >= scen.drop_frac
        keep[0] = True
    joints, times = joints[keep], times[keep]
    lost = np.isnan(joints).reshape(len(joints), -1).all(axis=1)
    x = frame_features(joints[~lost], spec)
    stream = Stream(activity=act, scenario=scen.name, index=index, joints=joints, times=times,
                    phases=np.asarray(seq.phases)[keep].astype(np.int64),
                    progress=_true_progress(np.asarray(seq.canonical_time)[keep], ref_canon),
                    lost=lost, x=x)
    stream.emb = {m: np.asarray(e(x), dtype=np.float32) for m, e in embedders.items()}
    return stream


# ---------------------------------------------------------------------------------------
# Running the aligners
# ---------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """Per presented frame: reported phase (-1 = none), progress (NaN = none), activity,
    and the aligner's state (an index into ``masa_rt.align.STATES``; online runs only)."""

    phase: np.ndarray
    progress: np.ndarray
    activity: np.ndarray | None = None  # (n,) activity index into the activity list
    state: np.ndarray | None = None


def method_config(method: str, refs: Sequence[Reference],
                  config: AlignerConfig | None = None) -> AlignerConfig:
    """The aligner settings a streaming method runs with: ``config`` (default: the
    references' own), and for ``raw`` without the phase filter. The filter reads
    per-frame phase evidence that raw poses lack (a squat's way down and way up are the
    same poses): raw keypoints through it scored lower (Penn key events, K=1: 55.9
    against 64.9 %), so the raw baseline runs the aligner at its best for them."""
    config = config or AlignerConfig.for_references(list(refs))
    return replace(config, phase_filter=False) if method == "raw" else config


def run_bank(refs: Sequence[Reference], streams: Sequence[Stream], method: str,
             config: AlignerConfig | None = None) -> list[Predictions]:
    """Step every stream frame by frame through one bank over ``refs``.

    With lookahead L (``AlignerBank.lookahead``), step k's estimate is frame k - L's, and
    each stream ends with L steps without a pose (the aligner steps its last L frames,
    with no decoder reading further): a live stream's last L frames wait for frames
    that never come, so this is the most a stream can have.
    """
    bank = AlignerBank(list(refs), config, capacity=max(len(streams), 1))
    lag = bank.lookahead
    lengths = np.array([len(s) for s in streams])
    order = np.argsort(-lengths, kind="stable")  # active streams are always a prefix
    n_max = int(lengths.max()) + lag if len(streams) else 0
    dim = refs[0].dim
    emb = np.zeros((len(streams), n_max, dim), dtype=np.float32)
    valid = np.zeros((len(streams), n_max), dtype=bool)
    times = np.zeros((len(streams), n_max))
    xin = (np.zeros((len(streams), n_max, streams[0].x.shape[1]), dtype=np.float32)
           if bank.needs_inputs and streams else None)
    for row, s in enumerate(order.tolist()):
        n = lengths[s]
        emb[row, :n] = streams[s].full(method)
        if xin is not None:
            xin[row, :n] = streams[s].inputs()
        valid[row, :n] = ~streams[s].lost
        times[row, :n] = streams[s].times
    phase = np.full((len(streams), n_max), -1, dtype=np.int64)
    prog = np.full((len(streams), n_max), np.nan)
    ref = np.zeros((len(streams), n_max), dtype=np.int64)
    state = np.zeros((len(streams), n_max), dtype=np.int64)
    sorted_len = lengths[order] + lag
    ids = order.tolist()
    for k in range(n_max):
        m = int(np.count_nonzero(sorted_len > k))  # rows with length > k: a prefix
        out = bank.step_many(ids[:m], emb[:m, k], times[:m, k], valid[:m, k],
                             None if xin is None else xin[:m, k])
        phase[:m, k] = out.phase_id
        prog[:m, k] = out.progress
        ref[:m, k] = out.ref
        state[:m, k] = out.state
    result: list[Predictions | None] = [None] * len(streams)
    for row, s in enumerate(order.tolist()):
        n = slice(lag, lag + lengths[s])  # the steps whose estimates describe the frames
        p = prog[row, n].copy()
        p[phase[row, n] < 0] = np.nan  # waiting: no report
        result[s] = Predictions(phase[row, n].copy(), p, ref[row, n].copy(),
                                state[row, n].copy())
    return result  # type: ignore[return-value]


def run_with_activity(refs: dict[str, Reference], streams: Sequence[Stream], method: str,
                      config: AlignerConfig | None = None) -> list[Predictions]:
    """``run_per_activity``'s predictions (phase and progress, scored against the stream's
    own activity) with ``activity`` taken from one bank over all ``refs`` (activity
    identification), as the harness scores both. ``refs`` in the order of the activities
    that ``score`` is given (the bank reports an index into it)."""
    single = run_per_activity(refs, streams, method, config)
    multi = run_bank(list(refs.values()), streams, method, config)
    for p, q in zip(single, multi, strict=True):
        p.activity = q.activity
    return single


def run_per_activity(refs: dict[str, Reference], streams: Sequence[Stream], method: str,
                     config: AlignerConfig | None = None) -> list[Predictions]:
    """Each stream against its own activity's reference only (one bank per activity), as
    phase accuracy is scored; predictions in the order of ``streams``."""
    preds: list[Predictions | None] = [None] * len(streams)
    for act in dict.fromkeys(s.activity for s in streams):
        rows = [i for i, s in enumerate(streams) if s.activity == act]
        for i, p in zip(rows, run_bank([refs[act]], [streams[i] for i in rows], method,
                                       config), strict=True):
            preds[i] = p
    return preds  # type: ignore[return-value]


def run_offline(refs: dict[str, Reference], stream: Stream, method: str = "learned",
                activities: Sequence[str] = ()) -> Predictions:
    """Offline DTW of the whole stream against its activity's reference (and, for the
    activity, against every reference: the lowest mean path cost wins)."""
    q = stream.emb[method]
    live = np.flatnonzero(~stream.lost)
    ref = refs[stream.activity]
    idx_live = path_to_index(offline_dtw(q, ref.embeddings), len(q))
    idx = np.interp(np.arange(len(stream)), live, idx_live)  # lost frames: in between
    frame = np.clip(np.rint(idx).astype(np.int64), 0, len(ref) - 1)
    activity = None
    if activities:
        qn = embed_raw(q)
        costs = []
        for act in activities:
            r = refs[act].embeddings
            path = offline_dtw(q, r)
            costs.append(float(np.mean(1.0 - np.sum(qn[path[:, 0]] * r[path[:, 1]], axis=1))))
        activity = np.full(len(stream), int(np.argmin(costs)), dtype=np.int64)
    return Predictions(ref.phases[frame].astype(np.int64), idx / (len(ref) - 1), activity)


def run_online_dtw(refs: dict[str, Reference], stream: Stream,
                   method: str = "learned") -> Predictions:
    """Open-end DTW of the stream against its activity's reference, causal (each frame's
    answer from the frames up to it: ``online_dtw_index``). A lost frame holds the last
    answer; frames before the first pose are ``waiting`` (-1)."""
    ref = refs[stream.activity]
    live = np.flatnonzero(~stream.lost)
    idx = np.full(len(stream), np.nan)
    if len(live):
        idx_live = online_dtw_index(stream.emb[method], ref.embeddings)
        # each frame takes the answer of the newest live frame at or before it
        held = np.searchsorted(live, np.arange(len(stream)), side="right") - 1
        idx = np.where(held >= 0, idx_live[np.maximum(held, 0)], np.nan)
    frame = np.clip(np.rint(np.nan_to_num(idx)).astype(np.int64), 0, len(ref) - 1)
    phase = np.where(np.isnan(idx), -1, ref.phases[frame]).astype(np.int64)
    return Predictions(phase, idx / (len(ref) - 1), None)


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------

def score(streams: Sequence[Stream], preds: Sequence[Predictions],
          activities: Sequence[str], fps: float) -> dict[str, Any]:
    """Pooled metrics over ``streams`` (``masa_rt.metrics.streaming_summary``, the one
    scorer of ``masa-rt score``, the harness and the demo) plus activity identification."""
    out: dict[str, Any] = streaming_summary([s.phases for s in streams],
                                            [p.phase for p in preds],
                                            [s.progress for s in streams],
                                            [p.progress for p in preds])
    out.pop("progress_frames")
    if all(p.activity is not None for p in preds):
        right, final = [], []
        for s, p in zip(streams, preds, strict=True):
            truth = activities.index(s.activity)
            after = s.times - s.times[0] >= ACTIVITY_WARMUP_S - 0.5 / fps
            right.append(p.activity[after] == truth)
            final.append(bool(p.activity[-1] == truth))
        out["activity_frame_acc_pct"] = 100.0 * float(np.mean(np.concatenate(right)))
        out["activity_final_acc_pct"] = 100.0 * float(np.mean(final))
    return out


def run_harness(model: Any, spec: InputSpec, *, activities: Sequence[str] = HAND_ACTIVITIES,
                scenarios: Sequence[Scenario] | None = None, per_activity: int = 3,
                seed: int = 0, config: AlignerConfig | None = None, fingerprint: str = "",
                keep_streams: bool = False, reference_demos: int = 1,
                refine: int = 0, decoder: Mapping[str, Any] | None = None,
                decoder_demos: int = 1, canonical: bool = False,
                references: Mapping[str, Reference] | None = None,
                aligner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole harness: references, streams, aligners, scores; returns the JSON dict.

    ``aligner``: AlignerConfig fields to change from ``config`` (default: each method's
    references' own settings), as ``masa-rt score --aligner`` changes them.

    ``model=None`` skips the learned embedding (raw keypoints only; methods that need it
    are left out). ``keep_streams`` adds the streams and predictions (not JSON) under
    ``"_streams"`` / ``"_preds"`` for tests and the engine check. ``reference_demos``
    and ``refine``, ``decoder``, ``decoder_demos``, ``canonical``: see
    :func:`make_references`. ``references`` (activity -> built reference, e.g. the
    shipped ``examples/*.npz``, built from the canonical demos): scored as the learned
    references instead of building them (no decoder training); each must be the
    harness's own canonical demo embedded by ``model`` (:func:`use_references`); implies
    ``canonical``.
    """
    start = time.perf_counter()
    activities = list(activities)
    scenarios = list(scenarios if scenarios is not None else SCENARIOS.values())
    embedders: dict[str, Embedder] = {"raw": embed_raw}
    if model is not None:
        embedders = {"learned": embed_learned(model), **embedders}
    if references is not None and (model is None or decoder is not None
                                   or reference_demos != 1 or decoder_demos != 1):
        raise ValueError("run_harness: given references replace the learned ones as built; "
                         "they take a model and no decoder, reference_demos or "
                         "decoder_demos options")
    canonical = canonical or references is not None
    refs, canon = make_references(activities, spec, embedders, fingerprint, reference_demos,
                                  refine, decoder, decoder_demos, canonical)
    if references is not None:
        refs["learned"] = use_references(refs["learned"], references)
    streams = make_streams(activities, scenarios, per_activity, seed, spec, canon, embedders)
    t_embed = time.perf_counter() - start
    methods = [m for m in STREAMING_METHODS if m in embedders]
    preds: dict[str, list[Predictions]] = {}
    for m in methods:
        base = config or AlignerConfig.for_references(list(refs[m].values()))
        base = replace(base, **(aligner or {}))
        preds[m] = run_with_activity(refs[m], streams, m,
                                     method_config(m, list(refs[m].values()), base))
    t_stream = time.perf_counter() - start - t_embed
    offline_method = "learned" if "learned" in embedders else "raw"
    preds["offline_dtw"] = [run_offline(refs[offline_method], s, offline_method, activities)
                            for s in streams]
    t_offline = time.perf_counter() - start - t_embed - t_stream
    results: dict[str, dict[str, Any]] = {}
    per_activity_res: dict[str, dict[str, dict[str, Any]]] = {}
    for scen in scenarios:
        rows = [i for i, s in enumerate(streams) if s.scenario == scen.name]
        results[scen.name], per_activity_res[scen.name] = {}, {}
        for m in [*methods, "offline_dtw"]:
            sel = [streams[i] for i in rows]
            results[scen.name][m] = score(sel, [preds[m][i] for i in rows], activities,
                                          spec.fps)
            per_activity_res[scen.name][m] = {}
            for act in activities:
                idx = [i for i in rows if streams[i].activity == act]
                r = score([streams[i] for i in idx], [preds[m][i] for i in idx], activities,
                          spec.fps)
                per_activity_res[scen.name][m][act] = {
                    k: r[k] for k in ("phase_acc_pct", "progress_mae_pct", "delay_frames")}
    ref_check = {a: float(np.abs(canon[a] - np.arange(len(canon[a])) / (len(canon[a]) - 1))
                          .max()) for a in activities}
    out: dict[str, Any] = {
        "harness": "masa-rt streaming alignment (EVALUATION.md, 'Streaming alignment')",
        "seed": seed, "val_seed": VAL_SEED_BASE + seed, "streams_per_activity": per_activity,
        "activities": activities, "fps": spec.fps,
        "methods": {"learned": "model embeddings, online aligner",
                    "raw": "normalised keypoints (frame_features, L2-normalised), "
                           "online aligner",
                    "offline_dtw": f"offline full DTW of the whole stream ({offline_method} "
                                   "embeddings), the upper bound"},
        "scenarios": {s.name: s.description for s in scenarios},
        "aligner_config": (asdict(config) if config is not None else {
            "with_phase_decoders": asdict(AlignerConfig()),
            "without (raw keypoints, --decoder-steps 0)": asdict(
                AlignerConfig.for_references([]))}),
        "aligner_changes": dict(aligner or {}),
        "reference_demos": reference_demos,
        "canonical": canonical,
        "decoder_demos": decoder_demos if decoder is not None else 0,
        "reference": ("the generator's clean canonical demonstration (an extra row, not "
                      "how a user builds one)" if canonical else
                      f"training demo 0 (seed {TRAIN_SEED}), an ordinary performance"
                      if reference_demos == 1 else
                      f"medoid average of {reference_demos} ordinary training demos (seed "
                      f"{TRAIN_SEED}, indices 0..{reference_demos - 1}; DBA, {refine} "
                      "refinement rounds)")
                     + (f"; its phase decoder also learned from training demos 0.."
                        f"{decoder_demos - 2} (seed {TRAIN_SEED})"
                        if decoder is not None and decoder_demos > 1 else "")
                     + ("; the learned references given prebuilt (--references), their "
                        "phase decoders: " + json.dumps(
                            {a: r.meta.get("phase_decoder") for a, r in refs["learned"].items()})
                        if references is not None else ""),
        "lookahead": (AlignerBank(list(refs["learned"].values()), config, capacity=1)
                      .lookahead if "learned" in refs else 0),
        "reference_frames": {a: len(refs[methods[0]][a]) for a in activities},
        "reference_medoid": {a: refs[methods[0]][a].meta.get("demo") for a in activities},
        **({"reference_canonical_time_vs_frame_max_abs": ref_check} if canonical else {}),
        "results": results,
        "per_activity_results": per_activity_res,
        "timing_s": {"generate_and_embed": round(t_embed, 2), "stream": round(t_stream, 2),
                     "offline_dtw": round(t_offline, 2),
                     "total": round(time.perf_counter() - start, 2)},
    }
    if keep_streams:
        out["_streams"], out["_preds"], out["_refs"] = streams, preds, refs
    return out


# ---------------------------------------------------------------------------------------
# The serving path, for equality on a few streams
# ---------------------------------------------------------------------------------------

def run_engine_check(checkpoint: str | Path | None, streams: Sequence[Stream],
                     refs: dict[str, Reference], preds: Sequence[Predictions],
                     config: AlignerConfig | None = None) -> dict[str, Any]:
    """Run ``streams`` through ONNX export + ``Pipeline`` (ONNX Runtime) and compare the
    estimates with the harness's (``preds``: learned, single reference), frame by frame.

    The streams must be on the model's frame grid (no dropped frames): the engine
    resamples, which would make a different (interpolated) stream. With lookahead L, the
    answer to frame k is frame k - L's estimate, compared with the harness's for that
    frame; the harness's last L frames (its end-of-stream steps) have no answer to match.
    """
    from engine.export import export_onnx, resolve_checkpoint
    from engine.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="masa_harness_") as tmp:
        onnx_path = export_onnx(resolve_checkpoint(checkpoint), Path(tmp) / "model.onnx")
        acts = sorted({s.activity for s in streams})
        paths = []
        for act in acts:
            paths.append(Path(tmp) / f"{act}.npz")
            refs[act].save(paths[-1])
        pipe = Pipeline.from_files(onnx_path, paths, "onnxruntime", capacity=len(streams),
                                   aligner_config=config)
        layout = pipe.spec.layout
        lags = []  # per session: its reference's lookahead, as its welcome tells it
        for n, s in enumerate(streams):
            info = pipe.open_session(f"s{n}", layout, pipe.spec.fps, reference=s.activity)
            lags.append(round(info["lookahead_s"] * pipe.spec.fps))
            for k in range(len(s)):
                pipe.submit(f"s{n}", k, float(s.times[k]), s.joints[k])
        got: dict[str, dict[int, Any]] = {}
        for sid, seq, _t, est in pipe.step():
            got.setdefault(sid, {})[seq] = est
    phase_eq, prog_diff, frames, differ = 0, 0.0, 0, 0
    for n, (s, p, lag) in enumerate(zip(streams, preds, lags, strict=True)):
        ests = got.get(f"s{n}", {})
        for k in range(lag, len(s)):
            est = ests.get(k)
            if est is None:
                continue
            frames += 1
            phase_eq += int(est.phase_id == p.phase[k - lag])
            if np.isfinite(p.progress[k - lag]):
                diff = abs(est.progress - float(p.progress[k - lag]))
                prog_diff, differ = max(prog_diff, diff), differ + int(diff > 1e-3)
    total = sum(len(s) - lag for s, lag in zip(streams, lags, strict=True))
    return {"streams": [f"{s.scenario}/{s.activity}/{s.index}" for s in streams],
            "frames": total, "answered": frames, "lookahead": max(lags, default=0),
            "phase_equal_pct": 100.0 * phase_eq / max(frames, 1),
            "progress_max_abs_diff": prog_diff, "progress_frames_differ": differ}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Rows scenario x method; columns phase acc, progress MAE, delay, activity id."""
    lines = ["| scenario | method | phase acc % | progress MAE % | delay (frames) | "
             "missed changes % | activity id % (frames) | activity id % (final) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for scen, by_method in report["results"].items():
        for method, r in by_method.items():
            lines.append(
                f"| {scen} | {method} | {_fmt(r['phase_acc_pct'])} | "
                f"{_fmt(r['progress_mae_pct'], 2)} | {_fmt(r['delay_frames'])} | "
                f"{_fmt(r['missed_changes_pct'])} | {_fmt(r.get('activity_frame_acc_pct'))} | "
                f"{_fmt(r.get('activity_final_acc_pct'))} |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], command: str = "", model: str = "") -> str:
    """The whole ``docs/streaming_results.md``: how it was made, the table, the checks."""
    n_streams = next(iter(next(iter(report["results"].values())).values()))["streams"]
    scen_lines = "\n".join(f"- `{k}`: {v}" for k, v in report["scenarios"].items())
    method_lines = "\n".join(f"- `{k}`: {v}" for k, v in report["methods"].items())
    reference = report.get("reference", "the generator's clean demonstration")
    parts = [
        "# Streaming alignment results",
        "",
        "Generated by `engine/harness.py` (EVALUATION.md, \"Streaming alignment\"); do not "
        "edit by hand, rerun the command instead.",
        "",
        f"- command: `{command or 'masa-rt harness'}`",
        f"- model: `{model or '?'}`",
        f"- activities: {', '.join(report['activities'])}; {report['streams_per_activity']} val "
        f"streams per activity and scenario ({n_streams} per scenario), seed "
        f"{report['seed']} (val seed namespace {report['val_seed']}, disjoint from training)",
        f"- run time: {report['timing_s']['total']:.0f} s",
        *([f"- lookahead: {report['lookahead']} frames (the learned references' phase "
           "decoders): each estimate describes the frame that many frames before the newest, "
           "and is scored against that frame's truth; the phase-change delay is in described "
           f"frames (add {report['lookahead']} for the wall-clock delay)"]
          if report.get("lookahead") else []),
        "",
        f"Reference per activity: {reference}. "
        "Each val stream runs "
        "through the online aligner frame by frame. Phase accuracy is per frame (a frame "
        "without a report counts as wrong). Progress MAE is against the generator's "
        "canonical time, mapped onto the reference. Delay is the mean number of frames "
        "from a true phase change until the reported phase is the new one; missed changes "
        "(the new phase is never reported before the next change) are counted apart. "
        "Activity id loads all the references in one aligner: the share of frames after "
        "the first second with the right activity, and the share of streams whose last "
        "frame names it.",
        "",
        "Scenarios:",
        "",
        scen_lines,
        "",
        "Methods:",
        "",
        method_lines,
        "",
        markdown_table(report),
        "",
    ]
    clean = report["results"].get("clean", {}).get("learned")
    if clean is not None:
        met = clean["phase_acc_pct"] >= 95.0 and clean["progress_mae_pct"] <= 3.0
        lo, hi = clean.get("phase_acc_ci95_pct") or (None, None)
        spread = (f" (95 % bootstrap interval over the streams: {_fmt(lo, 2)} to "
                  f"{_fmt(hi, 2)} %)" if lo is not None and math.isfinite(lo) else "")
        parts += [
            f"Target (issue 5, clean streams, learned): phase accuracy >= 95 % and progress "
            f"MAE <= 3 %: {clean['phase_acc_pct']:.2f} %{spread} and "
            f"{clean['progress_mae_pct']:.2f} %, {'met' if met else 'NOT met'} by the point "
            "estimate. What bounds it on these streams (timing, "
            "each subject's key poses, the metric's own ceiling): `python "
            "benchmarks/phase_ceiling.py`; where the wrong frames are (near phase changes, "
            "in pauses close to a phase's end): `python benchmarks/error_anatomy.py`; both "
            "discussed in docs/changelog.md.",
            "",
        ]
    if "engine_check" in report:
        ec = report["engine_check"]
        parts += [
            "Serving path check (ONNX export + `engine.pipeline.Pipeline`, ONNX Runtime): "
            f"{len(ec['streams'])} streams, {ec['answered']} of {ec['frames']} frames "
            f"answered, phase equal to the harness on {ec['phase_equal_pct']:.2f} % of "
            f"frames, progress max abs difference {ec['progress_max_abs_diff']:.2g} "
            f"({ec['progress_frames_differ']} frames differ by more than 1e-3: ONNX Runtime "
            "and torch differ by ~1e-6, which can flip a near-tie of the tracker's argmin).",
            "",
        ]
    parts += [
        "Notes:",
        "",
        "- Offline DTW is monotonic: it cannot follow a restart or a repeated phase, so "
        "in those scenarios it is not an upper bound.",
        "- `dropped`: the encoder sees only the frames that arrived (the stream is "
        "irregular) and the aligner gets their true timestamps. The serving engine would "
        "resample onto the model's grid (interpolating across the gaps) instead.",
        "- Per-activity numbers are in the JSON (`per_activity_results`).",
        "",
    ]
    return "\n".join(parts)


def write_outputs(report: dict[str, Any], out_dir: str | Path, command: str = "",
                  model: str = "") -> tuple[Path, Path]:
    """``OUT/streaming_results.json`` and ``OUT/streaming_results.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    json_path, md_path = out / "streaming_results.json", out / "streaming_results.md"
    json_path.write_text(json.dumps(json_safe(public), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown_report(public, command, model))
    return json_path, md_path


def json_safe(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN / inf to null."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

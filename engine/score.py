"""``masa-rt score``: how often the live phase is right on labelled recordings.

Every labelled recording (a sequence file, a folder of them, or a dataset folder: its
``val`` split unless told) is streamed live through the serving :class:`Pipeline`, the
object ``masa-rt serve`` runs: frame by frame at the recording's own capture timestamps,
resampled, encoded and aligned exactly as a headset's frames would be. Recordings run
``concurrency`` at a time as concurrent sessions, as a server holds them; each recording
aligns to the reference of its own activity (how phase accuracy is defined), and, when
several references are given, a second session per recording names none of them, so the
engine identifies the activity as it does for a client that does not say it.

Every capture frame's answer is scored against the truth of the frame it describes (the
frame itself, or the frame ``L`` model frames earlier for a reference whose phase decoder
has lookahead ``L``); a frame answered ``waiting`` counts wrong.

Baselines, on the same streams and the same model frames (recorded with ``Pipeline.tap``,
so they see exactly what the served encoder saw):

- ``no_decoder``: the served encoder's embeddings through the same aligner without the
  reference's phase decoder (the aligner's decoder-free settings);
- ``raw``: the normalised keypoints (the model's input rows) through the same aligner,
  against the reference's ``raw_embeddings`` (the same demos, averaged the same way):
  no encoder, no decoder;
- ``online_dtw_learned`` / ``online_dtw_raw``: open-end DTW against the whole reference,
  each frame answered from the frames up to it (``masa_rt.align.online_dtw_index``): the
  plain causal alignment, the fair online counterpart of offline DTW;
- ``offline_dtw_learned`` / ``offline_dtw_raw``: full DTW of the whole recording against
  the reference, the offline upper bound of a monotonic alignment (it cannot follow a
  recording that repeats the procedure more or fewer times than the reference does). It
  knows where the recording ends, which no live answer does: on short recordings (a
  Penn Action clip is one repetition) that alone is worth several points.

Figures (``masa_rt.metrics.streaming_summary``, the one function behind this command,
the harness and the demo): per-frame phase accuracy with a 95 % bootstrap interval over
whole recordings, each baseline's paired difference to the engine, progress error where
the recording's phase runs match the reference's (true progress is linear within each
phase run, mapped onto the reference's run), phase-change delay, activity identification,
and the pipeline's time per step.

No torch here: scoring needs only what serving needs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.harness import (
    Predictions,
    Stream,
    json_safe,
    method_config,
    run_bank,
    run_offline,
    run_online_dtw,
)
from engine.pipeline import Pipeline
from engine.streams import nearest_index
from masa_rt.align import AlignerConfig, Reference
from masa_rt.atomic import atomic_write, atomic_write_json
from masa_rt.metrics import paired_accuracy_difference_ci, streaming_summary
from masa_rt.preprocess import raw_embedding
from masa_rt.sequence import Dataset, SequenceFormatError, load_sequence
from masa_rt.skeleton import conversion_map

__all__ = ["METHODS", "Recording", "find_recordings", "markdown_report", "run_score",
           "score_pipeline", "true_progress", "write_report"]

log = logging.getLogger(__name__)

METHODS = {
    "engine": "the served pipeline (ONNX Runtime): causal encoder + aligner + the "
              "reference's phase decoder, if it has one",
    "no_decoder": "the served encoder's embeddings through the same aligner, without the "
                  "reference's phase decoder",
    "raw": "normalised keypoints through the same aligner: no encoder, no decoder",
    "online_dtw_learned": "open-end DTW against the whole reference, each frame from the "
                          "frames up to it (causal), learned embeddings",
    "online_dtw_raw": "open-end DTW, causal, normalised keypoints",
    "offline_dtw_learned": "offline DTW of the whole recording, learned embeddings "
                           "(upper bound of a monotonic alignment)",
    "offline_dtw_raw": "offline DTW of the whole recording, normalised keypoints",
}
ACTIVITY_WARMUP_S = 1.0  # activity identification is scored after the first second
_NO_TRUTH = -2  # an answer describing a moment before the recording: never right


@dataclass
class Recording:
    """One labelled recording, as it will be streamed."""

    name: str
    activity: str
    times: np.ndarray  # (n,) capture seconds, non-decreasing
    joints: np.ndarray  # (n, J, C)
    phases: np.ndarray  # (n,) true phase id
    layout: str
    fps: float


@dataclass
class _Result:
    """What one recording got: per method, per capture frame, the truth of the frame the
    answer describes, the reported phase and progress; the model frames it made."""

    rec: Recording
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    phase: dict[str, np.ndarray] = field(default_factory=dict)
    progress: dict[str, np.ndarray] = field(default_factory=dict)
    true_progress: dict[str, np.ndarray] = field(default_factory=dict)
    activity: list[str] | None = None
    frames: list[tuple[float, np.ndarray | None, np.ndarray | None, bool]] = field(
        default_factory=list)


# ---------------------------------------------------------------------------------------
# Recordings
# ---------------------------------------------------------------------------------------

def _sequence_files(path: Path, split: str) -> list[tuple[Path, Any]]:
    """(file, loader) pairs: a file, a dataset folder (its split), or a folder of .npz."""
    if path.is_file():
        return [(path, None)]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if (path / "manifest.json").is_file():
        ds = Dataset(path)
        entries = ds.entries(None if split == "all" else split)
        return [(path / e.file, (ds, e)) for e in entries]
    files = sorted(path.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"--data {path}: no manifest.json and no .npz files")
    return [(f, None) for f in files]


def find_recordings(paths: Sequence[str | os.PathLike[str]], activities: Sequence[str],
                    layout: str, split: str = "val",
                    exclude: frozenset[Path] = frozenset()) -> tuple[list[Recording], Counter]:
    """Every labelled recording under ``paths`` whose activity has a reference, and the
    count of the others by reason (never silently dropped). ``exclude``: resolved paths
    of the references' own demos, which are not held-out queries."""
    recs: list[Recording] = []
    skipped: Counter = Counter()
    for p in paths:
        for file, entry in _sequence_files(Path(p), split):
            try:
                seq = entry[0].load(entry[1]) if entry else load_sequence(file)
            except SequenceFormatError as e:
                log.warning("score: skipped %s: %s", file, e)
                skipped["unreadable"] += 1
                continue
            activity = seq.activity or (entry[1].activity if entry else "")
            if file.resolve() in exclude:
                skipped["a reference was built from it"] += 1
            elif seq.phases is None:
                skipped["no phase labels"] += 1
            elif activity not in activities:
                skipped[f"no reference for activity {activity or '?'}"] += 1
            elif seq.layout != layout and not _converts(seq.layout, layout):
                skipped[f"layout {seq.layout}, the model reads {layout}"] += 1
            elif seq.num_frames < 2:
                skipped["fewer than 2 frames"] += 1
            else:
                times = (np.asarray(seq.timestamps, dtype=np.float64)
                         if seq.timestamps is not None else np.arange(seq.num_frames) / seq.fps)
                recs.append(Recording(str(file), activity, times, seq.joints,
                                      np.asarray(seq.phases, dtype=np.int64), seq.layout,
                                      float(seq.fps)))
    return recs, skipped


def _converts(src: str, dst: str) -> bool:
    """The pipeline converts a session in layout ``src`` to the model's ``dst`` (a joint
    map exists: a declared layout's convert_to, OpenXR hands, COCO-17, ...)."""
    try:
        conversion_map(src, dst)
    except ValueError:  # UnknownLayoutError, UnsupportedConversionError
        return False
    return True


def _runs(phases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First frame and one-past-last frame of each run of equal phase."""
    change = np.flatnonzero(np.diff(phases)) + 1
    return np.concatenate([[0], change]), np.concatenate([change, [len(phases)]])


def true_progress(phases: np.ndarray, ref: Reference) -> np.ndarray:
    """(n,) progress on ``ref`` of each frame of a recording labelled ``phases``: the k-th
    run of equal phase maps linearly onto the reference's k-th run. NaN everywhere when
    the runs' phases differ from the reference's (another number of repetitions, a
    skipped phase): overall progress is then undefined, and the recording is left out of
    the progress error."""
    phases = np.asarray(phases)
    qs, qe = _runs(phases)
    rs, re = _runs(ref.phases)
    if not np.array_equal(phases[qs], ref.phases[rs]):
        return np.full(len(phases), np.nan)
    out = np.empty(len(phases))
    for a, b, c, d in zip(qs, qe, rs, re, strict=True):
        frac = np.arange(b - a) / max(b - a - 1, 1)
        out[a:b] = (c + frac * (d - 1 - c)) / (len(ref) - 1)
    return out


def _described_truth(rec: Recording, lag_s: float, ref: Reference) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Truth (phase, progress) of the frame each capture frame's answer describes."""
    if lag_s <= 0:
        return rec.phases, true_progress(rec.phases, ref)
    described = rec.times - lag_s
    idx = nearest_index(rec.times, described)
    phase = rec.phases[idx].copy()
    before = described < rec.times[0] - 0.5 / rec.fps
    phase[before] = _NO_TRUTH
    prog = true_progress(rec.phases, ref)[idx]
    prog[before] = np.nan
    return phase, prog


# ---------------------------------------------------------------------------------------
# The engine, live
# ---------------------------------------------------------------------------------------

def _stream_group(pipe: Pipeline, group: list[_Result], identify: bool,
                  latency: list[tuple[float, int]]) -> None:
    """Stream one group of recordings as concurrent sessions, frame k of each per round."""
    n = len(group)
    out_phase = [np.full(len(r.rec.times), -1, dtype=np.int64) for r in group]
    out_prog = [np.full(len(r.rec.times), np.nan) for r in group]
    acts = [[""] * len(r.rec.times) for r in group]
    pipe.tap = lambda sid, f, x, e: (group[int(sid[1:])].frames.append((f.t, x, e, f.lost))
                                     if sid[0] == "p" else None)
    try:
        for i, r in enumerate(group):
            pipe.open_session(f"p{i}", r.rec.layout, r.rec.fps, reference=r.rec.activity)
            if identify:
                pipe.open_session(f"a{i}", r.rec.layout, r.rec.fps)
        for k in range(max(len(r.rec.times) for r in group)):
            live = [i for i in range(n) if k < len(group[i].rec.times)]
            for i in live:
                rec = group[i].rec
                for kind in ("pa" if identify else "p"):
                    pipe.submit(f"{kind}{i}", k, float(rec.times[k]), rec.joints[k])
            start = time.perf_counter()
            answers = pipe.step()
            # frames this step encoded and aligned: every live session's (two per
            # recording when a second session identifies the activity)
            latency.append((time.perf_counter() - start, len(live) * (1 + identify)))
            for sid, seq, _t, est in answers:
                i = int(sid[1:])
                if sid[0] == "p":
                    out_phase[i][seq] = est.phase_id
                    out_prog[i][seq] = est.progress if est.phase_id >= 0 else np.nan
                else:
                    acts[i][seq] = est.activity
    finally:
        pipe.tap = None
        for sid in list(pipe.sessions):
            pipe.close_session(sid)
    for i, r in enumerate(group):
        r.phase["engine"], r.progress["engine"] = out_phase[i], out_prog[i]
        r.activity = acts[i] if identify else None


# ---------------------------------------------------------------------------------------
# Baselines on the engine's own model frames
# ---------------------------------------------------------------------------------------

def _model_stream(r: _Result, index: int) -> Stream:
    """The model frames the pipeline made for ``r``, as the harness's aligner runs take
    them (truth: the capture frame nearest each model frame)."""
    t = np.array([f[0] for f in r.frames])
    lost = np.array([f[3] for f in r.frames], dtype=bool)
    x = np.stack([f[1] for f in r.frames if not f[3]]).astype(np.float32)
    emb = np.stack([f[2] for f in r.frames if not f[3]]).astype(np.float32)
    phases = r.rec.phases[nearest_index(r.rec.times, t)]
    return Stream(activity=r.rec.activity, scenario="score", index=index, joints=np.empty(0),
                  times=t, phases=phases, progress=np.full(len(t), np.nan), lost=lost, x=x,
                  emb={"learned": emb, "raw": raw_embedding(x)})


def _to_capture(r: _Result, stream: Stream, pred: Predictions) -> tuple[np.ndarray,
                                                                        np.ndarray]:
    """Each capture frame gets the prediction of the newest model frame at or before it,
    as the pipeline answers a capture frame that completes no model frame."""
    m = np.searchsorted(stream.times, r.rec.times + 1e-6, side="right") - 1
    phase = np.where(m >= 0, pred.phase[np.maximum(m, 0)], -1)
    prog = np.where(m >= 0, pred.progress[np.maximum(m, 0)], np.nan)
    return phase.astype(np.int64), prog


def _baseline_references(refs: dict[str, Reference]) -> dict[str, dict[str, Reference]]:
    """Per baseline method, activity -> its reference (raw only where every reference
    carries ``raw_embeddings``)."""
    out = {"no_decoder": {a: replace(r, decoder=None) for a, r in refs.items()}}
    if all(r.raw_embeddings is not None for r in refs.values()):
        # The phase filter's exemplars are learned embeddings: the raw baseline's filter
        # reads its own (averaged) timeline instead.
        out["raw"] = {a: replace(r, embeddings=r.raw_embeddings, decoder=None,
                                 model_fingerprint="", exemplar_embeddings=None,
                                 exemplar_phases=None, exemplar_starts=None)
                      for a, r in refs.items()}
    return out


def _run_baselines(results: list[_Result], refs: dict[str, Reference],
                   aligner: Mapping[str, Any] | None = None) -> list[str]:
    """Fill every baseline's predictions; returns the methods run. ``aligner``: the
    same AlignerConfig changes the engine runs with."""
    usable = [(i, r) for i, r in enumerate(results) if any(not f[3] for f in r.frames)]
    streams = [_model_stream(r, i) for i, r in usable]
    variants = _baseline_references(refs)
    methods = []
    for method, by_act in variants.items():
        embedding = "learned" if method == "no_decoder" else "raw"
        for act, ref in by_act.items():
            rows = [k for k, s in enumerate(streams) if s.activity == act]
            if not rows:
                continue
            config = AlignerConfig.for_references([ref], **(aligner or {}))
            config = method_config(embedding, [ref], config)  # raw: no phase filter
            preds = run_bank([ref], [streams[k] for k in rows], embedding, config)
            for k, p in zip(rows, preds, strict=True):
                _store(usable[k][1], method, streams[k], p)
        methods.append(method)
        online, offline = f"online_dtw_{embedding}", f"offline_dtw_{embedding}"
        for (_i, r), s in zip(usable, streams, strict=True):
            _store(r, online, s, run_online_dtw(by_act, s, embedding))
            _store(r, offline, s, run_offline(by_act, s, embedding))
        methods += [online, offline]
    for r in results:  # a recording with no frame to encode: every baseline silent
        for m in methods:
            if m not in r.phase:
                r.phase[m] = np.full(len(r.rec.times), -1, dtype=np.int64)
                r.progress[m] = np.full(len(r.rec.times), np.nan)
    return sorted(methods, key=list(METHODS).index)


def _store(r: _Result, method: str, stream: Stream, pred: Predictions) -> None:
    r.phase[method], r.progress[method] = _to_capture(r, stream, pred)


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------

def _summaries(results: list[_Result], methods: list[str], refs: dict[str, Reference],
               lag_s: float) -> dict[str, dict[str, Any]]:
    """Per method: the streaming summary and, for baselines, the paired difference."""
    for r in results:
        ref = refs[r.rec.activity]
        truth_now = _described_truth(r.rec, 0.0, ref)
        for m in methods:
            r.truth[m], r.true_progress[m] = (_described_truth(r.rec, lag_s, ref)
                                              if m == "engine" else truth_now)
    out = {}
    for m in methods:
        s = streaming_summary([r.truth[m] for r in results], [r.phase[m] for r in results],
                              [r.true_progress[m] for r in results],
                              [r.progress[m] for r in results])
        s["progress_streams"] = sum(bool(np.isfinite(r.true_progress[m]).any())
                                    for r in results)
        if m != "engine" and lag_s == 0:  # same truth per frame: a paired comparison
            s["minus_engine_pts_ci95"] = list(paired_accuracy_difference_ci(
                [r.truth[m] for r in results], [r.phase[m] for r in results],
                [r.phase["engine"] for r in results]))
        out[m] = s
    return out


def _activity_id(results: list[_Result], activities: list[str]) -> dict[str, Any] | None:
    if results[0].activity is None:
        return None
    right, final = [], []
    for r in results:
        after = r.rec.times - r.rec.times[0] >= ACTIVITY_WARMUP_S - 0.5 / r.rec.fps
        named = np.array(r.activity)
        right.append(named[after] == r.rec.activity)
        final.append(bool(named[-1] == r.rec.activity))
    frames = np.concatenate(right)
    return {"references": activities,
            "frame_acc_pct": 100.0 * float(frames.mean()) if frames.size else math.nan,
            "final_acc_pct": 100.0 * float(np.mean(final))}


def _per_activity(results: list[_Result], methods: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for act in sorted({r.rec.activity for r in results}):
        sel = [r for r in results if r.rec.activity == act]
        out[act] = {}
        for m in methods:
            s = streaming_summary([r.truth[m] for r in sel], [r.phase[m] for r in sel])
            out[act][m] = {k: s[k] for k in ("streams", "frames", "phase_acc_pct",
                                             "phase_acc_ci95_pct", "delay_frames")}
    return out


def _per_recording(results: list[_Result], methods: list[str]) -> list[dict[str, Any]]:
    """Each recording's accuracy per method: for paired tests of one's own."""
    return [{"file": r.rec.name, "activity": r.rec.activity, "frames": len(r.rec.times),
             "phase_acc_pct": {m: 100.0 * float(np.mean(r.phase[m] == r.truth[m]))
                               for m in methods}} for r in results]


def _latency(latency: list[tuple[float, int]]) -> dict[str, Any]:
    secs = np.array([d for d, _n in latency])
    sessions = np.array([n for _d, n in latency])
    return {"rounds": len(latency),
            "streams_per_round_mean": float(sessions.mean()),
            "step_ms_p50": 1e3 * float(np.percentile(secs, 50)),
            "step_ms_p99": 1e3 * float(np.percentile(secs, 99)),
            "frames_per_s": float(sessions.sum() / max(secs.sum(), 1e-9))}


def score_pipeline(pipe: Pipeline, refs: dict[str, Reference], recordings: list[Recording],
                   *, concurrency: int = 64, baselines: bool = True,
                   aligner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Stream ``recordings`` through ``pipe`` and score it and the baselines (the report
    dict without the run's provenance; see :func:`run_score`). ``aligner``: the changes
    to AlignerConfig ``pipe`` was built with, applied to the baselines too."""
    if not recordings:
        raise ValueError("score: no labelled recording of a referenced activity to score")
    identify = len(refs) > 1
    results = [_Result(r) for r in recordings]
    latency: list[tuple[float, int]] = []
    start = time.perf_counter()
    for g in range(0, len(results), concurrency):
        _stream_group(pipe, results[g:g + concurrency], identify, latency)
    t_engine = time.perf_counter() - start
    methods = ["engine", *(_run_baselines(results, refs, aligner) if baselines else [])]
    lag_s = pipe.lookahead / pipe.spec.fps
    report = {
        "methods": {m: METHODS[m] for m in methods},
        "lookahead_frames": pipe.lookahead,
        "results": _summaries(results, methods, refs, lag_s),
        "per_activity": _per_activity(results, methods),
        "per_recording": _per_recording(results, methods),
        "activity_id": _activity_id(results, sorted(refs)),
        "latency": {**_latency(latency), "concurrency": concurrency},
        "timing_s": {"engine": round(t_engine, 2),
                     "total": round(time.perf_counter() - start, 2)},
    }
    report["_results"] = results
    return report


def run_score(reference_paths: Sequence[str | os.PathLike[str]],
              data_paths: Sequence[str | os.PathLike[str]], *, model: str | None = None,
              split: str = "val", concurrency: int = 64, baselines: bool = True,
              capacity: int | None = None,
              aligner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole ``masa-rt score``: load the model and references as ``serve`` does,
    find the recordings, stream and score them; returns the report dict. ``aligner``:
    AlignerConfig fields to change from the references' defaults (every method)."""
    from engine.serve_commands import prepare  # its child process builds/exports if asked

    onnx, ref_paths = prepare(model, [str(p) for p in reference_paths])
    needed = 2 * concurrency if len(ref_paths) > 1 else concurrency
    config = None
    if aligner:
        config = AlignerConfig.for_references([Reference.load(p) for p in ref_paths], **aligner)
    pipe = Pipeline.from_files(onnx, ref_paths, "onnxruntime", capacity=capacity or needed,
                               aligner_config=config)
    try:
        refs = pipe.references
        recs, skipped = find_recordings(data_paths, sorted(refs), pipe.spec.layout, split,
                                        _demo_files(refs.values()))
        if not recs:
            raise ValueError(f"score: no labelled recording of {', '.join(sorted(refs))} "
                             f"in {', '.join(map(str, data_paths))} (split {split}); "
                             f"skipped: {dict(skipped) or 'none found'}")
        report = score_pipeline(pipe, refs, recs, concurrency=concurrency,
                                baselines=baselines, aligner=aligner)
    finally:
        pipe.close()
    report.update(
        scorer="masa-rt score (EVALUATION.md, 'Streaming alignment')",
        model={"onnx": str(onnx), "fingerprint": pipe.model_name, "fps": pipe.spec.fps,
               "layout": pipe.spec.layout},
        references=[_describe(p, r) for p, r in zip(ref_paths, refs.values(), strict=True)],
        data=[str(p) for p in data_paths], split=split, recordings=len(recs),
        aligner_changes=dict(aligner or {}),
        skipped=dict(skipped))
    return report


def _built_from(ref: Reference) -> list[str]:
    """The recordings a reference was built from, as its metadata names them (every demo
    of an average; the one demo otherwise)."""
    if "demos" in ref.meta:
        return [d["file"] for d in ref.meta["demos"]]
    return [ref.meta["demo"]] if "demo" in ref.meta else []


def _demo_files(refs: Any) -> frozenset[Path]:
    """The recordings the references were built from that exist here, resolved."""
    return frozenset(Path(f).resolve() for ref in refs for f in _built_from(ref)
                     if Path(f).is_file())


def _describe(path: Path, ref: Reference) -> dict[str, Any]:
    return {"file": str(path), "activity": ref.activity, "frames": len(ref),
            "phases": list(ref.phase_names),
            "decoders": ref.decoder.size if ref.decoder is not None else 0,
            "raw_baseline": ref.raw_embeddings is not None,
            "built_from": _built_from(ref)}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _ci(pair: Sequence[float] | None, digits: int = 1, signed: bool = False) -> str:
    if not pair or not all(isinstance(v, float) and math.isfinite(v) for v in pair):
        return "-"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{fmt.format(pair[0])} to {fmt.format(pair[1])}"


def markdown_table(report: dict[str, Any]) -> str:
    """Methods as rows: accuracy with its interval, the paired difference to the engine,
    progress error, delay, missed changes."""
    lines = ["| method | phase acc % | 95 % CI | minus engine, pts (95 % CI) | "
             "progress MAE % (streams) | delay, frames | missed changes % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in report["results"].items():
        lines.append(
            f"| {m} | {_f(r['phase_acc_pct'])} | {_ci(r['phase_acc_ci95_pct'])} | "
            f"{_ci(r.get('minus_engine_pts_ci95'), signed=True)} | "
            f"{_f(r['progress_mae_pct'], 2)} ({r['progress_streams']}) | "
            f"{_f(r['delay_frames'])} | {_f(r['missed_changes_pct'])} |")
    return "\n".join(lines)


def per_activity_table(report: dict[str, Any]) -> str:
    methods = list(report["results"])
    lines = ["| activity | streams | " + " | ".join(methods) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for act, by_m in report["per_activity"].items():
        lines.append(f"| {act} | {by_m['engine']['streams']} | "
                     + " | ".join(_f(by_m[m]["phase_acc_pct"]) for m in methods) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], command: str = "") -> str:
    lat, aid = report["latency"], report.get("activity_id")
    refs = report.get("references", [])
    lines = [
        "# masa-rt score",
        "",
        *([f"- command: `{command}`"] if command else []),
        f"- model: `{report.get('model', {}).get('fingerprint', '?')}`",
        f"- recordings: {report.get('recordings')} ({report.get('split')} split of "
        f"{', '.join(report.get('data', []))}); skipped: "
        f"{', '.join(f'{v} {k}' for k, v in report.get('skipped', {}).items()) or 'none'}",
        f"- references: {len(refs)} ("
        + ", ".join(f"{r['activity']}: {r['frames']} frames, {r['decoders']} decoders"
                    for r in refs) + ")",
        *([f"- lookahead: {report['lookahead_frames']} frames (engine answers scored "
           "against the frame they describe)"] if report.get("lookahead_frames") else []),
        "",
        markdown_table(report),
        "",
        *[f"- `{m}`: {d}" for m, d in report["methods"].items()],
        "",
        per_activity_table(report),
        "",
        *([f"Activity identification ({len(aid['references'])} references loaded): "
           f"{_f(aid['frame_acc_pct'])} % of frames after the first second, "
           f"{_f(aid['final_acc_pct'])} % of recordings at their last frame.", ""]
          if aid else []),
        f"Pipeline step ({lat['concurrency']} recordings streamed at once, "
        f"{lat['streams_per_round_mean']:.1f} frames per step on average): p50 "
        f"{_f(lat['step_ms_p50'], 2)} ms, p99 {_f(lat['step_ms_p99'], 2)} ms, "
        f"{_f(lat['frames_per_s'], 0)} frames/s; whole run {report['timing_s']['total']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str],
                 command: str = "") -> tuple[Path, Path]:
    """``OUT/score.json`` and ``OUT/score.md``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    json_path, md_path = out / "score.json", out / "score.md"
    atomic_write_json(json_path, json_safe(public))
    with atomic_write(md_path, "w") as f:
        f.write(markdown_report(public, command))
    return json_path, md_path

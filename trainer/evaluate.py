"""``masa-rt eval``: every EVALUATION.md metric the data supports, for any embedder.

:func:`evaluate` embeds each video of a dataset once (unaugmented, whole clip in one pass)
with an :class:`~trainer.baselines.Embedder`, then computes each metric whose labels exist:

===========================  ====================================================
phase labels on an activity  phase classification, phase progress, frame retrieval
>= 2 val videos of one act.  Kendall's tau + content checks (reversed clip, crop)
>= 2 activities              action recognition, activity separation
===========================  ====================================================

Phase metrics are computed per activity (each activity has its own phases: phase 0 of
"pour milk" is not phase 0 of "stir cup") and averaged over activities, as TCC averages its
per-action Penn Action results. Whatever cannot be computed is listed under ``skipped`` with
the reason, so a missing number is never mistaken for a bad one. The clock baseline
``[t/T]`` is computed beside tau and the content checks on the same videos, always.

Outputs in ``out_dir``: ``metrics.json`` (atomic), ``metrics.md`` (a Markdown table) and
the pictures of :mod:`trainer.eval_plots`. Seconds per stage are in ``timings_s``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from masa_rt import __version__, metrics
from masa_rt.atomic import atomic_write, atomic_write_json
from masa_rt.sequence import Dataset, ManifestEntry, Sequence
from trainer.baselines import Embedder
from trainer.eval_plots import plot_alignment, plot_tsne

__all__ = ["CROP_FRACTION", "EVAL_FORMAT", "Clip", "crop_sequence", "evaluate",
           "reverse_sequence", "select_entries"]

log = logging.getLogger(__name__)

EVAL_FORMAT = "masa-rt-eval"
CROP_FRACTION = 0.25
AR_FRAMES = 16
_PER_FRAME = ("joints", "timestamps", "features", "phases", "canonical_time")


class _Skip(Exception):
    """A metric the data cannot support; the message is the reason shown in the report."""


@dataclass
class Clip:
    """One embedded video and the labels the metrics may use."""

    name: str
    activity: str
    split: str
    emb: np.ndarray  # (T, d)
    phases: np.ndarray | None  # (T,) or None without labels
    num_phases: int  # len(phase_names); 0 without labels
    canonical_time: np.ndarray | None = None
    reversed_emb: np.ndarray | None = None  # embedding of the clip played backwards
    cropped_emb: np.ndarray | None = None  # embedding of the clip without its first 25%


# ----------------------------------------------------------------------------- sequences

def _slice_frames(seq: Sequence, index: slice) -> Sequence:
    """The sequence with every per-frame field indexed alike."""
    changes = {f: getattr(seq, f)[index] for f in _PER_FRAME if getattr(seq, f) is not None}
    return replace(seq, **changes)


def reverse_sequence(seq: Sequence) -> Sequence:
    """The clip played backwards (timestamps stay non-decreasing)."""
    out = _slice_frames(seq, slice(None, None, -1))
    if seq.timestamps is not None:
        out.timestamps = seq.timestamps[-1] - seq.timestamps[::-1]
    return out


def crop_sequence(seq: Sequence, fraction: float = CROP_FRACTION) -> Sequence:
    """The clip without its first ``fraction`` of frames, as a stream that starts late."""
    return _slice_frames(seq, slice(metrics.crop_start(seq.num_frames, fraction), None))


def select_entries(ds: Dataset, max_videos: int | None) -> list[ManifestEntry]:
    """Manifest entries, at most ``max_videos`` per activity and split (first ones kept)."""
    counts: dict[tuple[str, str], int] = {}
    chosen = []
    for e in ds.entries():
        key = (e.activity, e.split)
        counts[key] = counts.get(key, 0) + 1
        if max_videos is None or counts[key] <= max_videos:
            chosen.append(e)
    return chosen


def _paired_activities(activities: list[str]) -> set[str]:
    """Activities named at least twice: among val videos, the only ones where tau has pairs."""
    return {a for a in set(activities) if activities.count(a) >= 2}


# ----------------------------------------------------------------------------- embedding

@contextmanager
def _timer(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _embed_clip(embedder: Embedder, seq: Sequence, entry: ManifestEntry, content: bool,
                timings: dict[str, float]) -> Clip:
    with _timer(timings, "embed"):
        emb = np.asarray(embedder.embed(seq), dtype=np.float64)
    clip = Clip(entry.file, entry.activity, entry.split, emb, seq.phases,
                len(seq.phase_names) if seq.phases is not None else 0, seq.canonical_time)
    if content:
        with _timer(timings, "embed_content_checks"):
            clip.reversed_emb = np.asarray(embedder.embed(reverse_sequence(seq)), np.float64)
            clip.cropped_emb = np.asarray(embedder.embed(crop_sequence(seq)), np.float64)
    return clip


def embed_dataset(embedder: Embedder, ds: Dataset, entries: list[ManifestEntry],
                  timings: dict[str, float]) -> list[Clip]:
    """Embed every selected video (and, where tau applies, its reversed and cropped clip)."""
    content = _paired_activities([e.activity for e in entries if e.split == "val"])
    clips = []
    for n, e in enumerate(entries):
        seq = ds.load(e)
        wanted = e.split == "val" and e.activity in content
        clips.append(_embed_clip(embedder, seq, e, wanted, timings))
        if (n + 1) % 200 == 0:
            log.info("embedded %d/%d videos", n + 1, len(entries))
    return clips


# ----------------------------------------------------------------------------- metrics

def _split(clips: list[Clip], split: str, activity: str | None = None) -> list[Clip]:
    return [c for c in clips if c.split == split and activity in (None, c.activity)]


def _labelled_activities(clips: list[Clip]) -> list[str]:
    """Activities whose every video has phase labels, with train and val videos."""
    acts = list(dict.fromkeys(c.activity for c in clips))
    if not any(c.phases is not None for c in clips):
        raise _Skip("no phase labels in the dataset")
    good = [a for a in acts if all(c.phases is not None for c in clips if c.activity == a)
            and _split(clips, "train", a) and _split(clips, "val", a)]
    if not good:
        raise _Skip("no activity has phase labels on all its videos and both splits")
    return good


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _pct(frac: float) -> str:
    return f"{round(100 * frac)}%"


def phase_classification_section(clips: list[Clip]) -> dict[str, Any]:
    """Accuracy per fraction: per activity (its own phases), then the mean over activities."""
    per_act = {}
    for a in _labelled_activities(clips):
        train, val = _split(clips, "train", a), _split(clips, "val", a)
        acc = metrics.phase_classification([c.emb for c in train], [c.phases for c in train],
                                           [c.emb for c in val], [c.phases for c in val])
        per_act[a] = {_pct(f): v for f, v in acc.items()}
    out: dict[str, Any] = {
        _pct(f): _nanmean([r[_pct(f)] for r in per_act.values()])
        for f in metrics.CLASSIFICATION_FRACTIONS
    }
    return {**out, "per_activity": per_act}


def phase_progress_section(clips: list[Clip]) -> dict[str, Any]:
    """Mean R^2 per activity (its own boundaries), then the mean over activities."""
    per_act = {}
    for a in _labelled_activities(clips):
        train, val = _split(clips, "train", a), _split(clips, "val", a)
        if train[0].num_phases >= 2:
            per_act[a] = metrics.phase_progress_r2(
                [c.emb for c in train], [c.phases for c in train], [c.emb for c in val],
                [c.phases for c in val], num_phases=train[0].num_phases)
    if not per_act:
        raise _Skip("every labelled activity has a single phase: no boundary to regress")
    return {"r2": _nanmean(list(per_act.values())), "per_activity": per_act}


def frame_retrieval_section(clips: list[Clip], stride: int) -> dict[str, Any]:
    acts = set(_labelled_activities(clips))
    val = [c for c in _split(clips, "val") if c.activity in acts]
    if not _paired_activities([c.activity for c in val]):
        raise _Skip("needs >= 2 labelled val videos of one activity")
    ap = metrics.frame_retrieval_ap([c.emb for c in val], [c.phases for c in val],
                                    [c.activity for c in val], stride=stride)
    return {f"ap@{k}": v for k, v in ap.items()}


def _tau_clips(clips: list[Clip]) -> list[Clip]:
    val = [c for c in _split(clips, "val") if c.reversed_emb is not None]
    if not val:
        raise _Skip("needs >= 2 val videos of one activity")
    return val


def _tau_summary(taus: dict[str, np.ndarray]) -> tuple[float, dict[str, float], int]:
    all_taus = np.concatenate(list(taus.values()))
    per_act = {a: _nanmean(list(v)) for a, v in taus.items()}
    return _nanmean(list(all_taus)), per_act, int(np.isnan(all_taus).sum())


def kendalls_tau_section(clips: list[Clip], stride: int) -> dict[str, Any]:
    """Tau over all same-activity val pairs, with the clock's tau on the same pairs."""
    val = _tau_clips(clips)
    acts = [c.activity for c in val]
    embs = [c.emb for c in val]
    tau, per_act, nan_pairs = _tau_summary(metrics.pair_taus(embs, embs, acts, stride))
    clock = _clock_tau(tuple(len(e) for e in embs), tuple(acts), stride)
    return {"tau": tau, "clock": clock, "stride": stride,
            "pairs": _pair_count(acts), "nan_pairs": nan_pairs, "per_activity": per_act}


@functools.lru_cache(maxsize=4)
def _clock_tau(lengths: tuple[int, ...], activities: tuple[str, ...], stride: int) -> float:
    """The clock's tau on these clips, computed once for tau and the reversed-clip check
    (a Penn Action sized pass of scipy's kendalltau takes about a minute)."""
    return metrics.kendalls_tau(metrics.clock_embeddings(lengths), activities, stride)


def _pair_count(activities: list[str]) -> int:
    return sum(activities.count(a) * (activities.count(a) - 1) for a in set(activities))


def reversed_clip_tau_section(clips: list[Clip], stride: int) -> dict[str, Any]:
    val = _tau_clips(clips)
    acts = [c.activity for c in val]
    taus = metrics.pair_taus([c.emb for c in val], [c.reversed_emb for c in val], acts, stride)
    tau, per_act, _ = _tau_summary(taus)
    # A reversed clock is the same clock, so its reversed-clip tau is the clock's tau.
    return {"tau": tau, "clock": _clock_tau(tuple(len(c.emb) for c in val), tuple(acts), stride),
            "per_activity": per_act}


def crop_error_section(clips: list[Clip]) -> dict[str, Any]:
    """Crop error on the tau clips; the clock's value uses the same clip lengths."""
    val = _tau_clips(clips)
    lengths = [len(c.emb) for c in val]
    cropped = [n - metrics.crop_start(n, CROP_FRACTION) for n in lengths]
    clock = metrics.crop_error(metrics.clock_embeddings(lengths),
                               metrics.clock_embeddings(cropped))
    return {"error": metrics.crop_error([c.emb for c in val], [c.cropped_emb for c in val]),
            "clock": clock, "crop_fraction": CROP_FRACTION}


def _activities(clips: list[Clip]) -> list[str]:
    found = sorted({c.activity for c in clips})
    if len(found) < 2:
        raise _Skip(f"needs >= 2 activities, found {len(found)}")
    return found


def action_recognition_section(clips: list[Clip], pool: str) -> dict[str, Any]:
    train, val = _split(clips, "train"), _split(clips, "val")
    _activities(train)
    if not val:
        raise _Skip("no val videos")
    acc = metrics.action_recognition([c.emb for c in train], [c.activity for c in train],
                                     [c.emb for c in val], [c.activity for c in val],
                                     n_frames=AR_FRAMES, pool=pool)
    return {"accuracy": acc, "pool": pool, "n_frames": AR_FRAMES,
            "train_clips": len(train), "val_clips": len(val)}


def activity_separation_section(clips: list[Clip], seed: int) -> dict[str, Any]:
    val = _split(clips, "val")
    _activities(val)
    sep = metrics.activity_separation([c.emb for c in val], [c.activity for c in val], seed)
    return {**sep, "clips": len(val), "split": "val"}


def _sections(stride: int, pool: str, seed: int) -> dict[str, Callable[[list[Clip]], dict]]:
    """Metric name -> section function, in report order."""
    return {
        "phase_classification": phase_classification_section,
        "phase_progress": phase_progress_section,
        "kendalls_tau": lambda c: kendalls_tau_section(c, stride),
        "reversed_clip_tau": lambda c: reversed_clip_tau_section(c, stride),
        "crop_error": crop_error_section,
        "frame_retrieval": lambda c: frame_retrieval_section(c, stride),
        "action_recognition": lambda c: action_recognition_section(c, pool),
        "activity_separation": lambda c: activity_separation_section(c, seed),
    }


def compute_metrics(clips: list[Clip], timings: dict[str, float], *, stride: int = 2,
                    pool: str = "concat", seed: int = 0) -> tuple[dict, dict[str, str]]:
    """(results per metric, skip reason per metric that the data cannot support)."""
    results, skipped = {}, {}
    for name, section in _sections(stride, pool, seed).items():
        try:
            with _timer(timings, name):
                results[name] = section(clips)
            log.info("%s done in %.1f s", name, timings[name])
        except _Skip as why:
            timings.pop(name, None)
            skipped[name] = str(why)
    return results, skipped


# ----------------------------------------------------------------------------- pictures

def _alignment_pair(clips: list[Clip]) -> tuple[Clip, Clip] | None:
    """The first two val videos of the first activity that has two."""
    val = _split(clips, "val")
    for act in dict.fromkeys(c.activity for c in val):
        same = [c for c in val if c.activity == act]
        if len(same) >= 2:
            return same[0], same[1]
    return None


def make_pictures(clips: list[Clip], out_dir: Path, *, tsne: bool, seed: int,
                  title: str, timings: dict[str, float]) -> tuple[list[str], dict[str, str]]:
    """Write the t-SNE and alignment-path PNGs; (file names, skip reasons)."""
    written, skipped = [], {}
    val = _split(clips, "val")
    if not tsne:
        skipped["tsne"] = "disabled (--no-tsne)"
    elif sum(len(c.emb) for c in val) < 5:
        skipped["tsne"] = "fewer than 5 val frames"
    elif val[0].emb.shape[1] < 2:
        skipped["tsne"] = "a 1-dimensional embedding (e.g. the clock) needs no t-SNE"
    else:
        with _timer(timings, "tsne"):
            plot_tsne([c.emb for c in val], [c.activity for c in val], out_dir / "tsne.png",
                      seed=seed, title=f"t-SNE of val frames: {title}")
        written.append("tsne.png")
    pair = _alignment_pair(clips)
    if pair is None:
        skipped["alignment"] = "needs >= 2 val videos of one activity"
    else:
        q, c = pair
        with _timer(timings, "alignment_plot"):
            plot_alignment(q.emb, c.emb, out_dir / "alignment.png", query_phases=q.phases,
                           candidate_phases=c.phases, query_time=q.canonical_time,
                           candidate_time=c.canonical_time,
                           title=f"{q.activity}: {q.name} -> {c.name} ({title})")
        written.append("alignment.png")
    return written, skipped


# ----------------------------------------------------------------------------- reports

def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python, NaN/inf -> None (strict JSON), keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# (metric, key, label, format); the clock column shows the section's "clock" value.
_ROWS = [
    ("phase_classification", "10%", "phase classification, 10% of train videos (%)", ".2f"),
    ("phase_classification", "50%", "phase classification, 50% (%)", ".2f"),
    ("phase_classification", "100%", "phase classification, 100% (%)", ".2f"),
    ("phase_progress", "r2", "phase progress (R^2)", ".4f"),
    ("kendalls_tau", "tau", "Kendall's tau", ".4f"),
    ("reversed_clip_tau", "tau", "reversed-clip tau (pose < 0, clock > 0)", ".4f"),
    ("crop_error", "error", "crop error, first 25% dropped (fraction of clip)", ".4f"),
    ("frame_retrieval", "ap@5", "frame retrieval AP@5 (%)", ".2f"),
    ("frame_retrieval", "ap@10", "frame retrieval AP@10 (%)", ".2f"),
    ("frame_retrieval", "ap@15", "frame retrieval AP@15 (%)", ".2f"),
    ("action_recognition", "accuracy", "action recognition, 16 frames (%)", ".2f"),
    ("activity_separation", "nmi", "activity separation, KMeans NMI", ".4f"),
    ("activity_separation", "purity", "activity separation, KMeans purity", ".4f"),
]


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_report(report: dict[str, Any]) -> str:
    """The Markdown table of ``metrics.json`` (values already JSON-safe)."""
    data, proto = report["data"], report["protocol"]
    lines = [
        f"# Evaluation: {report['embedder']['name']} on {data['name']}", "",
        f"- data: `{data['dir']}` ({data['train_videos']} train / {data['val_videos']} val "
        f"videos, {len(data['activities'])} activities, layout {data['layout']}, "
        f"fingerprint {data['fingerprint']})",
        f"- embedder: `{report['embedder'].get('checkpoint', report['embedder']['name'])}`",
        f"- protocol: stride {proto['stride']}, action recognition {proto['ar_frames']} "
        f"frames ({proto['ar_pool']}), phase metrics {proto['phase_metrics']}", "",
        "| metric | value | clock [t/T] | seconds |", "| --- | ---: | ---: | ---: |",
    ]
    shown: set[str] = set()
    for metric, key, label, spec in _ROWS:
        section = report["metrics"].get(metric)
        if section is None:
            continue
        seconds = "" if metric in shown else _fmt(report["timings_s"].get(metric), ".1f")
        shown.add(metric)
        clock = _fmt(section["clock"], spec) if "clock" in section else ""
        lines.append(f"| {label} | {_fmt(section[key], spec)} | {clock} | {seconds} |")
    lines += ["", f"Embedding: {_fmt(report['timings_s'].get('embed'), '.1f')} s "
              f"(+ {_fmt(report['timings_s'].get('embed_content_checks', 0.0), '.1f')} s "
              "for reversed and cropped clips); total "
              f"{_fmt(report['timings_s'].get('total'), '.1f')} s."]
    if report["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    if report["pictures"]:
        lines += [""] + [f"![{p}]({p})" for p in report["pictures"]]
    return "\n".join(lines) + "\n"


def _data_summary(ds: Dataset, data_dir: Path, clips: list[Clip],
                  max_videos: int | None) -> dict[str, Any]:
    return {"dir": str(data_dir), "name": data_dir.name, "fingerprint": ds.fingerprint(),
            "layout": ds.manifest.layout, "fps": ds.manifest.fps,
            "activities": list(dict.fromkeys(c.activity for c in clips)),
            "train_videos": len(_split(clips, "train")), "val_videos": len(_split(clips, "val")),
            "max_videos_per_activity_and_split": max_videos}


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """``metrics.json`` then ``metrics.md``, both atomic."""
    atomic_write_json(out_dir / "metrics.json", report)
    with atomic_write(out_dir / "metrics.md", "w") as f:
        f.write(markdown_report(report))


def evaluate(embedder: Embedder, data_dir: str | os.PathLike[str],
             out_dir: str | os.PathLike[str], *, stride: int = 2, tsne: bool = True,
             max_videos: int | None = None, pool: str = "concat",
             seed: int = 0) -> dict[str, Any]:
    """Evaluate ``embedder`` on a dataset; writes the report to ``out_dir`` and returns it.

    ``max_videos`` keeps the first N videos per activity and split (manifest order), to
    trade precision for time on large datasets. ``seed`` fixes KMeans and t-SNE.
    """
    if stride < 1:
        raise ValueError(f"evaluate: stride: expected >= 1, found {stride}")
    if max_videos is not None and max_videos < 1:  # 0 would give an empty report
        raise ValueError(f"evaluate: max_videos: expected >= 1 or None (all), found {max_videos}")
    start, timings = time.perf_counter(), {}
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ds = Dataset(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = embed_dataset(embedder, ds, select_entries(ds, max_videos), timings)
    results, skipped = compute_metrics(clips, timings, stride=stride, pool=pool, seed=seed)
    pictures, skipped_pics = make_pictures(clips, out_dir, tsne=tsne, seed=seed,
                                           title=embedder.name, timings=timings)
    timings["total"] = time.perf_counter() - start
    report = _jsonable({
        "format": EVAL_FORMAT, "masa_rt_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedder": embedder.describe(),
        "data": _data_summary(ds, data_dir, clips, max_videos),
        "protocol": {"stride": stride, "ar_frames": AR_FRAMES, "ar_pool": pool,
                     "classifier": "LogisticRegression(max_iter=100000, solver='lbfgs')",
                     "phase_metrics": "per activity, mean over activities",
                     "crop_fraction": CROP_FRACTION, "seed": seed},
        "metrics": results, "skipped": {**skipped, **skipped_pics},
        "timings_s": timings, "pictures": pictures,
    })
    write_report(report, out_dir)
    return report

"""Evaluation metrics of ``shared/EVALUATION.md`` (the TCC / CASA / CARL protocol).

Every function takes plain lists of per-video arrays: embeddings ``(T_i, d)`` and per-frame
labels ``(T_i,)``, in manifest order. Nothing here knows about models, datasets or files,
so the same code scores a trained encoder, a baseline or a hand-made known-answer case.

The estimators and statistics come from scikit-learn and scipy, never hand-written ones:
the paper's numbers were produced with exactly these library calls, and reproducing their
quirks (lbfgs convergence, tau-b's handling of ties) is what makes our figures comparable.

Units: classification, retrieval and action recognition in percent (as the papers' tables);
R^2, Kendall's tau, NMI and purity as plain numbers; crop error as a fraction of the clip.

Numpy/scipy/sklearn only (no torch), so the engine harness can import it on the serving side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import bootstrap, kendalltau
from sklearn.cluster import KMeans
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

__all__ = [
    "CLASSIFICATION_FRACTIONS",
    "RETRIEVAL_KS",
    "action_recognition",
    "activity_separation",
    "boundary_f1",
    "boundary_f1_ci",
    "boundary_f1_difference_ci",
    "boundary_matches",
    "clock_embeddings",
    "crop_error",
    "crop_start",
    "frame_retrieval_ap",
    "kendalls_tau",
    "label_boundaries",
    "nearest_neighbours",
    "paired_accuracy_difference_ci",
    "pair_taus",
    "phase_change_delay",
    "phase_classification",
    "phase_progress_r2",
    "progress_mae",
    "progress_targets",
    "reversed_clip_tau",
    "sample_uniform",
    "streaming_phase_accuracy",
    "streaming_phase_accuracy_ci",
    "streaming_summary",
]

CLASSIFICATION_FRACTIONS = (0.1, 0.5, 1.0)
RETRIEVAL_KS = (5, 10, 15)

Arrays = Sequence[np.ndarray]


def _logistic_regression() -> LogisticRegression:
    """The protocol's classifier (CASA, CARL): multinomial lbfgs, run to convergence."""
    return LogisticRegression(max_iter=100000, solver="lbfgs")


def _stack(arrays: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in arrays], axis=0)


# ----------------------------------------------------------------------------- phase labels

def phase_classification(train_embs: Arrays, train_labels: Arrays, val_embs: Arrays,
                         val_labels: Arrays, fractions: Sequence[float] = CLASSIFICATION_FRACTIONS,
                         background: int | None = None) -> dict[float, float]:
    """Per-frame phase accuracy (percent) of a linear classifier, per fraction of train videos.

    For each fraction the first ``max(1, int(frac * n_train))`` train videos (in the order
    given, i.e. manifest order: nothing is shuffled, so the number is reproducible) train
    the classifier; it is scored on all val frames. ``background`` (IKEA) names a label
    whose frames are dropped from train and val, the labels above it shifted down by one.
    A subset holding a single class cannot train a classifier: its accuracy is NaN.
    """
    x_val, y_val = _drop_background(_stack(val_embs), _stack(val_labels), background)
    out: dict[float, float] = {}
    for frac in fractions:
        n = max(1, int(frac * len(train_embs)))
        x, y = _drop_background(_stack(train_embs[:n]), _stack(train_labels[:n]), background)
        if len(np.unique(y)) < 2:
            out[frac] = float("nan")
            continue
        clf = _logistic_regression().fit(x, y)
        out[frac] = 100.0 * float(clf.score(x_val, y_val))
    return out


def _drop_background(x: np.ndarray, y: np.ndarray,
                     background: int | None) -> tuple[np.ndarray, np.ndarray]:
    if background is None:
        return x, y
    keep = y != background
    return x[keep], np.where(y[keep] > background, y[keep] - 1, y[keep])


def progress_targets(labels: np.ndarray, num_phases: int) -> np.ndarray:
    """(L,) phase labels -> (L, P-1) progress targets, one column per phase boundary.

    Column ``i`` is ``(arange(L) - t_i) / L`` with ``t_i`` the last frame of phase ``i``
    (TCC's event-completion regression target). A missing phase ``i`` takes ``t_i = L``
    when it is the last boundary, otherwise copies the previous column. The protocol leaves
    one case open, a missing phase 0 with more boundaries after it: masa-rt uses
    ``t_0 = -1`` (the boundary happened before the clip began).
    """
    labels = np.asarray(labels)
    length = len(labels)
    frames = np.arange(length, dtype=np.float64)
    columns: list[np.ndarray] = []
    for i in range(num_phases - 1):
        where = np.flatnonzero(labels == i)
        if where.size:
            columns.append((frames - where[-1]) / length)
        elif i == num_phases - 2:
            columns.append((frames - length) / length)
        elif columns:
            columns.append(columns[-1].copy())
        else:
            columns.append((frames + 1) / length)
    return np.stack(columns, axis=1) if columns else np.zeros((length, 0))


def phase_progress_r2(train_embs: Arrays, train_labels: Arrays, val_embs: Arrays,
                      val_labels: Arrays, num_phases: int) -> float:
    """Mean R^2 over boundary columns of one ``LinearRegression`` per column (TCC).

    ``num_phases`` is the activity's number of phases (``len(phase_names)``), not the number
    seen, so a video that skips the last phase still gets every column.
    """
    if num_phases < 2:
        raise ValueError(f"phase_progress_r2: num_phases: expected >= 2, found {num_phases}")
    x_train, x_val = _stack(train_embs), _stack(val_embs)
    y_train = _stack([progress_targets(y, num_phases) for y in train_labels])
    y_val = _stack([progress_targets(y, num_phases) for y in val_labels])
    scores = [LinearRegression().fit(x_train, y_train[:, c]).score(x_val, y_val[:, c])
              for c in range(num_phases - 1)]
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- alignment

def nearest_neighbours(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Index into ``candidates`` of each query row's nearest neighbour (squared Euclidean)."""
    return cdist(query, candidates, "sqeuclidean").argmin(axis=1)


def _tau(query: np.ndarray, candidates: np.ndarray) -> float:
    nns = nearest_neighbours(query, candidates)
    # The p-value method changes only the p-value, never tau; 'asymptotic' skips the exact
    # permutation p-value scipy would compute for short clips (a third of the run time).
    with warnings.catch_warnings():  # a constant nns (clock vs one frame) gives NaN: dropped
        warnings.simplefilter("ignore")
        return float(kendalltau(np.arange(len(nns)), nns, method="asymptotic").statistic)


def _same_activity_pairs(activities: Sequence[Hashable]) -> list[tuple[int, int]]:
    """All ordered pairs (i, j), i != j, of videos with the same activity."""
    return [(i, j) for i, a in enumerate(activities) for j, b in enumerate(activities)
            if i != j and a == b]


def pair_taus(queries: Arrays, candidates: Arrays, activities: Sequence[Hashable],
              stride: int = 2) -> dict[Hashable, np.ndarray]:
    """Kendall's tau of every ordered same-activity pair, grouped by activity.

    Pair ``(i, j)`` matches ``queries[i][::stride]`` to ``candidates[j][::stride]``. With
    ``candidates is queries`` this is the protocol's tau; with reversed clips as candidates,
    the reversed-clip content check. NaN values (constant matches) are kept here.
    """
    out: dict[Hashable, list[float]] = {}
    for i, j in _same_activity_pairs(activities):
        tau = _tau(np.asarray(queries[i])[::stride], np.asarray(candidates[j])[::stride])
        out.setdefault(activities[i], []).append(tau)
    return {a: np.asarray(v) for a, v in out.items()}


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def kendalls_tau(val_embs: Arrays, activities: Sequence[Hashable], stride: int = 2) -> float:
    """Mean Kendall's tau over all ordered same-activity pairs of val videos (NaN dropped)."""
    taus = pair_taus(val_embs, val_embs, activities, stride)
    return _nanmean(np.concatenate(list(taus.values()))) if taus else float("nan")


def reversed_clip_tau(val_embs: Arrays, reversed_embs: Arrays, activities: Sequence[Hashable],
                      stride: int = 2) -> float:
    """Tau between each clip and every other same-activity clip *played backwards*.

    ``reversed_embs[j]`` must be the embedding of clip ``j`` reversed in time (re-embedded,
    not the reversed embedding: a model with context sees a different input). An embedding
    of pose gives a negative value, a clock about +1: it tells content from time-since-start.
    """
    taus = pair_taus(val_embs, reversed_embs, activities, stride)
    return _nanmean(np.concatenate(list(taus.values()))) if taus else float("nan")


def crop_start(length: int, fraction: float = 0.25) -> int:
    """First kept frame when the first ``fraction`` of a clip is dropped (crop check)."""
    return int(fraction * length)


def crop_error(full_embs: Arrays, cropped_embs: Arrays) -> float:
    """Mean |matched - true| frame index as a fraction of the clip length, over clips.

    ``cropped_embs[i]`` embeds clip ``i`` without its first frames (re-embedded, as a live
    stream that starts late); its frame ``k`` is frame ``len(full) - len(cropped) + k`` of
    the full clip. Pose embeddings find it (error ~ 0); an embedding of time since the
    stream started cannot.
    """
    errors = []
    for full, cropped in zip(full_embs, cropped_embs, strict=True):
        length, start = len(full), len(full) - len(cropped)
        truth = start + np.arange(len(cropped))
        errors.append(np.abs(nearest_neighbours(cropped, full) - truth).mean() / length)
    return float(np.mean(errors))


def frame_retrieval_ap(val_embs: Arrays, val_labels: Arrays, activities: Sequence[Hashable],
                       ks: Sequence[int] = RETRIEVAL_KS, stride: int = 2) -> dict[int, float]:
    """Fine-grained frame retrieval AP@K (percent), CARL's definition (precision@K).

    For each val video: queries are its frames ``[::stride]``; candidates are the frames
    ``[::stride]`` of all other val videos of the same activity, concatenated. Per query the
    share of its K nearest candidates (squared Euclidean) with the query's label; averaged
    over queries per video, then over videos (videos without candidates are dropped).
    """
    per_video: dict[int, list[float]] = {k: [] for k in ks}
    for i, act in enumerate(activities):
        others = [j for j, b in enumerate(activities) if j != i and b == act]
        if not others:
            continue
        query, q_labels = np.asarray(val_embs[i])[::stride], np.asarray(val_labels[i])[::stride]
        cands = _stack([np.asarray(val_embs[j])[::stride] for j in others])
        c_labels = _stack([np.asarray(val_labels[j])[::stride] for j in others])
        order = np.argsort(cdist(query, cands, "sqeuclidean"), axis=1, kind="stable")
        for k in ks:
            hits = c_labels[order[:, :k]] == q_labels[:, None]  # (Q, K)
            per_video[k].append(float(hits.mean(axis=1).mean()))
    return {k: 100.0 * _nanmean(np.asarray(v, dtype=float)) for k, v in per_video.items()}


# ----------------------------------------------------------------------------- activities

def sample_uniform(emb: np.ndarray, n_frames: int = 16) -> np.ndarray:
    """``n_frames`` rows taken uniformly over the clip (repeats when the clip is shorter)."""
    idx = np.linspace(0, len(emb) - 1, n_frames).round().astype(int)
    return np.asarray(emb)[idx]


def _clip_vector(emb: np.ndarray, n_frames: int, pool: str) -> np.ndarray:
    frames = sample_uniform(emb, n_frames)  # (n_frames, d)
    if pool == "concat":
        return frames.reshape(-1)
    if pool == "mean":
        return frames.mean(axis=0)
    raise ValueError(f"action_recognition: pool: expected 'concat' or 'mean', found {pool!r}")


def action_recognition(train_embs: Arrays, train_acts: Sequence[Hashable], val_embs: Arrays,
                       val_acts: Sequence[Hashable], n_frames: int = 16,
                       pool: str = "concat") -> float:
    """Per-clip action accuracy (percent) of a linear classifier on 16 sampled frames.

    ``pool="concat"`` keeps the frames' order in the clip vector (what a sequence embedding
    is for); ``"mean"`` averages them (order-free). Same classifier as phase classification.
    """
    x_train = np.stack([_clip_vector(e, n_frames, pool) for e in train_embs])
    x_val = np.stack([_clip_vector(e, n_frames, pool) for e in val_embs])
    clf = _logistic_regression().fit(x_train, np.asarray(train_acts))
    return 100.0 * float(clf.score(x_val, np.asarray(val_acts)))


def activity_separation(embs: Arrays, activities: Sequence[Hashable],
                        seed: int = 0) -> dict[str, float]:
    """How well per-clip mean embeddings cluster by activity: KMeans NMI and purity.

    k = number of activities, ``n_init=10``, seeded so a rerun gives the same number.
    Purity = share of clips whose cluster's majority activity is their own.
    """
    means = np.stack([np.asarray(e).mean(axis=0) for e in embs])
    labels = np.asarray(activities)
    k = len(np.unique(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(means)
    table = contingency_matrix(labels, clusters)  # (activities, clusters)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "purity": float(table.max(axis=0).sum() / table.sum())}


def clock_embeddings(lengths: Sequence[int]) -> list[np.ndarray]:
    """The clock baseline: each frame's relative time ``[t / T]``, shape ``(T, 1)``.

    It knows nothing about pose, so whatever it scores measures time-since-start alone;
    EVALUATION.md asks for it beside every tau.
    """
    return [(np.arange(n, dtype=np.float64) / n)[:, None] for n in lengths]


# ----------------------------------------------------------------------------- streaming

def streaming_phase_accuracy(true_phases: np.ndarray, pred_phases: np.ndarray) -> float:
    """Share (percent) of frames whose reported phase is the true one.

    A frame without a report (negative phase, e.g. -1 before the aligner is confident)
    counts as wrong: silence is not an answer a user can act on.
    """
    true, pred = np.asarray(true_phases), np.asarray(pred_phases)
    if true.shape != pred.shape:
        raise ValueError(f"streaming_phase_accuracy: shapes {true.shape} and {pred.shape}")
    return 100.0 * float(np.mean(true == pred))


def streaming_phase_accuracy_ci(true_phases: Arrays, pred_phases: Arrays,
                                confidence: float = 0.95, n_resamples: int = 2000,
                                seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (percent) of the pooled phase accuracy of several
    streams, resampling whole streams (``scipy.stats.bootstrap``, paired over each stream's
    right and total frames).

    Streams, not frames: a stream's frames are not independent draws (one slow subject is
    wrong on dozens of consecutive frames), so a frame-level interval would be several
    times too narrow. Deterministic in ``seed``; (nan, nan) for fewer than two streams.
    """
    if len(true_phases) != len(pred_phases):
        raise ValueError(f"streaming_phase_accuracy_ci: {len(true_phases)} true and "
                         f"{len(pred_phases)} predicted streams")
    if len(true_phases) < 2:
        return math.nan, math.nan
    right, total = _right_frames(true_phases, pred_phases), _frames(true_phases)

    def pooled(r: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return 100.0 * r.sum(axis=axis) / n.sum(axis=axis)

    res = bootstrap((right, total), pooled, paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _right_frames(true_phases: Arrays, pred_phases: Arrays) -> np.ndarray:
    """Per stream, how many frames the prediction names the true phase (float)."""
    return np.array([np.sum(np.asarray(t) == np.asarray(p))
                     for t, p in zip(true_phases, pred_phases, strict=True)], dtype=float)


def _frames(true_phases: Arrays) -> np.ndarray:
    return np.array([len(t) for t in true_phases], dtype=float)


def progress_mae(true_progress: np.ndarray, pred_progress: np.ndarray) -> float:
    """Mean |reported - true| progress over frames with a report (NaN = no report)."""
    err = np.abs(np.asarray(pred_progress, float) - np.asarray(true_progress, float))
    return _nanmean(err)


def phase_change_delay(true_phases: np.ndarray, pred_phases: np.ndarray) -> np.ndarray:
    """Delay in frames of every true phase change, NaN where the change was missed.

    For a true change into phase ``p`` at frame ``t``, the delay is ``t' - t`` with ``t'``
    the first frame ``>= t`` reporting ``p``, searched until the next true change; no such
    frame means missed. A report of ``p`` that was already on at ``t`` counts as delay 0.
    """
    true, pred = np.asarray(true_phases), np.asarray(pred_phases)
    changes = np.flatnonzero(true[1:] != true[:-1]) + 1
    ends = np.append(changes[1:], len(true))
    delays = np.full(len(changes), np.nan)
    for n, (start, end) in enumerate(zip(changes, ends, strict=True)):
        hit = np.flatnonzero(pred[start:end] == true[start])
        if hit.size:
            delays[n] = hit[0]
    return delays


def paired_accuracy_difference_ci(true_phases: Arrays, pred_a: Arrays, pred_b: Arrays,
                                  confidence: float = 0.95, n_resamples: int = 2000,
                                  seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval (percentage points) of pooled accuracy(a) - accuracy(b) on the
    same streams, resampling whole streams with both methods' results kept together.

    Paired: the two methods meet the same hard streams, so the interval of their
    difference is much narrower than the two separate intervals suggest. An interval that
    excludes 0 is a difference larger than the draw of the streams. (nan, nan) for fewer
    than two streams.
    """
    if not len(true_phases) == len(pred_a) == len(pred_b):
        raise ValueError("paired_accuracy_difference_ci: expected as many streams in each")
    if len(true_phases) < 2:
        return math.nan, math.nan

    total = _frames(true_phases)

    def diff(ra: np.ndarray, rb: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return 100.0 * (ra.sum(axis=axis) - rb.sum(axis=axis)) / n.sum(axis=axis)

    res = bootstrap((_right_frames(true_phases, pred_a), _right_frames(true_phases, pred_b),
                     total), diff, paired=True,
                    vectorized=True, confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def streaming_summary(true_phases: Arrays, pred_phases: Arrays,
                      true_progress: Arrays | None = None,
                      pred_progress: Arrays | None = None) -> dict[str, float | int | list]:
    """The live-alignment figures of a set of streams (EVALUATION.md, "Streaming
    alignment"), one call for every scorer: ``masa-rt score``, the harness, the demo.

    Per stream, per frame: the true and the reported phase (negative = no report, counted
    wrong) and, optionally, true and reported progress (NaN = undefined / no report; left
    out of the mean). Frames are pooled over streams; phase-change delays are pooled over
    the true changes (missed ones counted apart); the interval resamples whole streams.
    """
    if len(true_phases) != len(pred_phases):
        raise ValueError(f"streaming_summary: {len(true_phases)} true and {len(pred_phases)} "
                         "predicted streams")
    if not len(true_phases):
        raise ValueError("streaming_summary: no streams")
    true_ph = np.concatenate([np.asarray(t) for t in true_phases])
    pred_ph = np.concatenate([np.asarray(p) for p in pred_phases])
    delays = np.concatenate([phase_change_delay(t, p)
                             for t, p in zip(true_phases, pred_phases, strict=True)])
    hit = delays[np.isfinite(delays)]
    out: dict[str, float | int | list] = {
        "streams": len(true_phases),
        "frames": int(true_ph.size),
        "phase_acc_pct": streaming_phase_accuracy(true_ph, pred_ph),
        "phase_acc_ci95_pct": list(streaming_phase_accuracy_ci(true_phases, pred_phases)),
        "delay_frames": float(hit.mean()) if hit.size else math.nan,
        "delay_p90_frames": float(np.percentile(hit, 90)) if hit.size else math.nan,
        "phase_changes": int(delays.size),
        "missed_changes_pct": (100.0 * float(np.mean(~np.isfinite(delays))) if delays.size
                               else 0.0),
    }
    if true_progress is not None and pred_progress is not None:
        tp = np.concatenate([np.asarray(t, float) for t in true_progress])
        pp = np.concatenate([np.asarray(p, float) for p in pred_progress])
        out["progress_mae_pct"] = 100.0 * progress_mae(tp, pp)
        out["progress_frames"] = int(np.count_nonzero(np.isfinite(tp) & np.isfinite(pp)))
    return out


# ----------------------------------------------------------------------------- boundaries

def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Frames where a new phase begins: every ``t > 0`` with ``labels[t] != labels[t-1]``."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels[1:] != labels[:-1]) + 1


def boundary_matches(true: np.ndarray, pred: np.ndarray, tolerance: float) -> int:
    """Most one-to-one pairs (true, predicted boundary) at most ``tolerance`` frames apart.

    A maximum matching (``scipy.optimize.linear_sum_assignment`` on the 0/1 cost "farther
    than the tolerance"), so one prediction never counts for two true boundaries and a
    near miss elsewhere never steals a better pair.
    """
    true, pred = np.asarray(true, float).ravel(), np.asarray(pred, float).ravel()
    if not true.size or not pred.size:
        return 0
    far = (np.abs(true[:, None] - pred[None, :]) > tolerance).astype(float)
    rows, cols = linear_sum_assignment(far)
    return int(np.sum(far[rows, cols] == 0))


def _boundary_counts(true: Arrays, pred: Arrays, tolerance: float) -> np.ndarray:
    """(3, recordings): matched, true and predicted boundaries per recording."""
    if len(true) != len(pred):
        raise ValueError(f"boundary_f1: {len(true)} true and {len(pred)} predicted recordings")
    return np.array([[boundary_matches(t, p, tolerance), len(np.ravel(t)), len(np.ravel(p))]
                     for t, p in zip(true, pred, strict=True)], dtype=float).T


def _f1(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """Pooled F1 = 2 TP / (true + predicted); 1 where both are empty (nothing to find)."""
    total = n_true + n_pred
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * tp / np.where(total > 0, total, 1), 1.0)


def boundary_f1(true: Arrays, pred: Arrays, tolerance: float = 3) -> dict[str, float]:
    """Boundary precision, recall and F1 within ``tolerance`` frames, pooled over recordings.

    ``true[i]``, ``pred[i]``: boundary frames of recording ``i`` (e.g. from
    :func:`label_boundaries`). Matches are one-to-one (:func:`boundary_matches`); counts
    are summed over recordings before the ratios are taken (micro average), so a recording
    with many boundaries weighs more than one with a single boundary.
    """
    tp, n_true, n_pred = _boundary_counts(true, pred, tolerance).sum(axis=1)
    return {"precision": float(tp / n_pred) if n_pred else math.nan,
            "recall": float(tp / n_true) if n_true else math.nan,
            "f1": float(_f1(tp, n_true, n_pred)), "matched": int(tp),
            "true": int(n_true), "predicted": int(n_pred)}


def boundary_f1_ci(true: Arrays, pred: Arrays, tolerance: float = 3,
                   confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of :func:`boundary_f1`'s F1, resampling whole recordings
    (``scipy.stats.bootstrap``, percentile). (nan, nan) for fewer than two recordings."""
    if len(true) < 2:
        return math.nan, math.nan
    tp, n_true, n_pred = _boundary_counts(true, pred, tolerance)

    def pooled(a: np.ndarray, b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return _f1(a.sum(axis=axis), b.sum(axis=axis), c.sum(axis=axis))

    res = bootstrap((tp, n_true, n_pred), pooled, paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def boundary_f1_difference_ci(true: Arrays, pred_a: Arrays, pred_b: Arrays,
                              tolerance: float = 3, confidence: float = 0.95,
                              n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of F1(a) - F1(b) (:func:`boundary_f1`) on the same recordings,
    resampling whole recordings with both methods' counts kept together (paired, as
    :func:`paired_accuracy_difference_ci`). (nan, nan) for fewer than two recordings."""
    if len(true) < 2:
        return math.nan, math.nan
    tp_a, n_true, n_a = _boundary_counts(true, pred_a, tolerance)
    tp_b, _n_true, n_b = _boundary_counts(true, pred_b, tolerance)

    def diff(ta: np.ndarray, na: np.ndarray, tb: np.ndarray, nb: np.ndarray, nt: np.ndarray,
             axis: int = -1) -> np.ndarray:
        t = nt.sum(axis=axis)
        return (_f1(ta.sum(axis=axis), t, na.sum(axis=axis))
                - _f1(tb.sum(axis=axis), t, nb.sum(axis=axis)))

    res = bootstrap((tp_a, n_a, tp_b, n_b, n_true), diff, paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)

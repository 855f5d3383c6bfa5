"""Summaries and pictures of sequences and datasets: the first thing to look at.

Numbers alone hide the bugs that matter in pose data (a mirrored skeleton, y pointing the
wrong way, phases that do not line up with the motion), so besides ``summarise`` there is
``plot``: a row of skeleton frames spread over the sequence with the phase timeline under
them, so one glance tells whether the data looks like the activity it claims to be.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masa_rt.atomic import atomic_write
from masa_rt.sequence import Sequence, load_manifest, load_sequence
from masa_rt.skeleton import Layout, get_layout

__all__ = ["format_summary", "plot", "run_cli", "summarise"]

NAN_SAMPLE_FILES = 64  # files read for a dataset's NaN ratio; enough for a percentage
_SIDE_COLOURS = {"left": "tab:blue", "right": "tab:red", None: "0.35"}


# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------

def _kind(path: Path) -> str:
    """'sequence' or 'dataset'; a clear one-line error for anything else."""
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"not a dataset folder (no manifest.json): {path}")
        return "dataset"
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"expected a .npz sequence or a dataset folder, found {path}")
        return "sequence"
    raise FileNotFoundError(f"no such sequence or dataset: {path}")


def _nan_ratio(joints: np.ndarray) -> float:
    """Fraction of missing joints (a joint counts as missing if any coordinate is NaN)."""
    missing = np.isnan(joints).any(axis=-1)
    return float(missing.mean()) if missing.size else 0.0


def _phase_counts(seq: Sequence) -> list[dict[str, Any]]:
    if seq.phases is None:
        return []
    counts = np.bincount(np.asarray(seq.phases), minlength=len(seq.phase_names))
    pairs = zip(seq.phase_names, counts, strict=True)
    return [{"name": str(n), "frames": int(c)} for n, c in pairs]


def summarise_sequence(path: Path) -> dict[str, Any]:
    seq = load_sequence(path)
    t, j, c = seq.joints.shape
    return {
        "kind": "sequence",
        "path": str(path),
        "frames": t,
        "duration_s": t / float(seq.fps),
        "layout": seq.layout,
        "fps": float(seq.fps),
        "joints": j,
        "dims": c,
        "phases": _phase_counts(seq),
        "nan_ratio": _nan_ratio(seq.joints),
        "activity": seq.activity,
        "subject": seq.subject,
        "source": seq.source,
        "has_features": seq.features is not None,
        "feature_dim": None if seq.features is None else int(seq.features.shape[1]),
        "has_timestamps": seq.timestamps is not None,
        "has_canonical_time": seq.canonical_time is not None,
    }


def _frame_count(path: Path) -> int:
    """T from the ``joints`` array header alone: totals over thousands of files stay cheap."""
    with zipfile.ZipFile(path) as zf, zf.open("joints.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(f)
    return int(shape[0])


def summarise_dataset(path: Path) -> dict[str, Any]:
    manifest = load_manifest(path)
    files = list(manifest.files)
    lengths = [_frame_count(path / e.file) for e in files]
    step = max(1, len(files) // NAN_SAMPLE_FILES)
    sample = [load_sequence(path / e.file).joints for e in files[::step][:NAN_SAMPLE_FILES]]
    per_activity: dict[str, dict[str, int]] = {}
    for e in files:
        per_activity.setdefault(e.activity, Counter())[e.split] += 1
    return {
        "kind": "dataset",
        "path": str(path),
        "layout": manifest.layout,
        "fps": float(manifest.fps),
        "files": len(files),
        "files_per_split": dict(Counter(e.split for e in files)),
        "per_activity": {a: dict(c) for a, c in sorted(per_activity.items())},
        "total_frames": int(sum(lengths)),
        "mean_frames": float(np.mean(lengths)) if lengths else 0.0,
        "nan_ratio": _nan_ratio(np.concatenate(sample)) if sample else 0.0,
        "nan_sample_files": len(sample),
    }


def summarise(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A dict describing a ``.npz`` sequence or a dataset folder (see ``format_summary``)."""
    path = Path(path)
    if _kind(path) == "dataset":
        return summarise_dataset(path)
    return summarise_sequence(path)


def _format_sequence(d: dict[str, Any]) -> list[str]:
    extras = [name for name, key in (("features", "has_features"), ("timestamps",
              "has_timestamps"), ("canonical_time", "has_canonical_time")) if d[key]]
    lines = [
        f"activity  {d['activity'] or '-'}   source {d['source'] or '-'}",
        f"frames    {d['frames']} ({d['duration_s']:.2f} s at {d['fps']:g} fps)",
        f"joints    {d['joints']} x {d['dims']} ({d['layout']}), "
        f"{100 * d['nan_ratio']:.1f}% missing",
        f"extras    {', '.join(extras) or 'none'}"
        + (f" (F={d['feature_dim']})" if d["has_features"] else ""),
    ]
    phases = ", ".join(f"{p['name']} {p['frames']}" for p in d["phases"])
    lines.append(f"phases    {phases or 'none'}")
    return lines


def _format_dataset(d: dict[str, Any]) -> list[str]:
    splits = ", ".join(f"{s} {n}" for s, n in sorted(d["files_per_split"].items()))
    lines = [
        f"layout    {d['layout']} at {d['fps']:g} fps",
        f"files     {d['files']} ({splits})",
        f"frames    {d['total_frames']} total, {d['mean_frames']:.1f} mean per file",
        f"missing   {100 * d['nan_ratio']:.1f}% of joints "
        f"(sample of {d['nan_sample_files']} files)",
        "activity                  train    val",
    ]
    for activity, counts in d["per_activity"].items():
        lines.append(f"  {activity:<22}{counts.get('train', 0):>7}{counts.get('val', 0):>7}")
    return lines


def format_summary(d: dict[str, Any]) -> str:
    """Human-readable text for a ``summarise`` dict."""
    body = _format_dataset(d) if d["kind"] == "dataset" else _format_sequence(d)
    return "\n".join([f"{d['kind']} {d['path']}", *body])


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------

def _side(layout: Layout, j: int) -> str | None:
    """'left', 'right' or None (midline): every layout prefixes sided joints with l/L, r/R."""
    if layout.mirror[j] == j:
        return None
    return "left" if layout.joint_names[j][0].lower() == "l" else "right"


def _project(joints: np.ndarray, layout: Layout) -> np.ndarray:
    """(T, J, 2) drawing coordinates: 3D is seen from the front (x right, up axis up)."""
    if joints.shape[-1] == 2:
        return joints
    across = 0 if layout.up_axis != 0 else 2
    return joints[..., [across, layout.up_axis]]


def _limits(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """One square window over all drawn frames: panels stay comparable and undistorted."""
    finite = points[np.isfinite(points).all(axis=-1)]
    if not len(finite):
        return None
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    centre, half = (lo + hi) / 2, 0.55 * max(float((hi - lo).max()), 1e-6)
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def _draw_skeleton(ax, frame: np.ndarray, layout: Layout) -> None:
    """Bones from ``layout.parents`` (a missing end hides the bone), then the joints."""
    for j, p in enumerate(layout.parents):
        if p >= 0 and np.isfinite(frame[[j, p]]).all():
            ax.plot(frame[[p, j], 0], frame[[p, j], 1], color=_SIDE_COLOURS[_side(layout, j)],
                    lw=1.6, solid_capstyle="round")
    ok = np.isfinite(frame).all(axis=-1)
    ax.scatter(frame[ok, 0], frame[ok, 1], s=6, color="k", zorder=3)
    if not ok.any():
        ax.text(0.5, 0.5, "no joints", transform=ax.transAxes, ha="center", va="center")


def _phase_runs(phases: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, length, phase) for each run of equal labels."""
    edges = np.flatnonzero(np.diff(phases)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(phases)]])
    return [(int(s), int(e - s), int(phases[s])) for s, e in zip(starts, ends, strict=True)]


def _draw_timeline(ax, seq: Sequence, shown: np.ndarray, cmap) -> None:
    t = seq.joints.shape[0]
    if seq.phases is None:
        ax.broken_barh([(0, t)], (0, 1), color="0.85")
        ax.text(t / 2, 0.5, "no phase labels", ha="center", va="center", fontsize=8)
    else:
        for start, length, k in _phase_runs(np.asarray(seq.phases)):
            ax.broken_barh([(start, length)], (0, 1), color=cmap(k % cmap.N))
            if length >= 0.06 * t:  # label only runs wide enough to hold a word
                ax.text(start + length / 2, 0.5, str(seq.phase_names[k]), ha="center",
                        va="center", fontsize=7, clip_on=True)
    for i in shown:
        ax.axvline(i + 0.5, color="k", lw=0.8)
    ax.set_xlim(0, t)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("frame", fontsize=8)
    ax.tick_params(labelsize=7)


def _first_sequence(path: Path) -> Path:
    manifest = load_manifest(path)
    if not manifest.files:
        raise ValueError(f"dataset has no files: {path}")
    return path / manifest.files[0].file


def _frame_title(seq: Sequence, i: int) -> str:
    if seq.phases is None:
        return f"frame {i}"
    return f"frame {i}\n{seq.phase_names[int(seq.phases[i])]}"


def _figure(seq: Sequence, name: str, n_frames: int) -> Figure:
    """Skeleton panels on top (one shared window), the phase strip spanning the bottom."""
    layout = get_layout(seq.layout)
    t = seq.joints.shape[0]
    shown = np.unique(np.linspace(0, t - 1, max(1, min(n_frames, t))).round().astype(int))
    points = _project(np.asarray(seq.joints, dtype=np.float64), layout)
    limits = _limits(points[shown])
    fig = Figure(figsize=(1.9 * len(shown) + 0.4, 3.6), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(shown), height_ratios=[5, 1])
    cmap = colormaps["tab10"]
    for col, i in enumerate(shown):
        ax = fig.add_subplot(grid[0, col])
        _draw_skeleton(ax, points[i], layout)
        if limits:
            ax.set_xlim(*limits[0])
            ax.set_ylim(*limits[1])
        if seq.joints.shape[-1] == 2:
            ax.invert_yaxis()  # 2D layouts are image coordinates: y points down
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_frame_title(seq, int(i)), fontsize=8)
    _draw_timeline(fig.add_subplot(grid[1, :]), seq, shown, cmap)
    source = f"{seq.source}; " if seq.source else ""
    fig.suptitle(f"{seq.activity or 'unknown activity'} - {name} ({source}{seq.layout}, "
                 f"{t} frames at {float(seq.fps):g} fps; blue = left, red = right)", fontsize=9)
    return fig


def plot(path: str | os.PathLike[str], out_png: str | os.PathLike[str], n_frames: int = 6) -> Path:
    """Draw ``n_frames`` skeletons spread over the sequence plus its phase timeline.

    For a dataset folder the first sequence of its manifest is drawn. The PNG is written
    atomically, so a viewer refreshing it never shows half a picture. Returns ``out_png``.
    """
    path, out = Path(path), Path(out_png)
    seq_path = _first_sequence(path) if _kind(path) == "dataset" else path
    seq = load_sequence(seq_path)
    fig = _figure(seq, seq_path.name, n_frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def run_cli(args: argparse.Namespace) -> int:
    """``masa-rt inspect PATH [--plot OUT.png]``: print the summary, optionally draw it."""
    print(format_summary(summarise(args.path)))
    if args.plot:
        print(f"wrote {plot(args.path, args.plot)}")
    return 0

"""Evaluation pictures: t-SNE of frame embeddings and a nearest-neighbour alignment path.

- :func:`plot_tsne` -- frames coloured by activity (the MASA paper's Fig. 1/3): separated
  islands per activity mean the embedding tells activities apart without labels.
- :func:`plot_alignment` -- for two clips of one activity, each query frame's nearest
  neighbour in the other clip, with the phase colour strips along both axes (and, on
  synthetic data, the true correspondence from the generator's canonical time). A good
  embedding gives a monotone staircase whose steps line up with the phase boundaries.

Matplotlib runs headless (Agg); every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.manifold import TSNE

from masa_rt.atomic import atomic_write
from masa_rt.metrics import nearest_neighbours

__all__ = ["TSNE_MAX_FRAMES", "plot_alignment", "plot_tsne", "subsample_frames"]

TSNE_MAX_FRAMES = 2000  # t-SNE cost grows fast with frames: 2000 take 15-30 s on one core


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def subsample_frames(embs: Sequence[np.ndarray], labels: Sequence[str], max_frames: int,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All frames stacked with their clip's label, at most ``max_frames`` of them (seeded)."""
    x = np.concatenate(embs, axis=0)
    y = np.concatenate([np.full(len(e), lab, dtype=object) for e, lab in zip(embs, labels,
                                                                               strict=True)])
    if len(x) > max_frames:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_frames, replace=False))
        x, y = x[keep], y[keep]
    return x, y


def plot_tsne(embs: Sequence[np.ndarray], activities: Sequence[str],
              out_png: str | os.PathLike[str], *, max_frames: int = TSNE_MAX_FRAMES,
              seed: int = 0, title: str = "") -> Path:
    """2-d t-SNE of (subsampled) frame embeddings, one colour per activity."""
    x, y = subsample_frames(embs, activities, max_frames, seed)
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity,
              random_state=seed).fit_transform(x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for n, act in enumerate(dict.fromkeys(activities)):
        sel = y == act
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(n % 20), label=str(act))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(x)} frame embeddings")
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    return _save(fig, out_png)


def _true_match(query_time: np.ndarray, cand_time: np.ndarray) -> np.ndarray:
    """Candidate frame closest in canonical (generator) time to each query frame."""
    return np.abs(query_time[:, None] - cand_time[None, :]).argmin(axis=1)


def _phase_strip(ax, phases: np.ndarray, num_phases: int, vertical: bool) -> None:
    img = phases[:, None] if vertical else phases[None, :]
    ax.imshow(img, aspect="auto", cmap="tab10", vmin=0, vmax=max(num_phases - 1, 9),
              origin="lower" if vertical else "upper", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_alignment(query: np.ndarray, candidate: np.ndarray, out_png: str | os.PathLike[str],
                   *, query_phases: np.ndarray | None = None,
                   candidate_phases: np.ndarray | None = None,
                   query_time: np.ndarray | None = None,
                   candidate_time: np.ndarray | None = None, title: str = "") -> Path:
    """Nearest-neighbour path from ``query`` frames into ``candidate`` frames (all frames)."""
    plt = _pyplot()
    matched = nearest_neighbours(query, candidate)
    fig = plt.figure(figsize=(6.5, 6))
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 20), height_ratios=(20, 1),
                            wspace=0.02, hspace=0.02)
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(np.arange(len(query)), matched, ".", ms=3, label="nearest neighbour")
    if query_time is not None and candidate_time is not None:
        ax.plot(_true_match(query_time, candidate_time), "k--", lw=1,
                label="truth (canonical time)")
    ax.set_xlim(-0.5, len(query) - 0.5)
    ax.set_ylim(-0.5, len(candidate) - 0.5)
    ax.set_xticklabels([])
    ax.yaxis.tick_right()
    ax.yaxis.set_label_position("right")
    ax.set_ylabel("matched frame of the candidate clip")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(title)
    if query_phases is not None and candidate_phases is not None:
        num = int(max(query_phases.max(), candidate_phases.max())) + 1
        _phase_strip(fig.add_subplot(grid[1, 1]), query_phases, num, vertical=False)
        _phase_strip(fig.add_subplot(grid[0, 0]), candidate_phases, num, vertical=True)
    fig.text(0.55, 0.02, "query frame (strips: phases)", ha="center")
    return _save(fig, out_png)

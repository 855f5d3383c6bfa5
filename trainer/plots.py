"""Training curves from ``RUN/log.jsonl``: ``L``, ``L_m``, ``L_c`` and the learning rate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["plot_curves", "read_log"]


def read_log(path: str | os.PathLike[str]) -> list[dict]:
    """The step records of a JSONL log (blank or torn last lines are skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; per-step losses are noisy (random views every step)."""
    if window <= 1 or len(y) < window:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_curves(log_path: str | os.PathLike[str], out_png: str | os.PathLike[str],
                title: str = "") -> Path:
    """Four panels against the step: L (Eq. 9), L_m (Eq. 6, should fall), L_c (Eq. 7, should
    rise toward 1) and lr (halved every ``lr_halve_every`` epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise ValueError(f"plot_curves: {log_path}: no step records")
    step = np.array([r["step"] for r in records])
    # fixed margins: tight_layout costs more than the whole plot on a busy CPU
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.15, top=0.85, wspace=0.25)
    window = max(1, len(records) // 50)
    for ax, key in zip(axes[:3], ("L", "L_m", "L_c"), strict=True):
        y = np.array([r[key] for r in records], dtype=float)
        ax.plot(step, y, color="0.8", lw=0.8, label="per step")
        ax.plot(step, _smooth(y, window), color="C0", lw=1.5, label=f"mean of {window}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[3].plot(step, [r["lr"] for r in records], color="C1")
    axes[3].set_title("lr")
    axes[3].set_xlabel("step")
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

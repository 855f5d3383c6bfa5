"""Pictures of the Penn Action key-event rules, one PNG per labelled action.

Each row is one labelled video: the rule's smoothed signal over time with the phases as
coloured bands and the boundaries as lines (triangles: the second signal's key events),
then stick figures at the first frame, at up to three boundaries and at the last frame.
Videos are spread evenly over the action's labelled videos (by id), so the choice is
fixed and not picked by hand.

    python scripts/penn_event_pictures.py ../shared/data/pennaction/labels docs/img/penn_events
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import numpy as np  # noqa: E402

from masa_rt import penn_events  # noqa: E402
from masa_rt.penn import NothingVisibleError, read_penn_mat  # noqa: E402
from masa_rt.skeleton import get_layout  # noqa: E402

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
MAX_FIGURES = 5


def labelled_videos(labels_dir: Path) -> dict[str, list]:
    """Per action: ``(video, labels)`` for every video its rule labels, by id."""
    out: dict[str, list] = {a: [] for a in penn_events.ACTIONS}
    for mat in sorted(labels_dir.glob("*.mat")):
        try:
            video = read_penn_mat(mat)
        except NothingVisibleError:
            continue
        if video.action in out:
            labels = penn_events.label_video(video.action, video.joints)
            if isinstance(labels, penn_events.Labels):
                out[video.action].append((video, labels))
    return out


def key_frames(labels: penn_events.Labels) -> list[int]:
    """First frame, the first boundaries, last frame (at most MAX_FIGURES)."""
    t = len(labels.phases)
    inner = [int(e) for e in labels.events if 0 < e < t - 1][: MAX_FIGURES - 2]
    return [0, *inner, t - 1]


def draw_timeline(ax, video, labels: penn_events.Labels) -> None:
    t = np.arange(len(labels.phases))
    for p, name in enumerate(labels.phase_names):
        ax.fill_between(t, 0, 1, where=labels.phases == p, color=COLOURS[p], alpha=0.25,
                        transform=ax.get_xaxis_transform(), step="mid", label=name)
    ax.plot(t, labels.signal, color="k", lw=1.2)
    for e in labels.events:
        ax.axvline(e, color="k", ls="--", lw=0.8)
    second = penn_events.second_events(video.action, video.joints)
    if second is not None:
        ax.plot(second, labels.signal[second], "v", color="m", ms=7)
    ax.set_xlim(0, len(t) - 1)
    ax.set_title(f"{video.video_id} ({video.split}, {len(t)} frames)", fontsize=8, loc="left")
    ax.tick_params(labelsize=7)


def draw_figure(ax, joints: np.ndarray, frame: int, labels: penn_events.Labels) -> None:
    """One stick figure in image coordinates (y down), coloured by the frame's phase."""
    layout = get_layout("penn13")
    pose = joints[frame]
    colour = COLOURS[labels.phases[frame]]
    for child, parent in enumerate(layout.parents):
        if parent >= 0:
            seg = pose[[parent, child]]
            ax.plot(seg[:, 0], seg[:, 1], color=colour, lw=2)
    ax.plot(pose[:, 0], pose[:, 1], ".", color="k", ms=2)
    finite = joints[np.isfinite(joints).all(-1)]
    lo, hi = finite.min(0), finite.max(0)
    pad = 0.1 * (hi - lo).max()
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(hi[1] + pad, lo[1] - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"f{frame} {labels.phase_names[labels.phases[frame]]}", fontsize=7)


def draw_action(action: str, videos: list, per_action: int, out_png: Path) -> None:
    pick = np.linspace(0, len(videos) - 1, min(per_action, len(videos))).round().astype(int)
    fig, axes = plt.subplots(len(pick), 1 + MAX_FIGURES, figsize=(13, 2.1 * len(pick)),
                             gridspec_kw={"width_ratios": [3] + [1] * MAX_FIGURES},
                             squeeze=False)
    for row, i in zip(axes, pick, strict=True):
        video, labels = videos[i]
        draw_timeline(row[0], video, labels)
        frames = key_frames(labels)
        for ax, f in zip(row[1:], frames, strict=False):
            draw_figure(ax, video.joints, f, labels)
        for ax in row[1 + len(frames):]:
            ax.axis("off")
    axes[0, 0].legend(fontsize=7, loc="upper right", ncol=3)
    rule = penn_events.RULES[action]
    fig.suptitle(f"{action}: {rule.signal.name} (line), phases (bands), boundaries (dashed), "
                 f"{rule.second.name} key events (triangles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=62)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("labels_dir", type=Path, help="Penn Action labels/ folder")
    ap.add_argument("out_dir", type=Path, help="folder for <action>.png")
    ap.add_argument("--per-action", type=int, default=6, help="videos per picture")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for action, videos in labelled_videos(args.labels_dir).items():
        if videos:
            draw_action(action, videos, args.per_action, args.out_dir / f"{action}.png")
            print(f"{action}: {len(videos)} labelled, wrote {args.out_dir / action}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which LSL channel is which joint coordinate: an LSL stream's channels -> a masa-rt layout.

An LSL pose stream is a flat vector of channels per sample. Its XML description usually
names them (``<desc><channels><channel><label>l_wrist_x</label>...``); masa-rt frames are
``(J, C)`` joints of a named layout (``masa_rt.skeleton``). The map is found, in order:

* **labels**: every label is ``<joint><sep><axis>`` (``sep`` one of ``_ . : - /`` or a
  space, ``axis`` x, y or z, case ignored, e.g. ``l_wrist_x``, ``L_Wrist.X``), ``joint`` a
  joint name of the layout. Without ``layout``, the one layout whose joints the labels
  cover completely (a partial fit is never guessed: name the layout). Channels may come in
  any order; with ``layout`` a joint the stream lacks is sent as NaN (not observed); a
  joint with only some of its axes is an error.
* **no labels** (no description, or empty labels): ``layout`` must be given and the
  stream must have exactly ``J x C`` channels, joint after joint (x, y[, z]), the wire
  order. A channel count alone never decides the layout (docs/formats.md, "Layouts").

Problems raise :class:`ChannelMapError` (a ``ValueError``) with one line.

The layouts' joint names come from ``masa_rt.skeleton`` (numpy only, no model): the bridge
still talks to the server only through the wire protocol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from masa_rt.skeleton import LAYOUTS, Layout, get_layout

__all__ = ["ChannelMap", "ChannelMapError", "map_channels"]

AXES = "xyz"
_LABEL = re.compile(r"^(?P<joint>.+?)[\s_.:/-](?P<axis>[xyz])$", re.IGNORECASE)


class ChannelMapError(ValueError):
    """The stream's channels cannot be read as joints of a layout; one line."""

    user_facing = True


@dataclass(frozen=True)
class ChannelMap:
    """For each coordinate of a ``(J, C)`` frame, the channel it comes from (-1: NaN)."""

    layout: str
    shape: tuple[int, int]
    source: np.ndarray  # (J * C,) int channel index per joint coordinate, -1 = missing
    missing_joints: tuple[str, ...] = ()

    def joints(self, sample: np.ndarray) -> np.ndarray:
        """One sample (channels,) -> (J, C) float32 joints, NaN where the stream has none."""
        padded = np.append(np.asarray(sample, dtype=np.float32), np.float32(np.nan))
        return padded[self.source].reshape(self.shape)  # index -1 reads the NaN pad


def map_channels(labels: list[str] | None, count: int,
                 layout: str | None = None) -> ChannelMap:
    """The channel map of a stream of ``count`` channels with these ``labels``."""
    if labels is not None and len(labels) != count:
        raise ChannelMapError(f"the stream says {count} channels but describes "
                              f"{len(labels)}")
    if not labels or not any(label.strip() for label in labels):
        return _by_order(count, layout)
    parsed = _parse_labels(labels)
    if layout is not None:
        return _by_labels(parsed, _layout(layout))
    return _best_fit(parsed)


def _layout(name: str) -> Layout:
    try:
        return get_layout(name)
    except ValueError:
        raise ChannelMapError(f"unknown layout {name!r} (known: "
                              f"{', '.join(sorted(LAYOUTS))})") from None


def _by_order(count: int, layout: str | None) -> ChannelMap:
    """Unlabelled channels: the wire order of the given layout, nothing else."""
    if layout is None:
        raise ChannelMapError(f"the stream's {count} channels have no labels: name the "
                              "layout they are in (--layout), joint after joint")
    lay = _layout(layout)
    size = lay.num_joints * lay.dims
    if count != size:
        raise ChannelMapError(f"{count} unlabelled channels, but layout {lay.name} has "
                              f"{lay.num_joints} joints x {lay.dims} = {size}")
    return ChannelMap(lay.name, (lay.num_joints, lay.dims), np.arange(size))


def _parse_labels(labels: list[str]) -> list[tuple[str, int]]:
    """(joint name lower-cased, axis index) per channel."""
    out, seen = [], {}
    for i, label in enumerate(labels):
        m = _LABEL.match(label.strip())
        if m is None:
            raise ChannelMapError(f"channel {i} label {label!r} is not <joint>_<x|y|z> "
                                  "(e.g. l_wrist_x)")
        key = (m["joint"].lower(), AXES.index(m["axis"].lower()))
        if key in seen:
            raise ChannelMapError(f"channels {seen[key]} and {i} are both {label!r}")
        seen[key] = i
        out.append(key)
    return out


def _by_labels(parsed: list[tuple[str, int]], lay: Layout) -> ChannelMap:
    """The map onto ``lay``, or the first reason it does not fit."""
    index = {name.lower(): j for j, name in enumerate(lay.joint_names)}
    source = np.full((lay.num_joints, lay.dims), -1, dtype=np.int64)
    for channel, (joint, axis) in enumerate(parsed):
        if joint not in index:
            raise ChannelMapError(f"channel {channel} ({joint}_{AXES[axis]}) is not a joint of "
                                  f"layout {lay.name} (e.g. {lay.joint_names[0]})")
        if axis >= lay.dims:
            raise ChannelMapError(f"channel {channel} ({joint}_{AXES[axis]}): layout "
                                  f"{lay.name} is {lay.dims}D")
        source[index[joint], axis] = channel
    partial = [lay.joint_names[j] for j in range(lay.num_joints)
               if 0 < (source[j] >= 0).sum() < lay.dims]
    if partial:
        raise ChannelMapError(f"joint {partial[0]} has only some of its {lay.dims} axes "
                              f"(layout {lay.name})")
    missing = tuple(lay.joint_names[j] for j in range(lay.num_joints) if source[j, 0] < 0)
    return ChannelMap(lay.name, (lay.num_joints, lay.dims), source.reshape(-1), missing)


def _best_fit(parsed: list[tuple[str, int]]) -> ChannelMap:
    """The one layout the labels cover completely; a partial fit is not guessed at."""
    fits = []
    for name in sorted(LAYOUTS):
        try:
            fits.append(_by_labels(parsed, get_layout(name)))
        except ChannelMapError:
            continue
    if not fits:
        example = "_".join((parsed[0][0], AXES[parsed[0][1]]))
        raise ChannelMapError(f"the channel labels (e.g. {example!r}) fit no layout "
                              f"({', '.join(sorted(LAYOUTS))}): name one with --layout "
                              "to see which label does not fit")
    full = [f for f in fits if not f.missing_joints]
    if len(full) == 1:
        return full[0]
    names = ", ".join(f.layout for f in (full or fits))
    how = "fully" if full else "in part (missing joints would be sent as NaN)"
    raise ChannelMapError(f"the channel labels fit layouts {names} {how}: choose one "
                          "with --layout")

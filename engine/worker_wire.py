"""The messages between the server's :class:`engine.workers.WorkerPool` and its engine
workers (:mod:`engine.worker`). Internal: not the client protocol (docs/protocol.md).

One msgpack array per ZeroMQ message, its first element the kind. Server -> worker::

    ["open", handle, layout, fps, reference | None, declaration | None]
    ["close", handle]
    ["frames", [[handle, seq, t, rows, cols, float32 bytes], ...]]   one per loop
    ["ping"]                                                         heartbeat
    ["reset"]        "I do not know you": drop every session, send "ready" again

Worker -> server::

    ["ready", {"pid", "host", "model", "references", "capacity"}]
    ["answers", [[handle, seq, t_capture, *ESTIMATE_FIELDS], ...], counters]
    ["refused", handle, detail]      open failed there (a model that differs, a full bank)
    ["ping", counters]               heartbeat; counters = the worker's stream counters

A session is named by a *handle* (an int the pool never reuses), not by its id: answers
of a closed or restarted session, or of a session moved off a worker that was taken for
lost, can still arrive, and must not be mistaken for the new incarnation's frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

__all__ = ["ESTIMATE_FIELDS", "RemoteEstimate", "WireError", "decode", "encode",
           "estimate_row", "frame_row", "joints_of"]

# What the server reads of an estimate (engine.server._estimate_msg), plus ref_index and
# the model frame's time, so the answer is the engine's Estimate field for field.
ESTIMATE_FIELDS = ("phase_id", "phase_name", "phase_progress", "progress", "ref_index",
                   "confidence", "state", "activity", "t")


class WireError(ValueError):
    """A message that is not one of the above (a bug or a foreign peer): counted, ignored."""


@dataclass(frozen=True)
class RemoteEstimate:
    """An :class:`masa_rt.align.Estimate` as it came back from a worker (same fields)."""

    phase_id: int
    phase_name: str
    phase_progress: float
    progress: float
    ref_index: float
    confidence: float
    state: str
    activity: str
    t: float


def encode(*parts: Any) -> bytes:
    return msgpack.packb(list(parts), use_bin_type=True)


def decode(data: bytes) -> list:
    """The message as a list whose first element is a str kind, else :class:`WireError`."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types on junk
        raise WireError(f"undecodable: {type(exc).__name__}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise WireError("not a [kind, ...] array")
    return msg


def frame_row(handle: int, seq: int, t: float, joints: np.ndarray) -> list:
    """One capture frame (J, C) for a ``frames`` message (float32, as the protocol's)."""
    joints = np.ascontiguousarray(joints, dtype=np.float32)
    return [handle, int(seq), float(t), joints.shape[0], joints.shape[1], joints.tobytes()]


def joints_of(row: list) -> np.ndarray:
    """The (J, C) joints of a ``frame_row`` (a copy: the message buffer is not kept)."""
    rows, cols, data = int(row[3]), int(row[4]), row[5]
    return np.frombuffer(data, dtype=np.float32).reshape(rows, cols).copy()


def estimate_row(handle: int, seq: int, t_capture: float, est: Any) -> list:
    """One answer of an ``answers`` message from an Estimate (duck-typed)."""
    return [handle, int(seq), float(t_capture), int(est.phase_id), str(est.phase_name or ""),
            float(est.phase_progress), float(est.progress), float(est.ref_index),
            float(est.confidence), str(est.state), str(est.activity or ""), float(est.t)]


def remote_estimate(row: list) -> RemoteEstimate:
    return RemoteEstimate(*row[3:3 + len(ESTIMATE_FIELDS)])

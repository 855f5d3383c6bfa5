"""A simulated headset: replay a recorded pose sequence to the server in real time.

Replay is meant to be indistinguishable from live headsets: frames are paced on an
absolute schedule (frame k of client i is due at ``t0 + (k + i/N) / rate``, so timing
errors never accumulate and the N clients are spread over the frame period instead of
bursting together), each frame is stamped when it is sent, and the latency of every
answer is measured capture -> estimate received in the client clock.

One thread drives all clients with a ``zmq.Poller``: a hundred headsets cost one
thread, not a hundred, and the measurement is not disturbed by thread scheduling.
"""

from __future__ import annotations

import heapq
import json
import zipfile
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from clients.clock import local_clock
from clients.inlet import Estimate
from clients.outlet import DEFAULT_ADDRESS, PoseOutlet


@dataclass(frozen=True)
class Recording:
    """What replay needs from a sequence: (T, J, C) float32 joints, layout, fps."""

    joints: np.ndarray
    layout: str
    fps: float
    activity: str | None = None
    phases: np.ndarray | None = None  # (T,) ids into phase_names, where the file is labelled
    phase_names: tuple[str, ...] | None = None


def load_recording(source: str | Path | Any) -> Recording:
    """A ``.npz`` sequence file, or any object with ``joints``, ``layout`` and ``fps``.

    Reads the file with numpy directly (``allow_pickle=False``): clients depend on the
    wire protocol only, not on ``masa_rt.sequence``.
    """
    if isinstance(source, str | Path):
        source = _read_npz(Path(source))
    joints = np.ascontiguousarray(source.joints, dtype=np.float32)
    if joints.ndim != 3 or len(joints) == 0:
        raise ValueError(f"joints must be a non-empty (T, J, C) array, got {joints.shape}")
    phases, names = getattr(source, "phases", None), getattr(source, "phase_names", None)
    labelled = phases is not None and names is not None and len(phases) == len(joints)
    return Recording(joints, str(source.layout), float(source.fps),
                     getattr(source, "activity", None),
                     np.asarray(phases) if labelled else None,
                     tuple(str(n) for n in names) if labelled else None)


def _read_npz(path: Path) -> Recording:
    """The recording in ``path``, or a ValueError saying what the file is instead."""
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, empty
        if isinstance(exc, FileNotFoundError | IsADirectoryError):
            raise
        raise ValueError(f"{path}: not a .npz sequence file ({exc or 'empty'})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path}: not a .npz sequence file (one .npy array)")
    with f:
        missing = [k for k in ("joints", "layout", "fps") if k not in f.files]
        if "embeddings" in f.files:
            raise ValueError(f"{path} is a built reference, not a recording: replay the demo "
                             "it was built from (e.g. examples/demos/pour_milk.npz)")
        if missing:
            raise ValueError(f"{path}: not a sequence file, missing {', '.join(missing)} "
                             f"(has {', '.join(f.files) or 'nothing'})")
        activity = str(f["activity"]) if "activity" in f.files else None
        labelled = "phases" in f.files and "phase_names" in f.files
        return Recording(f["joints"], str(f["layout"]), float(f["fps"]), activity,
                         f["phases"] if labelled else None,
                         tuple(f["phase_names"].tolist()) if labelled else None)


@dataclass
class ReplayReport:
    """Counts and latency of one replay; every frame is answered, rejected, dropped or lost."""

    clients: int
    rate_hz: float
    duration_s: float
    sent: int = 0
    answered: int = 0
    rejected: Counter = field(default_factory=Counter)  # by server error reason
    dropped: Counter = field(default_factory=Counter)  # not sent: link down / queue full
    latencies_s: list[float] = field(default_factory=list, repr=False)
    # Labelled recordings: answers whose phase name is the file's label for the frame they
    # describe ("waiting" and other names count as wrong), of the answers that describe one.
    phase_right: int = 0
    phase_scored: int = 0

    @property
    def phase_accuracy(self) -> float | None:
        """Fraction of scored answers with the right phase; None for an unlabelled file."""
        return self.phase_right / self.phase_scored if self.phase_scored else None

    @property
    def unanswered(self) -> int:
        """Sent but neither answered nor rejected before the drain deadline."""
        return self.sent - self.answered - sum(self.rejected.values())

    def latency_ms(self, q: float) -> float:
        """Latency percentile ``q`` (0-100) in ms; NaN without answers."""
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(self.latencies_s, q)) * 1e3

    def to_dict(self) -> dict:
        return {
            "clients": self.clients, "rate_hz": self.rate_hz, "duration_s": self.duration_s,
            "sent": self.sent, "answered": self.answered, "unanswered": self.unanswered,
            "rejected": dict(self.rejected), "dropped": dict(self.dropped),
            "latency_ms": {f"p{q:g}": self.latency_ms(q) for q in (50, 99, 99.9)},
            "phase_accuracy": self.phase_accuracy, "phase_scored": self.phase_scored,
        }

    def summary(self) -> str:
        """One line for the terminal; reasons appear only when there are any."""
        d = self.to_dict()
        lat = ", ".join(f"{k} {v:.2f}" for k, v in d["latency_ms"].items())
        rejected = f"rejected {sum(self.rejected.values())} {d['rejected'] or ''}".rstrip()
        dropped = f"dropped {sum(self.dropped.values())} {d['dropped'] or ''}".rstrip()
        phase = ("" if self.phase_accuracy is None else
                 f"; phase accuracy {self.phase_accuracy * 100:.1f} % of {self.phase_scored} "
                 "answers (the file's labels)")
        return (f"{self.clients} client(s) at {self.rate_hz:g} Hz for {self.duration_s:.1f} s: "
                f"sent {self.sent}, answered {self.answered}, {rejected}, {dropped}, "
                f"unanswered {self.unanswered}; latency ms {lat}{phase}")


OnEstimate = Callable[[int, Estimate], None]


def file_declaration(source: str | Path | Any) -> dict | None:
    """The layout declaration a recording of a declared layout carries (its
    ``layout_declaration`` field, JSON text), sent in the hello so that the server need not
    know the layout (the server checks it); None for other files and objects."""
    if not isinstance(source, str | Path):
        return getattr(source, "layout_declaration", None)
    with np.load(source, allow_pickle=False) as f:  # load_recording has vetted the file
        if "layout_declaration" not in f.files:
            return None
        text = str(f["layout_declaration"])
    try:
        declared = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: field 'layout_declaration' is not JSON ({exc})") from None
    return declared if isinstance(declared, dict) else None


def replay(source: str | Path | Any, address: str = DEFAULT_ADDRESS, rate_hz: float | None = None,
           clients: int = 1, loop: bool = False, duration: float | None = None,
           on_estimate: OnEstimate | None = None, *, reference: str | None = None,
           session_prefix: str = "replay", drain_s: float = 2.0,
           open_timeout: float = 5.0, layout_declaration: dict | None = None) -> ReplayReport:
    """Stream ``source`` from ``clients`` simulated headsets; return the report.

    Without ``loop`` each client sends the recording once; ``duration`` (s) stops earlier
    (or ends a loop). ``on_estimate(client_index, estimate)`` sees every answer.
    ``layout_declaration`` (a layout file's contents) declares the recording's layout in
    the hello; by default the file's own declaration, where it carries one.
    """
    rec = load_recording(source)
    if layout_declaration is None:
        layout_declaration = file_declaration(source)
    rate = float(rec.fps if rate_hz is None else rate_hz)
    if clients < 1 or rate <= 0:
        raise ValueError("need clients >= 1 and a positive rate")
    frames = None if loop else len(rec.joints)
    if frames is None and duration is None:
        raise ValueError("loop needs a duration")
    with ExitStack() as stack:
        outlets = []
        for i in range(clients):
            outlet = PoseOutlet(address, session=f"{session_prefix}-{i}", layout=rec.layout,
                                fps=rate, reference=reference,
                                layout_declaration=layout_declaration)
            outlet.open(open_timeout)
            stack.callback(outlet.close)
            outlets.append(outlet)
        run = _Run(rec, outlets, rate, on_estimate)
        t0 = local_clock()
        run.stream(t0, frames, duration)
        run.drain(local_clock() + drain_s)
        run.report.duration_s = local_clock() - t0
        for outlet in outlets:
            run.report.dropped.update(outlet.dropped)
            run.report.rejected.update(outlet.rejected)
    return run.report


class _Run:
    """The state of one replay: outlets, their poller, the schedule and the tallies."""

    def __init__(self, rec: Recording, outlets: list[PoseOutlet], rate: float,
                 on_estimate: OnEstimate | None) -> None:
        self.rec, self.outlets, self.rate, self.on_estimate = rec, outlets, rate, on_estimate
        self.report = ReplayReport(len(outlets), rate, 0.0)
        self.poller = zmq.Poller()
        self.index = {}
        for i, outlet in enumerate(outlets):
            self.poller.register(outlet.socket, zmq.POLLIN)
            self.index[outlet.socket] = i

    def stream(self, t0: float, frames: int | None, duration: float | None) -> None:
        n = len(self.outlets)
        due = [(t0 + self._offset(0, i), i, 0) for i in range(n)]  # (deadline, client, k)
        heapq.heapify(due)
        while due:
            deadline, i, k = due[0]
            now = local_clock()
            if deadline > now:
                self.collect(self.poller.poll(int((deadline - now) * 1000.0)))
                continue
            heapq.heappop(due)
            if self.outlets[i].push(self.rec.joints[k % len(self.rec.joints)]) is not None:
                self.report.sent += 1
            k += 1
            done = (frames is not None and k >= frames) or (
                duration is not None and self._offset(k, i) >= duration)
            if not done:
                heapq.heappush(due, (t0 + self._offset(k, i), i, k))

    def _offset(self, k: int, i: int) -> float:
        """When frame k of client i is due, after the start (s): an absolute schedule."""
        return (k + i / len(self.outlets)) / self.rate

    def drain(self, deadline: float) -> None:
        """Wait for outstanding answers until all frames are accounted for or the deadline."""
        while self.outstanding() > 0:
            now = local_clock()
            if now >= deadline:
                return
            self.collect(self.poller.poll(max(1, int((deadline - now) * 1000.0))))

    def score_phase(self, i: int, est: Estimate) -> None:
        """Compare the answer with the label of the frame it describes: frame seq, or
        seq - lag where the references have lookahead (the welcome's ``lookahead_s``)."""
        if self.rec.phases is None:
            return
        lag = round(float((self.outlets[i].welcome or {}).get("lookahead_s") or 0.0) * self.rate)
        frame = est.seq - lag
        if frame < 0:  # answers a frame not yet described: nothing to score
            return
        truth = self.rec.phase_names[int(self.rec.phases[frame % len(self.rec.phases)])]
        self.report.phase_scored += 1
        self.report.phase_right += int(est.phase_name == truth)

    def outstanding(self) -> int:
        rejected = sum(sum(o.rejected.values()) for o in self.outlets)
        return self.report.sent - self.report.answered - rejected

    def collect(self, events: list) -> None:
        for sock, _ in events:
            i = self.index[sock]
            while (est := self.outlets[i].pull(0.0)) is not None:
                self.report.answered += 1
                self.report.latencies_s.append(est.latency)
                self.score_phase(i, est)
                if self.on_estimate is not None:
                    self.on_estimate(i, est)


def write_report(report: ReplayReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")

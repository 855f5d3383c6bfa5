"""LabStreamingLayer bridge: an LSL pose stream in, masa-rt estimates out as LSL streams.

``masa-rt lsl --name MyPoses``: resolves the LSL stream, maps its channels to a masa-rt
layout (:mod:`clients.lsl_channels`), opens a session with the server as any headset does
(:class:`clients.PoseOutlet`, wire protocol only) and forwards every sample as a frame.
Each estimate goes out again on LSL, stamped with the capture time of the sample it
answers, so LSL recorders (LabRecorder) line estimates up with the poses exactly:

* ``<name>-masa`` (type ``MasaEstimate``, double, at the pose stream's rate): channels
  :data:`ESTIMATE_CHANNELS`;
* ``<name>-masa-markers`` (type ``Markers``, one string channel, irregular): a JSON object
  ``{"activity", "phase", "phase_id", "state"}`` whenever one of them changes.

Times: LSL stamps are in the pose outlet's clock; the bridge adds the inlet's
``time_correction()`` (0 on one machine) to get this machine's ``local_clock``, which is
``clients.local_clock`` (both read CLOCK_MONOTONIC). A sample whose corrected stamp is
not after the previous one's (the server would refuse it) is skipped and counted.

pylsl is an optional dependency (``pip install "masa-rt[lsl]"``; its wheels bundle
liblsl), imported only when a bridge starts.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients._sockets import CurveKeys
from clients.clock import local_clock
from clients.errors import MasaClientError
from clients.inlet import Estimate
from clients.lsl_channels import ChannelMap, ChannelMapError, map_channels
from clients.outlet import DEFAULT_ADDRESS, PoseOutlet
from masa_rt.protocol import ProtocolError

__all__ = ["ESTIMATE_CHANNELS", "BridgeReport", "LslBridge", "LslUnavailable", "channel_labels",
           "load_pylsl"]

log = logging.getLogger("masa_rt.lsl")

ESTIMATE_CHANNELS = ("phase_id", "phase_progress", "progress", "confidence", "latency_s")
ESTIMATE_TYPE, MARKER_TYPE = "MasaEstimate", "Markers"
QUERY_PROPS = ("name", "type", "source_id")


class LslUnavailable(MasaClientError):
    """pylsl (or the liblsl it loads) is missing; one line saying how to get it."""


def load_pylsl() -> Any:
    """The pylsl module, imported on first use (an optional dependency)."""
    try:
        import pylsl as lsl
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: liblsl not found
        raise LslUnavailable(f"the LSL bridge needs pylsl with liblsl: pip install "
                             f"'masa-rt[lsl]' ({type(exc).__name__}: {exc})") from None
    return lsl


def channel_labels(info: Any) -> list[str] | None:
    """The ``<channels><channel><label>`` labels of a full StreamInfo, or None."""
    channel = info.desc().child("channels").child("channel")
    labels = []
    while not channel.empty():
        labels.append(channel.child_value("label"))
        channel = channel.next_sibling("channel")
    return labels or None


@dataclass
class BridgeReport:
    """What one bridge run did; every sample is sent, skipped or dropped."""

    samples_in: int = 0
    frames_sent: int = 0
    estimates_out: int = 0
    markers_out: int = 0
    skipped: Counter = field(default_factory=Counter)  # by reason, before sending

    def summary(self, outlet: PoseOutlet | None) -> str:
        rejected = dict(outlet.rejected) if outlet else {}
        dropped = dict(outlet.dropped) if outlet else {}
        return (f"lsl bridge: samples {self.samples_in}, sent {self.frames_sent}, "
                f"skipped {dict(self.skipped) or 0}, dropped {dropped or 0}, "
                f"rejected {rejected or 0}, estimates out {self.estimates_out}, "
                f"markers {self.markers_out}")


class LslBridge:
    """One LSL pose stream <-> one masa-rt session (see the module docstring).

    >>> with LslBridge("name", "MyPoses") as bridge:     # doctest: +SKIP
    ...     bridge.run(duration=60.0)
    """

    def __init__(self, prop: str, value: str, address: str = DEFAULT_ADDRESS, *,
                 layout: str | None = None, fps: float | None = None,
                 reference: str | None = None, session: str | None = None,
                 curve: CurveKeys | None = None, resolve_timeout: float = 5.0) -> None:
        if prop not in QUERY_PROPS:
            raise ValueError(f"resolve by one of {', '.join(QUERY_PROPS)}, not {prop!r}")
        self.lsl = load_pylsl()
        self.report = BridgeReport()
        self._inlet, self._info = self._resolve(prop, value, resolve_timeout)
        self.channels = self._channel_map(layout)
        self.fps = self._rate(fps)
        self.outlet = PoseOutlet(address, session=session, layout=self.channels.layout,
                                 fps=self.fps, reference=reference, curve=curve)
        self._estimates = self._markers = None
        self._offset = 0.0
        self._last_t = -math.inf
        self._last_marker: tuple | None = None

    # ----------------------------------------------------------------- setup

    def _resolve(self, prop: str, value: str, timeout: float) -> tuple[Any, Any]:
        """Find exactly one stream with ``prop == value``; open an inlet, read its header."""
        lsl = self.lsl
        found = lsl.resolve_byprop(prop, value, minimum=1, timeout=timeout)
        if not found:
            raise ConnectionError(f"no LSL stream with {prop}={value!r} within {timeout:g} s")
        if len({s.source_id() or s.uid() for s in found}) > 1:
            ids = ", ".join(sorted(s.source_id() or s.uid() for s in found))
            raise ValueError(f"{len(found)} LSL streams have {prop}={value!r} (source ids "
                             f"{ids}): choose one with --source-id")
        if found[0].channel_format() == lsl.cf_string:
            raise ValueError(f"LSL stream {found[0].name()!r} carries strings, not poses")
        # max_buflen: seconds the inlet buffers; a pose older than that is not worth sending.
        inlet = lsl.StreamInlet(found[0], max_buflen=2, recover=True)
        return inlet, inlet.info(timeout=timeout)  # the full header, with <desc>

    def _channel_map(self, layout: str | None) -> ChannelMap:
        try:
            return map_channels(channel_labels(self._info), self._info.channel_count(), layout)
        except ChannelMapError as exc:  # say which stream: the bridge may be one of several
            raise ChannelMapError(f"LSL stream {self._info.name()!r}: {exc}") from None

    def _rate(self, fps: float | None) -> float:
        rate = fps if fps is not None else self._info.nominal_srate()
        if not rate or rate <= 0:
            raise ValueError(f"LSL stream {self._info.name()!r} has an irregular rate: "
                             "give its frame rate with --fps")
        return float(rate)

    def open(self, timeout: float = 5.0) -> LslBridge:
        """Open the session and the inlet, and make the two estimate outlets."""
        welcome = self.outlet.open(timeout)
        self._inlet.open_stream(timeout=timeout)
        self._offset = self._inlet.time_correction(timeout=timeout)
        self._estimates, self._markers = self._make_outlets(welcome)
        if self.channels.missing_joints:
            log.warning("event=lsl_missing_joints layout=%s count=%d first=%s",
                        self.channels.layout, len(self.channels.missing_joints),
                        self.channels.missing_joints[0])
        log.info("event=lsl_bridge stream=%s layout=%s fps=%g session=%s", self._info.name(),
                 self.channels.layout, self.fps, self.outlet.session)
        return self

    def _make_outlets(self, welcome: dict) -> tuple[Any, Any]:
        lsl, name, sid = self.lsl, self._info.name(), self.outlet.session
        info = lsl.StreamInfo(f"{name}-masa", ESTIMATE_TYPE, len(ESTIMATE_CHANNELS), self.fps,
                              lsl.cf_double64, f"masa-rt:{sid}")
        channels = info.desc().append_child("channels")
        for label in ESTIMATE_CHANNELS:
            channels.append_child("channel").append_child_value("label", label)
        masa = info.desc().append_child("masa_rt")
        for key, value in (("session", sid), ("server", self.outlet.address),
                           ("layout", self.channels.layout), ("pose_stream", name),
                           ("references", ",".join(welcome["references"]))):
            masa.append_child_value(key, value)
        markers = lsl.StreamInfo(f"{name}-masa-markers", MARKER_TYPE, 1, lsl.IRREGULAR_RATE,
                                 lsl.cf_string, f"masa-rt:{sid}:markers")
        return lsl.StreamOutlet(info), lsl.StreamOutlet(markers)

    def close(self) -> None:
        """Say bye to the server; close the inlet and the outlets."""
        self.outlet.close()
        for stream in (self._inlet, self._estimates, self._markers):
            if stream is not None and hasattr(stream, "close_stream"):
                stream.close_stream()
        self._estimates = self._markers = None

    def __enter__(self) -> LslBridge:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- streaming

    def run(self, duration: float | None = None, stop: Any = None) -> BridgeReport:
        """Forward until ``duration`` s pass or ``stop`` (a threading.Event) is set."""
        end = math.inf if duration is None else local_clock() + duration
        while local_clock() < end and not (stop is not None and stop.is_set()):
            self.step(timeout=0.02)
        return self.report

    def step(self, timeout: float = 0.0) -> int:
        """Forward the samples that arrived (waiting up to ``timeout`` s) and publish the
        estimates that came back; returns how many samples were read."""
        samples, stamps = self._inlet.pull_chunk(timeout=timeout, max_samples=256)
        if samples:
            self._offset = self._inlet.time_correction(timeout=0.0)  # background-updated
        for sample, stamp in zip(samples, stamps, strict=True):
            self._forward(np.asarray(sample), stamp + self._offset)
        while (est := self.outlet.pull(0.0)) is not None:
            self._publish(est)
        return len(samples)

    def _forward(self, sample: np.ndarray, t: float) -> None:
        self.report.samples_in += 1
        if not t > self._last_t:  # the server refuses a frame not after the last one
            self.report.skipped["not_after_previous"] += 1
            return
        try:
            seq = self.outlet.push(self.channels.joints(sample), stamp=t)
        except ProtocolError:  # +-inf in the sample: refused locally, no seq used
            self.report.skipped["non_finite"] += 1
            return
        self._last_t = t
        if seq is not None:  # None: dropped locally, counted in outlet.dropped
            self.report.frames_sent += 1

    def _publish(self, est: Estimate) -> None:
        values = [est.phase_id, est.phase_progress, est.progress, est.confidence, est.latency]
        self._estimates.push_sample(values, est.t_capture)
        self.report.estimates_out += 1
        marker = (est.activity, est.phase_name, est.phase_id, est.state)
        if marker != self._last_marker:
            self._last_marker = marker
            text = json.dumps({"activity": est.activity, "phase": est.phase_name,
                               "phase_id": est.phase_id, "state": est.state})
            self._markers.push_sample([text], est.t_capture)
            self.report.markers_out += 1

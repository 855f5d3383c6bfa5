"""``masa-rt watch``: a live terminal dashboard of the server's estimate stream (PUB).

One line per session: id, activity, phase, a progress bar, confidence, state and latency.
On a terminal it redraws in place about 10 times a second (ANSI cursor movement); piped
into a file or a CI log it prints plain lines once a second instead, so logs stay readable.
Rendering is a pure function of the latest estimates (:func:`render`), tested on its own;
the loop around it only pulls from :class:`clients.inlet.EstimateInlet`. No torch here.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field
from typing import TextIO

from clients._sockets import CurveKeys
from clients.clock import local_clock
from clients.inlet import DEFAULT_PUB_ADDRESS, Estimate, EstimateInlet

__all__ = ["Dashboard", "WatchConfig", "latency_ms", "progress_bar", "render", "watch"]

HEADER = (f"{'session':<16} {'activity':<14} {'phase':<16} {'progress':<27} "
          f"{'conf':>4}  {'state':<13} {'latency':>10}")


@dataclass(frozen=True)
class WatchConfig:
    """How the dashboard draws; ``clock_offset`` relates headset and server clocks."""

    address: str = DEFAULT_PUB_ADDRESS
    session: str | None = None  # None: every session
    tty_hz: float = 10.0  # redraws per second on a terminal
    plain_period_s: float = 1.0  # seconds between blocks of plain lines otherwise
    forget_s: float = 10.0  # a session silent this long leaves the table
    bar_width: int = 20
    # Server-minus-headset clock offset (s). Known (0 when both run on this machine):
    # latency = server send - capture. Unknown (None): server-side latency only.
    clock_offset: float | None = None
    curve: CurveKeys | None = None  # for a --secure server (None: plain)
    operator: bool = False  # an operator key: every tenant's sessions, not only its own


def latency_ms(est: Estimate, clock_offset: float | None) -> tuple[float, str]:
    """(milliseconds, kind): capture -> server send if the clock offset is known
    ('e2e'), else server receive -> send ('server'), which needs no offset."""
    if clock_offset is not None:
        return (est.t_server_send - (est.t_capture + clock_offset)) * 1e3, "e2e"
    return (est.t_server_send - est.t_server_recv) * 1e3, "server"


def progress_bar(progress: float, width: int = 20) -> str:
    """``[########............]  42%``; out-of-range or NaN progress is clamped to 0..1."""
    p = 0.0 if not math.isfinite(progress) else min(max(progress, 0.0), 1.0)
    filled = int(round(p * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {p * 100:3.0f}%"


def _cut(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else text[:width - 1] + "~"


def render_line(est: Estimate, cfg: WatchConfig) -> str:
    """One session's line (fixed columns, so a redraw never leaves fragments)."""
    lat, kind = latency_ms(est, cfg.clock_offset)
    return (f"{_cut(est.session, 16):<16} {_cut(est.activity, 14):<14} "
            f"{_cut(est.phase_name, 16):<16} {progress_bar(est.progress, cfg.bar_width):<27} "
            f"{est.confidence:4.2f}  {_cut(est.state, 13):<13} "
            f"{lat:7.2f} ms{'' if kind == 'e2e' else '*'}")


def render(latest: dict[str, Estimate], cfg: WatchConfig) -> list[str]:
    """Header plus one line per session, sorted by id; a footnote explains '*'."""
    lines = [HEADER] + [render_line(latest[s], cfg) for s in sorted(latest)]
    if not latest:
        lines.append(f"(no estimates yet from {cfg.address}: is `masa-rt serve` running "
                     "and publishing there? see --address)")
    if cfg.clock_offset is None:
        lines.append("* server-side latency (receive -> send); pass --clock-offset for e2e")
    return lines


@dataclass
class Dashboard:
    """Latest estimate per session and the drawing state (how many lines to overwrite)."""

    cfg: WatchConfig = field(default_factory=WatchConfig)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None  # None: ask ``out``
    latest: dict[str, Estimate] = field(default_factory=dict)
    received: int = 0
    _seen: dict[str, float] = field(default_factory=dict)
    _drawn: int = 0

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = bool(getattr(self.out, "isatty", lambda: False)())

    def update(self, est: Estimate) -> None:
        self.latest[est.session] = est
        self._seen[est.session] = est.t_received
        self.received += 1

    def draw(self, now: float) -> None:
        """Redraw in place on a TTY, else append a block of plain lines."""
        for s in [s for s, t in self._seen.items() if now - t > self.cfg.forget_s]:
            del self._seen[s], self.latest[s]
        lines = render(self.latest, self.cfg)
        if self.tty:
            # Up to the first line we drew, clear to the end of the screen, draw again.
            prefix = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            self.out.write(prefix + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()

    @property
    def period(self) -> float:
        return 1.0 / self.cfg.tty_hz if self.tty else self.cfg.plain_period_s

    def run(self, inlet: EstimateInlet, duration: float | None = None,
            stop: threading.Event | None = None) -> int:
        """Pull and draw until ``duration`` s pass or ``stop`` is set; return estimates seen."""
        t_end = math.inf if duration is None else local_clock() + duration
        next_draw = local_clock()
        while not (stop is not None and stop.is_set()):
            now = local_clock()
            if now >= t_end:
                break
            if now >= next_draw:
                self.draw(now)
                next_draw = now + self.period
            est = inlet.pull(min(next_draw, t_end) - now)
            if est is not None:
                self.update(est)
                for more in inlet.pull_chunk():
                    self.update(more)
        self.draw(local_clock())
        return self.received


def watch(cfg: WatchConfig, duration: float | None = None, out: TextIO | None = None) -> int:
    """``masa-rt watch``: subscribe and draw until ``duration`` or Ctrl-C; exit status."""
    dash = Dashboard(cfg, out or sys.stdout)
    with EstimateInlet(cfg.address, cfg.session, curve=cfg.curve,
                       operator=cfg.operator) as inlet:
        try:
            dash.run(inlet, duration)
        except KeyboardInterrupt:
            pass
    return 0

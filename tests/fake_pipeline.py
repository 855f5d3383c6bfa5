"""A stand-in for engine.pipeline.Pipeline without a model, for server/watch/bench tests.

It implements the methods the server calls and answers every submitted frame on the next
``step()`` with an estimate derived from the frame's seq (progress = seq / 100), so tests
can check exactly what came back. ``hold`` and ``fail_next`` simulate a stalled or broken
engine.
"""

from __future__ import annotations

import numpy as np

from masa_rt.align import Estimate

SHAPE = (42, 3)


class FakePipeline:
    """The engine's interface without a model: estimate progress = seq / 100."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[str, float]] = {}
        self.queue: list[tuple[str, int, float]] = []
        self.hold = False  # True: step() answers nothing (a stalled engine)
        self.fail_next = False  # True: the next step() raises (an engine bug)

    def open_session(self, session_id: str, layout: str, fps: float,
                     reference: str | None = None) -> dict:
        if layout != "h2o_hands":
            raise ValueError(f"layout {layout!r} does not match the model's h2o_hands")
        if reference not in (None, "pour_milk"):
            raise KeyError(f"reference {reference!r} not loaded")
        self.open[session_id] = (layout, fps)
        return {"shape": SHAPE, "model": "fake", "references": ["pour_milk"], "window": 32}

    def close_session(self, session_id: str) -> None:
        self.open.pop(session_id, None)

    def reset_session(self, session_id: str) -> None:
        pass

    def submit(self, session_id: str, seq: int, t: float, joints: np.ndarray) -> None:
        assert joints.shape == SHAPE
        self.queue.append((session_id, seq, t))

    def step(self) -> list[tuple[str, int, float, Estimate]]:
        if self.fail_next:
            self.fail_next = False
            self.queue.clear()
            raise RuntimeError("engine exploded")
        if self.hold:
            return []
        out = [(sid, seq, t, Estimate(seq % 3, f"phase{seq % 3}", 0.5, min(seq / 100, 1.0),
                                      float(seq), 0.9, "tracking", "pour_milk", t))
               for sid, seq, t in self.queue]
        self.queue.clear()
        return out

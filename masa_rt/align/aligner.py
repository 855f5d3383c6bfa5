"""``Aligner``: the online aligner of one stream, a stepper (``step``, ``reset``). It is a
bank of one session, so it runs the same code as ``AlignerBank``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from masa_rt.align.compiled import CompiledReferences, OverReferences, checked_references
from masa_rt.align.config import AlignerConfig
from masa_rt.align.estimate import Estimate, read_estimates
from masa_rt.align.inputs import decoder_inputs, unit_rows_or_zero
from masa_rt.align.phase_filter import filtered, phase_filter_for
from masa_rt.align.reference import Reference
from masa_rt.align.sessions import Sessions
from masa_rt.align.step import step as step_sessions


class Aligner(OverReferences):
    """Online aligner of one stream against one or more references (docs/aligner.md).

    Several references: every reference's relocaliser runs each frame (it gives each
    activity's recent best cost); only the chosen reference's tracker runs. The choice
    switches with hysteresis (``activity_margin`` for ``activity_patience`` frames).
    It is a batch of one session: the same code as :class:`AlignerBank`.
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None) -> None:
        refs = checked_references(references)
        self._init(CompiledReferences(refs, config or AlignerConfig.for_references(refs)))

    def _init(self, model: CompiledReferences) -> None:
        self._model = model
        self._sessions = Sessions(model, capacity=1)
        self._row = np.array([self._sessions.add()])
        self._filter = phase_filter_for(model, 1)
        self._last = read_estimates(self._sessions, self._row)[0]

    @property
    def dim(self) -> int:
        return self._model.dim

    def fresh(self) -> Aligner:
        """A new aligner over the same references and config, sharing their read-only
        arrays (cheap)."""
        new = Aligner.__new__(Aligner)
        new._init(self._model)
        return new

    @property
    def last(self) -> Estimate:
        """The latest estimate (``waiting`` before the first frame)."""
        return self._last

    def reset(self) -> None:
        self._sessions.reset(self._row)
        if self._filter is not None:
            self._filter.reset(self._row)
        self._last = read_estimates(self._sessions, self._row)[0]

    def step(self, embedding: np.ndarray | None, t: float, valid: bool = True,
             inputs: np.ndarray | None = None) -> Estimate:
        """Consume one frame's embedding (d,) at time ``t`` (seconds). ``None``, any NaN or
        ``valid=False`` mean "no pose this frame": the position is held. ``inputs`` (D,):
        the frame's model input, required when a reference carries a phase decoder.
        With :attr:`lookahead` L > 0, the estimate describes the frame given L steps
        before (its ``t``; ``waiting`` for the first L)."""
        if embedding is None:
            q, ok = np.zeros((1, self.dim), dtype=np.float32), np.zeros(1, dtype=bool)
        else:
            q, ok = unit_rows_or_zero(np.reshape(embedding, (1, -1)), np.array([valid]),
                                       self.dim, "Aligner.step")
        x = decoder_inputs(self._model, inputs, 1, "Aligner.step")
        estimates = step_sessions(self._sessions, self._row, q, ok, np.array([float(t)]), x)
        if self._filter is not None:
            estimates = filtered(self._sessions, self._filter, self._row, q, ok, estimates)
        self._last = estimates[0]
        return self._last

    def run(self, embeddings: np.ndarray, times: np.ndarray | None = None,
            valid: np.ndarray | None = None) -> list[Estimate]:
        """Step through a whole (T, d) sequence; ``times`` default to the first
        reference's frame rate."""
        n = len(embeddings)
        if times is None:
            times = np.arange(n) / self.references[0].fps
        ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return [self.step(embeddings[i], float(times[i]), bool(ok[i])) for i in range(n)]


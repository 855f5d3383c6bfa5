"""``AlignerBank``: many sessions over the same references and config, stepped together in
one batched call (``step_many``); each behaves exactly as its own ``Aligner``."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

from masa_rt.align.compiled import CompiledReferences, OverReferences, checked_references
from masa_rt.align.config import AlignerConfig
from masa_rt.align.estimate import Estimate, EstimateBatch, read_estimates
from masa_rt.align.inputs import decoder_inputs, unit_rows_or_zero
from masa_rt.align.phase_filter import filtered, phase_filter_for
from masa_rt.align.reference import Reference
from masa_rt.align.sessions import Sessions
from masa_rt.align.step import step as step_sessions


class AlignerBank(OverReferences):
    """Many sessions over the same references and config, stepped together.

    A session is created on first sight (or by :meth:`add`) and runs the same math as its
    own :class:`Aligner` would. ``step_many`` is one matmul and a fixed number of numpy
    operations over all the sessions given, whatever their number. The float32 products
    can differ in the last bits with the number of sessions stepped together (the BLAS
    kernel's blocking), which now and then flips a near-tie: the activity of 53 frames of
    the harness's 24 NaN-joint streams changed between stepping them alone and with all
    scenarios' streams at once (docs/changelog.md).
    """

    def __init__(self, references: Reference | Sequence[Reference],
                 config: AlignerConfig | None = None, capacity: int = 16) -> None:
        refs = checked_references(references)
        self._model = CompiledReferences(refs, config or AlignerConfig.for_references(refs))
        self._sessions = Sessions(self._model, capacity)
        self._filter = phase_filter_for(self._model, capacity)
        self._slot: dict[Hashable, int] = {}
        self._ids: list[Hashable] = []  # session of each slot

    @property
    def needs_inputs(self) -> bool:
        """True when a reference's phase decoder is used: ``step_many`` then needs
        ``inputs``; otherwise callers need not build them."""
        return bool(self._model.decoders)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, session: Hashable) -> bool:
        return session in self._slot

    @property
    def sessions(self) -> list[Hashable]:
        return list(self._ids)

    def add(self, session: Hashable) -> None:
        """Start a session (``waiting``); nothing happens if it exists."""
        if session not in self._slot:
            self._slot[session] = self._sessions.add()
            self._ids.append(session)
            if self._filter is not None:
                self._filter.grow(self._slot[session] + 1)
                self._filter.reset(np.array([self._slot[session]]))

    def remove(self, session: Hashable) -> None:
        slot = self._slot.pop(session, None)
        if slot is None:
            return
        moved = self._sessions.remove(slot)
        last_session = self._ids.pop()
        if moved != slot and self._filter is not None:
            self._filter.move(moved, slot)
        if moved != slot:
            self._ids[slot] = last_session
            self._slot[last_session] = slot

    def reset(self, session: Hashable) -> None:
        """Restart a session (creating it if needed), as :meth:`Aligner.reset`."""
        self.add(session)
        self._sessions.reset(np.array([self._slot[session]]))
        if self._filter is not None:
            self._filter.reset(np.array([self._slot[session]]))

    def last(self, session: Hashable) -> Estimate:
        """A session's latest estimate (``waiting`` for an unknown one)."""
        if session not in self._slot:
            return Estimate(-1, "", 0.0, 0.0, 0.0, 0.0, "waiting", self._model.activities[0],
                            math.nan)
        return read_estimates(self._sessions, np.array([self._slot[session]]))[0]

    def step_many(self, ids: Sequence[Hashable], embeddings: np.ndarray,
                  times: Sequence[float] | np.ndarray,
                  valid: Sequence[bool] | np.ndarray | None = None,
                  inputs: np.ndarray | None = None) -> EstimateBatch:
        """Step each session ``ids[b]`` (distinct) with ``embeddings[b]`` (B, d) at
        ``times[b]``; ``valid[b] = False`` or a NaN means no pose (as
        :meth:`Aligner.step`); ``inputs`` (B, D): the frames' model inputs, required when
        a reference carries a phase decoder. Returns the estimates in the order of
        ``ids``; with :attr:`lookahead` L > 0, each describes that session's frame of L
        steps before (its ``t``)."""
        q = np.asarray(embeddings, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] != len(ids):
            raise ValueError(f"step_many: expected ({len(ids)}, d) embeddings, found {q.shape}")
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        if t.shape != (len(ids),):
            raise ValueError(f"step_many: expected {len(ids)} times, found {t.shape}")
        q, ok = unit_rows_or_zero(q, valid, self._model.dim, "step_many")
        x = decoder_inputs(self._model, inputs, len(ids), "step_many")
        for session in ids:
            if session not in self._slot:
                self.add(session)
        rows = np.fromiter((self._slot[s] for s in ids), dtype=np.int64, count=len(ids))
        if len(set(rows.tolist())) != len(rows):
            raise ValueError("step_many: a session appears more than once in one step")
        estimates = step_sessions(self._sessions, rows, q, ok, t, x)
        if self._filter is not None:
            estimates = filtered(self._sessions, self._filter, rows, q, ok, estimates)
        return estimates

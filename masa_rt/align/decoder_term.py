"""The phase-decoder term: each reference's phase decoder (``masa_rt.phase_decoder``)
steps on the frame's model input and adds ``decoder_weight * -log(p(phase) / max p)`` to
the cost of each of its frames, before the tracker and the relocaliser read the costs;
and where the active reference's decoder is sure of the phase next to the tracked one,
the *reported* position moves into that phase (``report_position``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from masa_rt.phase_decoder import mean_log_probs

if TYPE_CHECKING:
    from masa_rt.align.sessions import Sessions


def decode(sessions: Sessions, rows: np.ndarray, read: np.ndarray, heard: np.ndarray,
           x: np.ndarray | None,
           cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step every reference's phase decoder on the frames of ``read`` sessions (a lost
    frame holds its state); where ``heard``, add ``decoder_weight * -log(p(phase) /
    max p)`` to each column of ``cost`` in place. Returns that added term (B, P), and
    per reference (B, K) the decoder's best phase (-1: no decoder, or not heard) and
    its log-probability."""
    M = sessions.model  # x was checked by inputs.decoder_inputs (public entry points)
    b = len(rows)
    added = sessions.dec_added[:b]
    added.fill(0.0)
    best, top = sessions.dec_best[:b], sessions.dec_top[:b]
    best.fill(-1)
    top.fill(-np.inf)
    state = sessions.dec[rows]  # (B, S) copy
    live = np.flatnonzero(read)
    if not live.size:
        return added, best, top
    n = len(live)
    used = heard[live]  # of the live rows
    out = live[used]
    for stack, slots, targets, refs, starts in zip(M.decoders, M.dec_slots,
                                                   M.dec_targets, M.dec_refs,
                                                   M.dec_starts, strict=True):
        old = state[live, slots].reshape(n, stack.k, stack.layers, stack.hidden)
        logp, new = stack.step(x[live], old)
        state[live, slots] = new.reshape(n, -1)
        logp = logp[used]
        if starts is not None:  # ensembles: one row of log-probabilities per reference
            logp = mean_log_probs(logp, starts)
        raw = logp
        if M.cfg.decoder_stickiness > 0:
            logp = _stick(sessions, rows[out], refs, logp)
        named = logp.argmax(axis=2)
        best[out[:, None], refs] = named
        # The named phase's own log-probability, without the stickiness bonus.
        top[out[:, None], refs] = np.take_along_axis(raw, named[..., None], axis=2)[..., 0]
        # Relative to the decoder's own best phase, -log(p / max p): the term shapes
        # the costs within a reference but adds no level of its own, so a decoder
        # that is confident on the wrong activity's stream cannot pull the activity
        # choice (which compares references' costs) towards it. The stickiness is in
        # the term (inertia for the tracker too, which the report follows: applied
        # to the named phase alone it gained under half as much, docs/changelog.md), so
        # the other phases of a reference cost at most decoder_weight x it more.
        rel = logp - logp.max(axis=2, keepdims=True)
        for i, (cols, phases) in enumerate(targets):
            added[out, cols] = -M.cfg.decoder_weight * rel[:, i, phases]
    sessions.dec[rows] = state
    if M.cfg.decoder_stickiness > 0:
        sessions.dec_last[rows[out]] = np.where(best[out] >= 0, best[out],
                                                sessions.dec_last[rows[out]])
    cost += added
    return added, best, top


def _stick(sessions: Sessions, rows: np.ndarray, refs: np.ndarray,
           logp: np.ndarray) -> np.ndarray:
    """``logp`` (B, K, P) of references ``refs`` for sessions ``rows``, with
    ``decoder_stickiness`` added to the phase each decoder named on its last frame."""
    last = sessions.dec_last[rows[:, None], refs]  # (B, K), -1: none yet
    b, k = np.nonzero(last >= 0)
    logp = logp.copy()
    logp[b, k, last[b, k]] += sessions.model.cfg.decoder_stickiness
    return logp


def report_position(sessions: Sessions, rows: np.ndarray, every: np.ndarray, ok: np.ndarray,
                    active: np.ndarray, shown: np.ndarray, best: np.ndarray | None,
                    top: np.ndarray | None) -> np.ndarray:
    """The reported position (B,): the tracker's (held on lost frames), moved to the
    nearest frame of the active reference's decoder's phase where that decoder is
    surer than ``decoder_phase_confidence`` of the phase next to the position's (a
    boundary the tracker has not caught up with; a phase further away is the
    relocaliser's to judge)."""
    M = sessions.model
    report = np.where(ok, shown, sessions.report[rows])
    if best is None or M.cfg.decoder_phase_confidence >= 1.0:
        return report
    phase = best[every, active]
    at = np.maximum(phase, 0)
    lo, hi = M.phase_lo[active, at], M.phase_hi[active, at]
    frame = np.rint(np.clip(report, 0, M.lengths[active] - 1)).astype(np.int64)
    next_to = np.abs(phase - M.phases[M.offsets[active] + frame]) == 1
    use = (ok & next_to & (top[every, active] > M.log_confidence) & (lo >= 0))
    report[use] = np.clip(report[use], lo[use], hi[use])
    return report

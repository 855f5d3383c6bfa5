"""One frame of many sessions, top to bottom: the per-frame path of the aligner.

``step`` takes one frame per session for B sessions (``rows`` of a ``Sessions`` store)
and runs, in order:

1. costs: ``c = 1 - cos(q, every reference frame)``, one matmul (B, d) x (d, P);
2. the phase-decoder term added to those costs (``decoder_term.decode``);
3. the speed meter and pause streak (``pause.pause``), the off-script streak;
4. the relocaliser over every reference (``relocaliser.relocalise``);
5. the activity choice (``activity.choose_activity``);
6. the tracker of the active reference: jump on a switch, start on the first frame,
   one online-DTW step where the frame says something about progress, and a jump to the
   relocaliser's choice when it has been clearly better for a while (``tracker.Tracker``);
7. similarity, state and confidence (``state``); the reported position
   (``decoder_term.report_position``); write back.

Every operation is over (B, ...) arrays: one step costs a fixed number of numpy calls,
whatever B is.
"""

from __future__ import annotations

import numpy as np

from masa_rt.align.activity import choose_activity
from masa_rt.align.decoder_term import decode, report_position
from masa_rt.align.estimate import EstimateBatch, read_estimates
from masa_rt.align.pause import pause
from masa_rt.align.relocaliser import relocalise
from masa_rt.align.sessions import Sessions
from masa_rt.align.state import confidence, decide_state
from masa_rt.align.tracker import Tracker


def step(sessions: Sessions, rows: np.ndarray, q: np.ndarray, ok: np.ndarray,
         t: np.ndarray, x: np.ndarray | None = None) -> EstimateBatch:
    """Step sessions ``rows`` (B,) (distinct slots) with unit embeddings ``q`` (B, d)
    float32 (zero rows where not ``ok``) at times ``t`` (B,); ``x`` (B, D) are the
    frames' model inputs, for the references' phase decoders.

    With decoders of lookahead L, the decoders read this frame and the aligner steps
    the frame L steps back: the estimates describe that frame (``Estimate.t`` is its
    time), and are ``waiting`` for a session's first L steps.
    """
    n = sessions.n
    read = heard = ok  # the frames the decoders read; where their output is used
    if sessions.model.lookahead:
        q, ok, t = _delay(sessions, rows, q, ok, t)
        # A decoder's output names the frame L *read* frames back: that is the frame
        # leaving the line only if the L frames since were all read.
        heard = read & sessions.dl_ok[rows].all(axis=1)
    if len(rows) < n:
        _frame(sessions, rows, rows, q, ok, t, x, read, heard)
    else:
        # Every session steps: go in slot order, so that the big rows are updated in
        # place (no gather/scatter of the (B, P) rows).
        if n > 1:
            order = np.empty(n, dtype=np.int64)
            order[rows] = np.arange(n)
            q, ok, t, read, heard = q[order], ok[order], t[order], read[order], heard[order]
            x = None if x is None else x[order]
        _frame(sessions, slice(0, n), np.arange(n), q, ok, t, x, read, heard)
    return read_estimates(sessions, rows)


def _delay(sessions: Sessions, rows: np.ndarray, q: np.ndarray, ok: np.ndarray,
           t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Push this step's frames into sessions ``rows``' lookahead delay lines; returns the
    frames that leave them, L steps old (not ``ok`` while a line fills after a reset). A
    ring: one (B, d) read and write per step, not a shift of the whole (B, L, d) line."""
    s = sessions
    head = s.dl_head[rows]
    out = s.dl_q[rows, head], s.dl_ok[rows, head], s.dl_t[rows, head]  # copies
    s.dl_q[rows, head], s.dl_ok[rows, head], s.dl_t[rows, head] = q, ok, t
    s.dl_head[rows] = (head + 1) % s.model.lookahead
    return out


def _frame(sessions: Sessions, sel: slice | np.ndarray, rows: np.ndarray, q: np.ndarray,
           ok: np.ndarray, t: np.ndarray, x: np.ndarray | None = None,
           read: np.ndarray | None = None, heard: np.ndarray | None = None) -> None:
    """The math of one frame. ``rows`` (B,) are the slots; ``sel`` selects the same rows
    (a slice when they are all of 0 .. n-1 in order). All (B,)-shaped unless noted.
    ``read``: which sessions' decoders read a frame ``x``; ``heard``: where their output
    describes the frame stepped (both default ``ok``; they differ with lookahead, where
    ``q``, ``ok``, ``t`` are the frame L steps back)."""
    M, cfg = sessions.model, sessions.model.cfg
    b = len(rows)
    every = np.arange(b)
    seen = sessions.seen[rows]

    # 1. Costs: one matmul against every reference frame. Pads get cos -inf, cost +inf.
    sims = np.matmul(q, M.embeddings.T, out=sessions.sims[:b])  # (B, P) float32
    sims[:, M.pad_cols] = -np.inf
    on_script = sims.max(axis=1) >= cfg.off_script_sim
    cost = np.subtract(1.0, sims, out=sims)  # (B, P) float32
    # 2. The phase decoders' term, added to the costs in place.
    decoded = dec_best = dec_top = None
    if M.decoders:
        decoded, dec_best, dec_top = decode(
            sessions, rows, ok if read is None else read, ok if heard is None else heard,
            x, cost)

    # 3. Pause (speed meter) and off-script streaks.
    active = sessions.active[rows]
    paused, still = pause(sessions, sel, rows, q, ok, t, active)
    off = sessions.off[rows]
    off = np.where(ok, np.where(on_script, 0, off + 1), off)

    # 4. Relocaliser over every reference; 5. the activity it scores.
    reloc, best, activity_cost = relocalise(sessions, sel, rows, cost, ok, seen)
    active, switch_streak, switched = choose_activity(
        cfg, activity_cost, active, sessions.switch_streak[rows], ok, seen)

    # 6. Tracker of the active reference: seed on a switch, start on the first frame,
    # track when the frame says something about progress, else hold.
    tr = Tracker(sessions, rows, active, reloc, cost)
    target = best[every, active] - tr.offset  # relocaliser's best, local frame
    tr.jump(np.flatnonzero(switched), target)
    tr.start(np.flatnonzero(ok & ~seen))
    # An unrelated or a still frame says nothing about progress: hold, do not drift.
    tr.track(np.flatnonzero(ok & seen & ~switched & on_script & ~paused))
    gap = tr.gap(np.flatnonzero(ok), target)
    # Jump to the relocaliser's choice once it has been clearly better for a while
    # (also while paused: the user may have moved while lost).
    asks = ok & on_script & ~switched
    far = np.abs(target - tr.pos) > cfg.relocalise_margin
    tr.streak = np.where(
        asks, np.where(far & (gap > cfg.relocalise_cost_margin), tr.streak + 1, 0),
        tr.streak)
    jumps = np.flatnonzero(asks & (tr.streak >= cfg.relocalise_patience))
    if jumps.size:
        tr.jump(jumps, target)
        gap[jumps] = tr.gap(jumps, target)[jumps]

    # 7. Similarity at the tracked frame (EMA), state and confidence.
    here = 1.0 - tr.take(cost, every, tr.offset + tr.pos).astype(np.float64)
    if decoded is not None:  # the similarity is the embedding's alone
        here += tr.take(decoded, every, tr.offset + tr.pos)
    sim = sessions.sim[rows]
    sim = np.where(ok, np.where(seen, 0.5 * (sim + here), here), sim)
    state = decide_state(cfg, ok, seen, paused, off, tr.pos, tr.length)
    conf = confidence(cfg, ok, sim, gap)

    # Write back (the reads above were copies).
    s = sessions
    s.seen[sel] = seen | ok
    s.active[sel], s.switch_streak[sel] = active, switch_streak
    s.still[sel], s.off[sel], s.sim[sel] = still, off, sim
    tr.store(sel)
    s.report[sel] = report_position(s, rows, every, ok, active, tr.shown, dec_best, dec_top)
    s.activity_cost[sel] = activity_cost
    s.last_state[sel], s.last_conf[sel], s.last_t[sel] = state, conf, t

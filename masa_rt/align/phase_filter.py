"""A phase filter: which phase the user is in, as an online hidden Markov model over the
reference's phases, needing no training (references without a phase decoder).

The tracker follows one reference *frame* and takes bounded steps along one timeline, so
a user whose timing differs from the demo's reaches a phase boundary late. The filter
reasons about *phases* instead, for each session and reference:

* emission: ``log e_p = max_{n in phase p} [cos(q, x_n) + w cos(m, m_n)] / tau``, the
  frame's best match among the demos' frames x_n of phase p (all K demos a reference was
  built from, not only the averaged timeline), where ``m`` is the frame's direction of
  motion over the last ``lag`` frames and ``m_n`` the exemplar's within its demo
  (``reference.motion_directions``): the same pose on the way down and on the way up
  differs in ``m``;
* transitions: stay, or advance to the next phase with probability ``advance / d_p``
  (``d_p``: the phase's mean length in the demos, model frames), with small chances to
  skip one phase, to go back one, and to jump anywhere (a user who redoes a step, or
  joins mid-way);
* the forward recursion ``alpha_t = (alpha_{t-1} A) * e_t``, in logs, normalised.

Its most probable phase moves the *reported* position into that phase (the nearest frame
of it on the reference's timeline) where the tracker is elsewhere; the tracker itself is
untouched. Measured with ``masa-rt score`` (docs/results.md); parameters chosen on the
Penn Action train split (``phase_filter_*`` in :class:`~masa_rt.align.config.AlignerConfig`).
"""

from __future__ import annotations

import numpy as np

from masa_rt.align.compiled import CompiledReferences
from masa_rt.align.config import AlignerConfig
from masa_rt.align.estimate import EstimateBatch, read_estimates
from masa_rt.align.reference import Reference, motion_units
from masa_rt.align.sessions import Sessions
from masa_rt.align.state import TRACKING

NEG = -1e30  # log 0 that stays finite under addition
# Exemplars kept per phase and reference: the (B, d) x (d, N) product is most of the
# filter's cost (K=5 Penn references: 1,913 frames for 7 actions doubled the step);
# neighbouring frames are near duplicates, so an even subsample loses little.
MAX_EXEMPLARS = 64


class PhaseModel:
    """The filter's fixed part for a set of references: exemplars sorted by (reference,
    phase), so one matmul and one ``maximum.reduceat`` give every phase's emission, and
    each reference's log transition matrix, padded to the most phases of any."""

    def __init__(self, refs: list[Reference], tau: float, advance: float, back: float,
                 skip: float, jump: float, motion: float = 0.0, lag: int = 1) -> None:
        self.tau, self.motion, self.lag = tau, motion, lag
        self.phases = max(len(r.phase_names) for r in refs)
        blocks, moves, starts, owner = [], [], [], []
        for i, ref in enumerate(refs):
            emb, ph = ref.exemplars()
            mov = ref.exemplar_motion(lag)
            for p in range(len(ref.phase_names)):
                rows, mrows = emb[ph == p], mov[ph == p]
                if len(rows) == 0:  # a phase no demo shows: never the likeliest
                    rows = mrows = np.zeros((1, emb.shape[1]), np.float32)
                if len(rows) > MAX_EXEMPLARS:  # evenly spaced: the product is the cost
                    keep = np.linspace(0, len(rows) - 1, MAX_EXEMPLARS).astype(int)
                    rows, mrows = rows[keep], mrows[keep]
                starts.append(sum(len(b) for b in blocks))
                blocks.append(rows)
                moves.append(mrows)
                owner.append((i, p))
        self.exemplars = np.concatenate(blocks).astype(np.float32)  # (N, d) unit rows
        # (N, d) their directions of motion, weighted: one product gives both terms' sum
        self.motions = (motion * np.concatenate(moves)).astype(np.float32)
        self.starts = np.array(starts, dtype=np.int64)
        self.ref_of = np.array([i for i, _ in owner])
        self.phase_of = np.array([p for _, p in owner])
        self.log_a = np.stack([_transitions(r, self.phases, advance, back, skip, jump)
                               for r in refs])  # (R, P, P)
        self.a = np.exp(self.log_a)  # the same, linear (0 where log_a is NEG)
        self.valid = np.stack([np.arange(self.phases) < len(r.phase_names) for r in refs])

    def emission(self, q: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
        """(B, R, P) log emissions of unit embeddings ``q`` (B, d) moving in unit
        directions ``m`` (B, d; None or zero rows: no motion term); NEG on padding."""
        sims = q @ self.exemplars.T  # (B, N)
        if m is not None and self.motion > 0:
            sims += m @ self.motions.T
        best = np.maximum.reduceat(sims, self.starts, axis=1)  # (B, groups)
        out = np.full((len(q), len(self.log_a), self.phases), NEG, dtype=np.float64)
        out[:, self.ref_of, self.phase_of] = best / self.tau
        return out


def _transitions(ref: Reference, width: int, advance: float, back: float, skip: float,
                 jump: float) -> np.ndarray:
    """Log transition matrix (width, width) of one reference's phases (rows: from)."""
    n = len(ref.phase_names)
    length = np.maximum(ref.phase_lengths(), 1.0)
    a = np.zeros((width, width))
    for p in range(n):
        move = min(advance / length[p], 0.9) if p + 1 < n else 0.0
        a[p, p] = 1.0 - move
        if p + 1 < n:
            a[p, p + 1] = move
        if p + 2 < n:
            a[p, p + 2] = skip
        if p > 0:
            a[p, p - 1] = back
        a[p, :n] += jump / n
        a[p, :n] /= a[p, :n].sum()
    with np.errstate(divide="ignore"):
        return np.where(a > 0, np.log(a), NEG)


class PhaseFilter:
    """Per-session forward state (slots of a ``Sessions`` store) and its update."""

    def __init__(self, model: PhaseModel, capacity: int, start_prior: float) -> None:
        self.model, self.start_prior = model, start_prior
        self.alpha = np.zeros((0, len(model.log_a), model.phases))
        # The motion term's memory: each session's last ``lag`` frames (a ring; slot
        # ``count % lag`` is the oldest once full) and how many it has seen.
        self.recent = np.zeros((0, model.lag, model.exemplars.shape[1]), np.float32)
        self.count = np.zeros(0, np.int64)
        self.grow(capacity)

    def initial(self) -> np.ndarray:
        """(R, P): the first phase likeliest, the others ``start_prior`` nats behind."""
        a = np.full((len(self.model.log_a), self.model.phases), -self.start_prior)
        a[:, 0] = 0.0
        return np.where(self.model.valid, a, NEG)

    def grow(self, capacity: int) -> None:
        if capacity > len(self.alpha):
            more = capacity - len(self.alpha)
            extra = np.broadcast_to(self.initial(), (more, *self.initial().shape))
            self.alpha = np.concatenate([self.alpha, extra])
            self.recent = np.concatenate([self.recent, np.zeros((more, *self.recent.shape[1:]),
                                                                np.float32)])
            self.count = np.concatenate([self.count, np.zeros(more, np.int64)])

    def reset(self, slots: np.ndarray) -> None:
        self.alpha[slots] = self.initial()
        self.count[slots] = 0

    def move(self, src: int, dst: int) -> None:
        """Slot ``src`` now lives in ``dst`` (the store's swap-remove)."""
        self.alpha[dst] = self.alpha[src]
        self.recent[dst], self.count[dst] = self.recent[src], self.count[src]

    def _motion(self, slots: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Directions of motion of frames ``q`` (B, d) of sessions ``slots`` over the last
        ``lag`` frames (their first frame until they have that many, as
        ``motion_directions`` reads a demo), and remember the frames."""
        lag = self.model.lag
        count = self.count[slots]
        oldest = self.recent[slots, np.where(count >= lag, count % lag, 0)]  # (B, d)
        # a session's first frame has no motion (its ring holds an earlier session's)
        m = motion_units(np.where((count > 0)[:, None], q - oldest, 0.0))
        self.recent[slots, count % lag] = q
        self.count[slots] = count + 1
        return m

    def step(self, slots: np.ndarray, q: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Advance sessions ``slots`` (B,) by one frame ``q`` (B, d) where ``ok``; returns
        (B, R) each reference's likeliest phase now."""
        alpha = self.alpha[slots]  # (B, R, P)
        if ok.any():
            i = np.flatnonzero(ok)
            m = self._motion(slots[i], q[i]) if self.model.motion > 0 else None
            prior = _logmatvec(alpha[i], self.model.a)
            post = prior + self.model.emission(q[i], m)
            alpha[i] = post - post.max(axis=2, keepdims=True)
            self.alpha[slots] = alpha
        return alpha.argmax(axis=2)


def _logmatvec(alpha: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``log sum_i exp(alpha[b, r, i]) a[r, i, j]`` (B, R, P), NEG where it is 0.

    ``alpha`` must be normalised (each (b, r) row's maximum 0, as the filter keeps it):
    then ``exp(alpha)`` lies in [0, 1] and the sum is a plain matrix product, with no
    overflow and no max-shift (the log-space form built a (B, R, P, P) array: 150 us per
    step for 256 sessions and one reference, 880 for seven; this 9 and 37). A reachable
    phase keeps at least ``a`` of the likeliest one, ``jump / P`` or more: no underflow.
    """
    e = np.exp(alpha)
    if len(alpha) < 16:  # few sessions: one einsum beats a loop over the references
        out = np.einsum("brp,rpq->brq", e, a)
    else:
        out = np.empty_like(e)
        for r in range(a.shape[0]):
            np.matmul(e[:, r], a[r], out=out[:, r])
    with np.errstate(divide="ignore"):
        np.log(out, out=out)
    return np.maximum(out, NEG, out=out)


def move_into_phase(report: np.ndarray, phase: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> np.ndarray:
    """The reported positions (B,) moved to the nearest frame of ``phase`` on the
    timeline, whose frames run ``lo .. hi`` (-1: the timeline lacks that phase)."""
    out = report.copy()
    has = (lo >= 0) & (phase >= 0)
    out[has] = np.clip(report[has], lo[has], hi[has])
    return out


def phase_filter_for(model: CompiledReferences, capacity: int) -> PhaseFilter | None:
    """The phase filter of an aligner over ``model`` for
    ``capacity`` sessions, or None where it does not run (see :func:`phase_model_for`)."""
    phases = phase_model_for(model.refs, model.cfg, bool(model.decoders))
    return None if phases is None else PhaseFilter(phases, capacity,
                                                   model.cfg.phase_filter_start_prior)


def phase_model_for(refs: list[Reference], cfg: AlignerConfig,
                    has_decoders: bool) -> PhaseModel | None:
    """The filter's model where the config asks for it and no reference has a phase
    decoder (a decoder already places the reported phase), else None."""
    if not cfg.phase_filter or has_decoders:
        return None
    return PhaseModel(refs, cfg.phase_filter_tau, cfg.phase_filter_advance,
                      cfg.phase_filter_back, cfg.phase_filter_skip, cfg.phase_filter_jump,
                      cfg.phase_filter_motion, cfg.phase_filter_motion_lag)


def filtered(sessions: Sessions, filt: PhaseFilter, rows: np.ndarray, q: np.ndarray,
             ok: np.ndarray, estimates: EstimateBatch) -> EstimateBatch:
    """After the aligner's step of sessions ``rows`` (its ``estimates``): advance their
    filters with the frames ``q`` and move each reported position into its filter's
    likeliest phase of the active reference. The estimates are read again only where a
    position moved (at phase boundaries the tracker has not reached; most frames none)."""
    M = sessions.model
    active = sessions.active[rows]
    phase = filt.step(rows, q, ok)[np.arange(len(rows)), active]
    report = sessions.report[rows]
    moved = move_into_phase(report, phase, M.phase_lo[active, phase],
                            M.phase_hi[active, phase])
    # Only while tracking a frame like the references (its off-script streak is 0): a
    # paused, lost or off-script session holds its position, as the tracker does.
    live = ok & (sessions.last_state[rows] == TRACKING) & (sessions.off[rows] == 0)
    if not (live & (moved != report)).any():
        return estimates
    sessions.report[rows] = np.where(live, moved, report)
    return read_estimates(sessions, rows)

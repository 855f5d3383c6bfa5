"""The references and config compiled into read-only arrays, shared by every session of an
aligner or bank: all references' frames side by side as the columns of one row, the
tracker's move penalties, the relocaliser's forgetting factor, the phase decoders stacked
by shape (docs/aligner.md, "Implementation: one batched code path")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from masa_rt.align import kernels
from masa_rt.align.config import AlignerConfig
from masa_rt.align.pause import window_speed
from masa_rt.align.reference import Reference
from masa_rt.phase_decoder import DecoderEnsemble, DecoderStack


def checked_references(references: Reference | Sequence[Reference]) -> list[Reference]:
    refs = [references] if isinstance(references, Reference) else list(references)
    if not refs:
        raise ValueError("Aligner: expected at least one reference, found none")
    if len({r.dim for r in refs}) > 1:
        raise ValueError("Aligner: references have different embedding sizes "
                         f"{sorted({r.dim for r in refs})}")
    prints = {r.model_fingerprint for r in refs if r.model_fingerprint}
    if len(prints) > 1:
        raise ValueError(f"Aligner: references come from different models {sorted(prints)}")
    return refs


class CompiledReferences:
    """The references and config compiled into read-only arrays, shared by all sessions.

    Every reference frame gets a *column* in one row of ``P`` columns, each reference
    preceded by ``pad`` columns and the last one followed by ``tail`` columns::

        [pad | ref 0 (T_0 frames) | pad | ref 1 (T_1) | ... | ref K-1 | tail]

    Pad columns cost +inf, so the relocaliser's shifted minima, the tracker's window and the
    gap's neighbourhood never reach across references: one pass covers all references.
    """

    def __init__(self, refs: list[Reference], cfg: AlignerConfig) -> None:
        self.refs, self.cfg = refs, cfg
        self.n_refs = len(refs)
        self.dim = refs[0].dim
        self.width = cfg.back + cfg.band + 1  # W: cells of the tracker's window, at most
        self.pad = max(cfg.max_step, cfg.back)
        tail = max(self.pad, self.width)
        self.lengths = np.array([len(r) for r in refs], dtype=np.int64)  # (K,) T_k
        self.offsets = self.pad + np.concatenate(  # (K,) column of each reference's frame 0
            [[0], np.cumsum(self.lengths + self.pad)[:-1]]).astype(np.int64)
        self.cols = int(self.offsets[-1] + self.lengths[-1] + tail)  # P
        emb = np.zeros((self.cols, self.dim), dtype=np.float32)  # (P, d), zero rows on pads
        is_pad = np.ones(self.cols, dtype=bool)
        # Per column (P,): phase id, and first/last frame of its run (local frame indices).
        self.phases = np.zeros(self.cols, dtype=np.int64)
        self.run_start = np.zeros(self.cols, dtype=np.int64)
        self.run_end = np.zeros(self.cols, dtype=np.int64)
        for r, o in zip(refs, self.offsets.tolist(), strict=True):
            cols = slice(o, o + len(r))
            emb[cols], is_pad[cols] = r.embeddings, False
            self.phases[cols], self.run_start[cols], self.run_end[cols] = (
                r.phases, r.run_start, r.run_end)
        self.embeddings = emb
        self.pad_cols = np.flatnonzero(is_pad)
        self.ref_cols = [slice(o, o + n) for o, n in
                         zip(self.offsets.tolist(), self.lengths.tolist(), strict=True)]
        self.phase_names = [r.phase_names for r in refs]
        self.activities = [r.activity for r in refs]
        # Pause: each reference's median speed, and its frame period (K,).
        self.ref_speed = np.array(
            [window_speed(r.embeddings, r.fps, cfg.pause_lag) for r in refs])
        self.frame_dt = np.array([1.0 / r.fps for r in refs])
        # Speed meter: frames go round a ring of 2*lag slots; with the newest frame in slot
        # s, row s of these weights gives (time of the recent half - time of the older
        # half) / lag, i.e. the time between the two means.
        lag = cfg.pause_lag
        halves = np.concatenate([np.full(lag, -1.0 / lag), np.full(lag, 1.0 / lag)])
        self.meter_weights = np.stack([np.roll(halves, s + 1) for s in range(2 * lag)])
        # Tracker predecessors of cell i: i - k for k = max_step .. -back, in window order.
        ks = np.arange(cfg.max_step, -cfg.back - 1, -1)
        self.penalty = np.select(  # (max_step + back + 1,)
            [ks < 0, ks == 0, ks >= 2],
            [cfg.back_penalty * -ks, np.full(ks.shape, cfg.stay_penalty),
             cfg.skip_penalty * (ks - 1)], 0.0)
        # Relocaliser: R(j) = c(j) + lam * min(R(j) + stay, R(j-1), ..., R(j-max_step)), a
        # sum over an exponential window (~relocalise_memory frames). The stay penalty is
        # divided by lam so it weighs like a cost; skips are free: it is a detector.
        self.lam = 1.0 - 1.0 / cfg.relocalise_memory
        self.reloc_stay = cfg.stay_penalty / self.lam
        self._compile_decoders(refs, cfg)
        # The dynamic programs compiled with numba (None: their numpy code runs). Loaded
        # here, when an aligner or the serving pipeline is built, not on a first frame.
        self.kernels = kernels.load()

    def _compile_decoders(self, refs: list[Reference], cfg: AlignerConfig) -> None:
        """Phase decoders of one shape form one ``DecoderStack``, stepped in one pass.

        Group g's recurrent state is columns ``dec_slots[g]`` of a session's flat decoder
        state (its (K_g, L, H) block); ``dec_targets[g][i]`` is the column range of the
        group's i-th reference and the phase of each of its frames, where that decoder's
        log-probabilities go. (Column ranges, not one index array: assigning a (B, frames)
        block through two index arrays took 25x as long.) An ensemble's members are
        consecutive decoders of the stack; ``dec_starts[g]`` is the first of each
        reference's (None where every reference of the group has one decoder).
        """
        with_dec = [(k, r.decoder) for k, r in enumerate(refs)
                    if r.decoder is not None and cfg.decoder_weight > 0]
        dims = {d.input_dim for _, d in with_dec}
        if len(dims) > 1:
            raise ValueError(f"Aligner: the references' phase decoders take different "
                             f"inputs (dims {sorted(dims)}); build them with one model")
        self.input_dim = dims.pop() if dims else 0
        lookaheads = {d.lookahead for _, d in with_dec}
        if len(lookaheads) > 1:
            raise ValueError(f"Aligner: the references' phase decoders have different "
                             f"lookaheads {sorted(lookaheads)} (frames); build them with one "
                             "--decoder-lookahead")
        self.lookahead = lookaheads.pop() if lookaheads else 0
        groups: dict[tuple[int, int], list[tuple[int, DecoderEnsemble]]] = {}
        for k, d in with_dec:
            groups.setdefault((d.hidden, d.layers), []).append((k, d))
        self.decoders: list[DecoderStack] = []
        self.dec_slots: list[slice] = []
        self.dec_targets: list[list[tuple[slice, np.ndarray]]] = []
        self.dec_refs: list[np.ndarray] = []  # group g's references, in its order
        self.dec_starts: list[np.ndarray | None] = []
        start = 0
        for members in groups.values():
            stack = DecoderStack([m for _, d in members for m in d.members])
            self.decoders.append(stack)
            self.dec_slots.append(slice(start, start + stack.k * stack.layers * stack.hidden))
            self.dec_targets.append([(self.ref_cols[k], self.phases[self.ref_cols[k]])
                                     for k, _ in members])
            self.dec_refs.append(np.array([k for k, _ in members], dtype=np.int64))
            sizes = [d.size for _, d in members]
            self.dec_starts.append(np.cumsum([0, *sizes[:-1]]) if max(sizes) > 1 else None)
            start = self.dec_slots[-1].stop
        self.dec_size = max(start, 1)
        # First and last local frame of each (reference, phase) that is one run of frames;
        # -1 where the phase is absent or comes back (no single range to report into).
        p_max = max(len(r.phase_names) for r in refs)
        self.phase_lo = np.full((len(refs), p_max), -1, dtype=np.int64)
        self.phase_hi = np.full((len(refs), p_max), -1, dtype=np.int64)
        for k, r in enumerate(refs):
            b = r.phase_bounds
            one_run = (b[:, 0] >= 0) & (r.run_end[np.maximum(b[:, 0], 0)] == b[:, 1])
            self.phase_lo[k, :len(b)] = np.where(one_run, b[:, 0], -1)
            self.phase_hi[k, :len(b)] = np.where(one_run, b[:, 1], -1)
        # decoder_phase_confidence as a log-probability (the decoders give log-softmax).
        self.log_confidence = (math.log(cfg.decoder_phase_confidence)
                               if cfg.decoder_phase_confidence > 0 else -math.inf)



class OverReferences:
    """What an aligner over compiled references (``self._model``) tells of them; shared by
    :class:`~masa_rt.align.aligner.Aligner` and :class:`~masa_rt.align.bank.AlignerBank`."""

    _model: CompiledReferences

    @property
    def references(self) -> list[Reference]:
        return self._model.refs

    @property
    def config(self) -> AlignerConfig:
        return self._model.cfg

    @property
    def lookahead(self) -> int:
        """Steps each estimate lags the newest frame: the phase decoders' lookahead (0:
        every estimate describes the frame just given)."""
        return self._model.lookahead

"""The engine's per-frame work for many sessions: resample, encode in one batch, align.

``submit`` only queues a capture frame. ``step`` drains the queues in *rounds*: each round
takes the oldest pending capture frame of every session, turns it into model frames
(``engine.streams``), encodes every session's next model frame in ONE backend call, and
steps the sessions' aligner banks (one vectorised call per bank). Frames of one session are
therefore always processed in order, and a server that fell behind catches up with batched
calls, not one per frame.

Every submitted capture frame gets exactly one answer: the estimate after its model frames
(a 90 Hz headset on a 30 Hz model gets the current estimate repeated for the two frames
that complete no model frame), so clients see one reply per frame and latency is measured
per frame. A model frame whose joints are all missing (tracking lost) is not encoded; the
aligner gets ``valid=False`` and holds its position.

Batched admission (the default; ``MASA_RT_BATCHED_ADMISSION=0`` or ``batched=False`` turns
it off): a round resamples every admitted session's capture frame in one
``StreamBank.push_many`` call and encodes and aligns the round's model frames as arrays,
so a round of B sessions costs a fixed number of numpy calls plus a few list
comprehensions, not B trips through ``StreamBank.push``. Rare cases (a first frame, a
stale stamp, a gap, a cap, a capture frame making several model frames, the ``tap``)
take the per-session code for those sessions or that round. Answers, their order and the
counters are bit for bit those of the per-session code (tests/test_batched_admission.py).

No torch here: this module is on the serving path.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import Backend, CapacityError, get_backend, read_model_info
from engine.streams import ModelFrame, PushedBatch, StreamBank
from masa_rt.align import AlignerBank, AlignerConfig, Estimate, Reference
from masa_rt.layout_file import hello_layout
from masa_rt.preprocess import InputSpec
from masa_rt.protocol import MAX_JOINTS, ProtocolError
from masa_rt.skeleton import (
    UnknownLayoutError,
    UnsupportedConversionError,
    apply_map,
    conversion_map,
    get_layout,
)

__all__ = ["Pipeline", "ReferenceMismatchError", "Result"]

log = logging.getLogger(__name__)

# (session, seq, capture t, estimate). The capture t travels in the tuple, not in a copy of
# the estimate: a 90 Hz stream on a 30 Hz model is answered with the same estimate object
# for the frames that complete no model frame (its own ``t`` is the model frame's).
Result = tuple[str, int, float, Estimate]

BATCHED_ADMISSION_ENV = "MASA_RT_BATCHED_ADMISSION"  # "0": the per-session path (A/B)


def batched_admission_default() -> bool:
    """Batched admission unless ``MASA_RT_BATCHED_ADMISSION`` is 0 / false / no / off."""
    return os.environ.get(BATCHED_ADMISSION_ENV, "1").strip().lower() not in (
        "0", "false", "no", "off")


class ReferenceMismatchError(ValueError):
    """A reference embedded by a different model than the one being served."""


@dataclass
class _Session:
    bank: AlignerBank  # the aligner bank of its reference choice (one batched step for all)
    last: Estimate  # its latest estimate, answered for capture frames off the model grid
    queue: deque[tuple[int, float, np.ndarray]] = field(default_factory=deque)
    # Model frames of the current capture frame: ModelFrames, or (batched admission) ints,
    # rows of the pipeline's ``_made`` frames, each consumed by the round after its admission.
    frames: deque[ModelFrame | int] = field(default_factory=deque)
    current: tuple[int, float] | None = None  # (seq, t) of the capture frame being processed
    convert: np.ndarray | None = None  # the client's layout -> the model's (joint map)


class Pipeline:
    """Sessions -> batched encoder -> one aligner per session (see module docstring)."""

    def __init__(self, backend: Backend, spec: InputSpec, references: Sequence[Reference],
                 aligner_config: AlignerConfig | None = None, *, model_name: str = "",
                 window: int = 0, batched: bool | None = None):
        if not references:
            raise ValueError("Pipeline: expected at least one reference")
        self.backend, self.spec = backend, spec
        self.bank = StreamBank(backend, spec)
        self.references = {r.activity: r for r in references}
        if len(self.references) != len(references):
            raise ValueError("Pipeline: two references for the same activity")
        config = aligner_config or AlignerConfig.for_references(references)
        # One bank per reference choice: sessions that named an activity align to it alone,
        # the others to all references (activity identification). Each bank steps all of
        # its sessions in one vectorised call.
        self._banks = {name: AlignerBank([r], config) for name, r in self.references.items()}
        self._bank_all = AlignerBank(list(references), config)  # refuses mixed lookaheads
        # Phase decoders with lookahead L: every answer describes the model frame L frames
        # before the newest (Estimate.t is its time).
        self.lookahead = self._bank_all.lookahead
        if self.lookahead:
            log.info("event=lookahead frames=%d seconds=%.3f (each estimate describes the "
                     "user that long ago)", self.lookahead, self.lookahead / spec.fps)
        self.model_name, self.window = model_name, window
        self._no_embedding = np.zeros(references[0].dim, np.float32)  # lost frames (held)
        self._no_input = np.zeros(spec.input_dim, np.float32)
        for r in references:
            if r.dim != backend.embed_dim:
                raise ReferenceMismatchError(
                    f"Pipeline: reference {r.name}'s embeddings are {r.dim} wide, the model's "
                    f"are {backend.embed_dim}: rebuild it with masa-rt reference build")
            if r.decoder is not None and r.decoder.input_dim != spec.input_dim:
                raise ValueError(f"Pipeline: reference {r.name}'s phase decoder reads inputs "
                                 f"of size {r.decoder.input_dim}, the model's are "
                                 f"{spec.input_dim}: rebuild it with masa-rt reference build")
        self._sessions: dict[str, _Session] = {}
        # Batched admission (module docstring); None: MASA_RT_BATCHED_ADMISSION decides.
        self.batched = batched_admission_default() if batched is None else bool(batched)
        self.batch_min = 8  # fewer sessions in a wave or round: the per-session code is faster
        self._made: list[PushedBatch] = []  # model frames admitted in batches, not yet encoded
        self._made_rows = 0  # their count: the next batch's rows are numbered from here
        # Optional observer of every model frame: (session, frame, input row, embedding;
        # the last two None for a lost frame). ``masa-rt score`` records the served
        # encoder's embeddings with it to run its baselines on the very same frames.
        self.tap: Callable[[str, ModelFrame, np.ndarray | None, np.ndarray | None],
                           None] | None = None

    @property
    def _batchable(self) -> bool:
        return self.batched and self.spec.uses_joints and not self.spec.feature_dim

    # -- construction from files ----------------------------------------------------------

    @classmethod
    def from_files(cls, model_path: str | Path, reference_paths: Sequence[str | Path],
                   backend: str = "onnxruntime", *, capacity: int = 256,
                   aligner_config: AlignerConfig | None = None, **backend_opts: Any) -> Pipeline:
        """Load the ONNX step model and references; refuse references of another model."""
        info = read_model_info(model_path)
        refs = [Reference.load(p) for p in reference_paths]
        for path, ref in zip(reference_paths, refs, strict=True):
            if ref.model_fingerprint != info.fingerprint:
                raise ReferenceMismatchError(
                    f"reference {path} was built with model {ref.model_fingerprint or '?'}, "
                    f"server runs model {info.fingerprint}: rebuild it with "
                    f"masa-rt reference build")
        engine = get_backend(backend, model_path, capacity, **backend_opts)
        return cls(engine, InputSpec.from_dict(info.input_spec), refs, aligner_config,
                   model_name=info.fingerprint, window=info.window)

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, session_id: str, layout: str, fps: float,
                     reference: str | None = None, declaration: dict | None = None) -> dict:
        """Start a session; returns what a ``welcome`` needs. Refusals are ProtocolErrors
        with the reason the client can switch on (wrong_layout, unknown_reference, ...).
        ``declaration``: the hello's declaration of a layout this server may not know
        (``masa_rt.layout_file``)."""
        if declaration is not None:
            lay, convert = self._declared_conversion(layout, declaration)
        else:
            lay, convert = None, self._conversion(layout)
        if reference is not None and reference not in self.references:
            raise ProtocolError("unknown_reference", f"{reference!r}; loaded: "
                                                     f"{sorted(self.references)}")
        if not fps > 0:
            raise ProtocolError("malformed", f"fps must be > 0, found {fps}")
        if session_id in self._sessions:
            self.close_session(session_id)  # a hello for a live session restarts it
        try:
            self.bank.open(session_id)
        except CapacityError as exc:
            raise ProtocolError("overloaded", str(exc)) from None
        bank = self._banks[reference] if reference else self._bank_all
        bank.add(session_id)
        self._sessions[session_id] = _Session(bank, bank.last(session_id), convert=convert)
        lay = lay or get_layout(layout)
        return {"shape": (lay.num_joints, lay.dims), "model": self.model_name,
                "references": [reference] if reference else sorted(self.references),
                "window": self.window, "model_fps": self.spec.fps,
                "lookahead_s": bank.lookahead / self.spec.fps,
                **({"model_layout": self.spec.layout} if convert is not None else {})}

    def _conversion(self, layout: str) -> np.ndarray | None:
        """None for the model's own layout; else the joint map from ``layout`` to it (a
        headset's OpenXR hands to the hand model, a COCO-17 detector to the body model),
        or a wrong_layout refusal where no mapping exists."""
        if layout == self.spec.layout:
            return None
        try:
            return conversion_map(layout, self.spec.layout)
        except (UnknownLayoutError, UnsupportedConversionError) as exc:
            raise ProtocolError("wrong_layout", f"{layout!r}: this model reads "
                                                f"{self.spec.layout!r} and {layout!r} does "
                                                f"not convert to it ({exc})") from None

    def _declared_conversion(self, layout: str, declaration: dict
                             ) -> tuple[Any, np.ndarray | None]:
        """(the declared Layout, its joint map to the model's layout or None) for a hello
        that declares its layout; a wrong_layout refusal when the model cannot read it.
        Nothing is registered: one client's declaration never changes another's session."""
        try:
            return hello_layout(layout, declaration, self.spec.layout, MAX_JOINTS)
        except ValueError as exc:
            raise ProtocolError("wrong_layout", str(exc)) from None

    def close_session(self, session_id: str) -> None:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            s.bank.remove(session_id)
            self.bank.close(session_id)

    def close(self) -> None:
        """Free the backend's device resources (TensorRT); the pipeline is done."""
        self.bank.backend.close()

    def reset_session(self, session_id: str) -> None:
        """Forget the session's history (encoder window, resampling grid, alignment)."""
        s = self._session(session_id)
        s.queue.clear()
        s.frames.clear()
        s.current = None
        s.bank.reset(session_id)
        s.last = s.bank.last(session_id)
        self.bank.reset(session_id)

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise ProtocolError("unknown_session", session_id) from None

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    # -- frames -----------------------------------------------------------------------------

    def submit(self, session_id: str, seq: int, t: float, joints: np.ndarray) -> None:
        """Queue one capture frame (J, C) in the session's layout (converted to the
        model's here); nothing runs until :meth:`step`."""
        s = self._session(session_id)
        if s.convert is not None:
            joints = apply_map(joints, s.convert)
        s.queue.append((int(seq), float(t), joints))

    def pending(self) -> int:
        return sum(len(s.queue) + (s.current is not None) for s in self._sessions.values())

    def step(self, max_rounds: int | None = None) -> list[Result]:
        """Process queued frames, in rounds of one batched encoder call each.

        ``max_rounds=None`` processes every queued frame. With ``max_rounds=k`` the call
        returns after k rounds (or, if nothing was answered yet, after the first round
        that answers something); the rest stays queued for the next call. The server steps
        one round per loop: a session with a backlog (a burst, a flood within its rate
        budget) is then worked off one frame per loop, between socket drains, instead of
        holding every other session's answer until its whole backlog is encoded
        (benchmarks/fuzz_server.py measured 40+ ms stalls from that).
        """
        results: list[Result] = []
        rounds = 0
        while True:
            results.extend(self._admit_next_frames())
            if max_rounds is not None and rounds >= max_rounds and results:
                return results
            batch = [sid for sid, s in self._sessions.items() if s.frames]
            if not batch:
                return results
            self._encode_and_align(batch)
            results.extend(self._finish_frames())
            rounds += 1

    def _admit_next_frames(self) -> list[Result]:
        """Sessions with no model frame in hand resample their next capture frames; one that
        completes no model frame (off the model-rate grid) is answered at once."""
        if self._batchable and len(self._sessions) >= self.batch_min:
            return self._admit_batched()
        answered = []
        for sid, s in self._sessions.items():
            while not s.frames and s.queue:
                seq, t, joints = s.queue.popleft()
                s.frames.extend(self.bank.push(sid, joints, t, seq=seq))
                if s.frames:
                    s.current = (seq, t)
                else:
                    answered.append((sid, seq, t, s.last))
        return answered

    def _admit_batched(self) -> list[Result]:
        """:meth:`_admit_next_frames` in waves: each wave resamples one capture frame of every
        session still without a model frame in ONE ``StreamBank.push_many`` call. Answers
        in the per-session order (by session, then by frame)."""
        wave = [(pos, sid, s) for pos, (sid, s) in enumerate(self._sessions.items())
                if not s.frames and s.queue]
        answered: list[tuple[int, Result]] = []
        waves = 0
        while wave:
            waves += 1
            seqs, times, joints = zip(*[s.queue.popleft() for _, _, s in wave], strict=True)
            sids = [sid for _, sid, _ in wave]
            pushed = (self.bank.push_many(sids, joints, times, seqs)
                      if len(wave) >= self.batch_min else None)
            if pushed is None:  # a few sessions, or frames of different shapes: one by one
                made, scalar = [-1] * len(wave), {
                    r: self.bank.push(sid, joints[r], times[r], seq=seqs[r])
                    for r, sid in enumerate(sids)}
            else:
                made, scalar = pushed.made, pushed.scalar
                if len(pushed.times):
                    base = self._made_rows
                    self._made.append(pushed)
                    self._made_rows += len(pushed.times)
                    if base:
                        made = [m + base if m >= 0 else -1 for m in made]
            nxt = []
            for r, ((pos, sid, s), m, seq, t) in enumerate(
                    zip(wave, made, seqs, times, strict=True)):
                if m >= 0:
                    s.frames.append(m)
                    s.current = (seq, t)
                    continue
                frames = scalar.get(r)
                if frames:
                    s.frames.extend(frames)
                    s.current = (seq, t)
                    continue
                answered.append((pos, (sid, seq, t, s.last)))
                if s.queue:
                    nxt.append((pos, sid, s))
            wave = nxt
        if waves > 1:
            answered.sort(key=lambda a: a[0])  # stable: a session's frames stay in order
        return [a for _, a in answered]

    def _encode_and_align(self, sids: list[str]) -> None:
        """Each listed session's next model frame: ONE backend call, then its aligner."""
        sessions = [self._sessions[sid] for sid in sids]
        items = [s.frames.popleft() for s in sessions]
        made, self._made, self._made_rows = self._made, [], 0  # all of its rows are in items
        if self.tap is None and (made or (len(items) >= self.batch_min and self._batchable)):
            arrays = _round_arrays(items, made)
            if arrays is not None:
                self._encode_rows(sids, sessions, *arrays)
                return
        if made:
            items = [_made_frame(made, p) if type(p) is int else p for p in items]
        frames = dict(zip(sids, items, strict=True))
        live = [sid for sid in sids if not frames[sid].lost]
        x = self.bank.features([frames[sid] for sid in live])
        embeddings = self.bank.step(list(zip(live, x, strict=True)))
        rows = dict(zip(live, embeddings, strict=True))
        inputs = dict(zip(live, x, strict=True))  # the references' phase decoders read them
        if self.tap is not None:
            for sid in sids:
                self.tap(sid, frames[sid], inputs.get(sid), rows.get(sid))
        groups: dict[int, list[str]] = {}  # bank id -> its sessions in this round
        for sid in sids:
            groups.setdefault(id(self._sessions[sid].bank), []).append(sid)
        for group in groups.values():
            self._align(group, frames, rows, inputs)

    def _encode_rows(self, sids: list[str], sessions: list[_Session], times: np.ndarray,
                     samples: np.ndarray, lost: np.ndarray, shape: tuple[int, ...]) -> None:
        """:meth:`_encode_and_align` for a round's model frames given as arrays (times,
        flat joints, lost; one row per session): the same backend and aligner calls, with
        the same inputs, built with a fixed number of numpy calls."""
        n = len(sids)
        live = ~lost
        n_live = int(np.count_nonzero(live))
        if n_live == n:
            live_sids = sids
        else:
            samples = samples[live]
            live_sids = [sid for sid, v in zip(sids, live.tolist(), strict=True) if v]
        x = self.bank.features_of(samples.reshape(n_live, *shape))
        embeddings = self.bank.step_rows(live_sids, x)
        b0 = sessions[0].bank
        if all(s.bank is b0 for s in sessions):
            groups: list[tuple[AlignerBank, list[int] | None]] = [(b0, None)]
        else:  # bank id -> its rows in this round, in order of first appearance
            by_bank: dict[int, tuple[AlignerBank, list[int]]] = {}
            for r, s in enumerate(sessions):
                by_bank.setdefault(id(s.bank), (s.bank, []))[1].append(r)
            groups = list(by_bank.values())
        src = np.cumsum(live) - 1  # row of each frame's embedding / input among the live
        for bank, g in groups:
            if g is None:
                g_sids, g_sessions, g_times, g_valid = sids, sessions, times, live
            else:
                gi = np.array(g, dtype=np.int64)
                g_sids = [sids[r] for r in g]
                g_sessions = [sessions[r] for r in g]
                g_times, g_valid = times[gi], live[gi]
            g_src = src if g is None else src[gi]
            emb = _held_rows(embeddings, g_valid, g_src, self._no_embedding)  # (B, d)
            x_in = (_held_rows(x, g_valid, g_src, self._no_input)  # (B, D)
                    if bank.needs_inputs else None)
            for s, est in zip(g_sessions, bank.step_many(g_sids, emb, g_times, g_valid, x_in),
                              strict=True):
                s.last = est

    def _align(self, group: list[str], frames: dict, rows: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray]) -> None:
        """One vectorised aligner step for sessions sharing a bank; lost frames hold."""
        bank = self._sessions[group[0]].bank
        emb = np.stack([rows.get(sid, self._no_embedding) for sid in group])  # (B, d)
        times = np.array([frames[sid].t for sid in group])
        valid = np.array([not frames[sid].lost for sid in group])
        x = (np.stack([inputs.get(sid, self._no_input) for sid in group])  # (B, D)
             if bank.needs_inputs else None)
        for sid, est in zip(group, bank.step_many(group, emb, times, valid, x), strict=True):
            self._sessions[sid].last = est

    def _finish_frames(self) -> list[Result]:
        """Answer every capture frame whose model frames are all processed."""
        done = []
        for sid, s in self._sessions.items():
            if s.current is not None and not s.frames:
                seq, t = s.current
                s.current = None
                done.append((sid, seq, t, s.last))
        return done


def _concat(made: list[PushedBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                              tuple[int, ...]] | None:
    """(times, samples, lost, joints shape) of all batches' rows; None if shapes differ."""
    if len(made) == 1:
        b = made[0]
        return b.times, b.samples, b.lost, b.shape
    if len({b.shape for b in made}) != 1:
        return None
    return (np.concatenate([b.times for b in made]), np.concatenate([b.samples for b in made]),
            np.concatenate([b.lost for b in made]), made[0].shape)


def _round_arrays(items: list, made: list[PushedBatch]) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]] | None:
    """(times, flat joints, lost, joints shape) of a round's model frames, one row per
    item: rows of the batched admission (ints) and ModelFrames from ``StreamBank.push``,
    copied bit for bit; None where a ModelFrame does not fit (per-frame features, another
    shape or dtype): the round then goes the per-session way."""
    n = len(items)
    cat = _concat(made) if made else None
    if made and cat is None:
        return None
    rows = [r for r, p in enumerate(items) if type(p) is int]
    if len(rows) == n:  # every frame from the batched admission (the common case)
        assert cat is not None
        ct, cs, cl, shape = cat
        ix = np.fromiter(items, np.int64, n)
        if n == len(ct) and np.array_equal(ix, np.arange(n)):
            return ct, cs, cl, shape
        return ct[ix], cs[ix], cl[ix], shape
    others = [r for r, p in enumerate(items) if type(p) is not int]
    frames = [items[r] for r in others]
    shape = cat[3] if cat is not None else frames[0].joints.shape
    if any(f.extra is not None or f.joints.shape != shape or f.joints.dtype != np.float32
           for f in frames):
        return None
    times = np.empty(n, np.float64)
    samples = np.empty((n, math.prod(shape)), np.float32)
    lost = np.empty(n, bool)
    if rows:
        assert cat is not None
        ix = np.array([items[r] for r in rows], dtype=np.int64)
        times[rows], samples[rows], lost[rows] = cat[0][ix], cat[1][ix], cat[2][ix]
    times[others] = [f.t for f in frames]
    samples[others] = np.array([f.joints for f in frames]).reshape(len(frames), -1)
    lost[others] = [f.lost for f in frames]
    return times, samples, lost, shape


def _made_frame(made: list[PushedBatch], row: int) -> ModelFrame:
    """Row ``row`` of the batches (numbered across them) as a ModelFrame."""
    for b in made:
        if row < len(b.times):
            return b.frame(row)
        row -= len(b.times)
    raise IndexError(row)


def _held_rows(values: np.ndarray, valid: np.ndarray, src: np.ndarray,
               held: np.ndarray) -> np.ndarray:
    """``np.stack`` of ``values[src[i]]`` where ``valid[i]``, else ``held``: the rows
    :meth:`Pipeline._align` stacks (same values, same dtype), in a few numpy calls."""
    m, k = len(valid), int(np.count_nonzero(valid))
    if k == 0:
        return np.tile(held, (m, 1))
    if k == m:
        return values[src]  # a copy: the backend may reuse its output buffer
    out = np.empty((m, values.shape[1]), np.result_type(values.dtype, held.dtype))
    out[valid] = values[src[valid]]
    out[~valid] = held
    return out

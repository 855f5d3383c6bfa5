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

No torch here: this module is on the serving path.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import Backend, CapacityError, get_backend, read_model_info
from engine.streams import ModelFrame, StreamBank
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


class ReferenceMismatchError(ValueError):
    """A reference embedded by a different model than the one being served."""


@dataclass
class _Session:
    bank: AlignerBank  # the aligner bank of its reference choice (one batched step for all)
    last: Estimate  # its latest estimate, answered for capture frames off the model grid
    queue: deque[tuple[int, float, np.ndarray]] = field(default_factory=deque)
    frames: deque[ModelFrame] = field(default_factory=deque)  # model frames of the current one
    current: tuple[int, float] | None = None  # (seq, t) of the capture frame being processed
    convert: np.ndarray | None = None  # the client's layout -> the model's (joint map)


class Pipeline:
    """Sessions -> batched encoder -> one aligner per session (see module docstring)."""

    def __init__(self, backend: Backend, spec: InputSpec, references: Sequence[Reference],
                 aligner_config: AlignerConfig | None = None, *, model_name: str = "",
                 window: int = 0):
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
        # Optional observer of every model frame: (session, frame, input row, embedding;
        # the last two None for a lost frame). ``masa-rt score`` records the served
        # encoder's embeddings with it to run its baselines on the very same frames.
        self.tap: Callable[[str, ModelFrame, np.ndarray | None, np.ndarray | None],
                           None] | None = None

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

    def _encode_and_align(self, sids: list[str]) -> None:
        """Each listed session's next model frame: ONE backend call, then its aligner."""
        frames = {sid: self._sessions[sid].frames.popleft() for sid in sids}
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

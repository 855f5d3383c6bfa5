"""A reference's phase decoder: a small causal GRU from model inputs to phase log-probabilities.

Alignment alone reports the phase of the reference frame it tracks, so every subject's
own key poses and every change of speed move the reported boundary. A reference also comes
with what alignment never uses directly: the demonstration's phase *labels*. The decoder
is trained on them at ``masa-rt reference build`` time (``trainer.phase_decoder``), on
augmented replays of the demonstration (speed changes, pauses, viewpoint, mirror, per-hand
offsets, noise), and the online aligner adds its ``-log p(phase)`` to the cost of each
reference frame of that phase (``AlignerConfig.decoder_weight``): the tracker still
follows the reference frame by frame, but boundaries move to where the decoder hears them.

Input: one frame's model input (``preprocess.frame_features``: the same row the encoder
gets). Architecture, PyTorch's conventions (``nn.Linear``, ``nn.GRU`` gates r, z, n)::

    e = W2 relu(W1 x + b1) + b2
    h_l = GRU_l(input = h_{l-1} (e for l = 0), state = h_l)      l = 0 .. L-1
    log p = log_softmax(Wo h_{L-1} + bo)

Numpy only: the serving path runs it without torch. With several references loaded, every
frame steps every reference's decoder: ``DecoderStack`` steps K decoders of one shape in
one pass (one product per weight for all K, instead of K small ones and K times the
Python), which is what the aligner runs.

A reference may carry several decoders trained apart (other seeds, other replays):
``DecoderEnsemble``. Their log-probabilities are averaged and renormalised (the
normalised geometric mean of their probabilities, ``mean_log_probs``): one decoder's
errors are mostly its own draw's, so the mean is right more often than its members
(docs/changelog.md, "Fifteenth round").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["DecoderEnsemble", "DecoderStack", "PhaseDecoder", "PhaseDecoderError",
           "mean_log_probs"]

_PREFIX = "decoder."
_LOOKAHEAD = _PREFIX + "lookahead"  # int64 scalar L > 0 (absent: 0), shared by an ensemble
_MEMBERS = _PREFIX + "members"  # M of an ensemble's stacked arrays (absent: one decoder)


class PhaseDecoderError(ValueError):
    """Decoder weights with missing arrays or inconsistent shapes."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def _gru_cell(gi: np.ndarray, gh: np.ndarray, h_prev: np.ndarray) -> np.ndarray:
    """PyTorch's GRU update from the input and hidden projections ``(..., 3H)`` (gates r,
    z, n in that order) and the previous state ``(..., H)``."""
    h = h_prev.shape[-1]
    r = _sigmoid(gi[..., :h] + gh[..., :h])
    z = _sigmoid(gi[..., h:2 * h] + gh[..., h:2 * h])
    n = np.tanh(gi[..., 2 * h:] + r * gh[..., 2 * h:])
    return (1.0 - z) * n + z * h_prev


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in place on ``logits``; -inf entries stay -inf."""
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def _run(decoder: PhaseDecoder | DecoderEnsemble, x: np.ndarray) -> np.ndarray:
    """``decoder`` over a whole stream ``(T, D)`` from a fresh state, one frame at a time
    (as a live stream steps it) -> ``(T, P)`` log-probabilities."""
    state = decoder.initial_state(1)
    out = np.empty((len(x), decoder.num_phases), dtype=np.float32)
    for t in range(len(x)):
        logp, state = decoder.step(np.asarray(x[t:t + 1], dtype=np.float32), state)
        out[t] = logp[0]
    return out


class PhaseDecoder:
    """Weights (float32) and the batched step; the state is the caller's ``(B, L, H)``."""

    def __init__(self, arrays: Mapping[str, np.ndarray], lookahead: int = 0) -> None:
        # Lookahead L: trained to name the phase of the frame L steps before its newest
        # input (``DecoderConfig.lookahead``), so the aligner runs L frames behind.
        if int(lookahead) != lookahead or lookahead < 0:
            raise PhaseDecoderError(f"phase decoder: lookahead must be an int >= 0, found "
                                    f"{lookahead!r}")
        self.lookahead = int(lookahead)
        self.layers = sum(str(k).startswith("w_ih") for k in arrays)
        if self.layers < 1:
            raise PhaseDecoderError("phase decoder: no GRU layer (w_ih0 ...)")
        names = ["w1", "b1", "w2", "b2", "wo", "bo"] + [
            f"{n}{i}" for i in range(self.layers) for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
        try:
            a = {k: np.asarray(arrays[k], dtype=np.float32) for k in names}
        except KeyError as e:
            raise PhaseDecoderError(f"phase decoder: missing array {e}") from None
        self.w1, self.b1, self.w2, self.b2 = a["w1"], a["b1"], a["w2"], a["b2"]
        self.wo, self.bo = a["wo"], a["bo"]
        self.gru = [(a[f"w_ih{i}"], a[f"w_hh{i}"], a[f"b_ih{i}"], a[f"b_hh{i}"])
                    for i in range(self.layers)]
        self._check()

    def _check(self) -> None:
        h = self.hidden
        want = {"w1": (h, self.input_dim), "b1": (h,), "w2": (h, h), "b2": (h,),
                "wo": (self.num_phases, h), "bo": (self.num_phases,)}
        for i in range(self.layers):
            want |= {f"w_ih{i}": (3 * h, h), f"w_hh{i}": (3 * h, h), f"b_ih{i}": (3 * h,),
                     f"b_hh{i}": (3 * h,)}
        arrays = self.arrays()
        for name, shape in want.items():
            if arrays[name].shape != shape:
                raise PhaseDecoderError(f"phase decoder: {name}: expected shape {shape}, "
                                        f"found {arrays[name].shape}")
            if not np.isfinite(arrays[name]).all():
                raise PhaseDecoderError(f"phase decoder: {name}: NaN or inf")

    @property
    def input_dim(self) -> int:
        return int(self.w1.shape[1])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[0])

    @property
    def num_phases(self) -> int:
        return int(self.wo.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2,
               "wo": self.wo, "bo": self.bo}
        for i, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.gru):
            out |= {f"w_ih{i}": w_ih, f"w_hh{i}": w_hh, f"b_ih{i}": b_ih, f"b_hh{i}": b_hh}
        return out

    # -- file members: "decoder.<name>" inside a reference .npz ---------------------------

    def to_npz_members(self) -> dict[str, np.ndarray]:
        out = {_PREFIX + k: v for k, v in self.arrays().items()}
        if self.lookahead:  # absent = 0: archives from before lookahead read as they were
            out[_LOOKAHEAD] = np.array(self.lookahead, dtype=np.int64)
        return out

    @classmethod
    def from_npz_members(cls, members: Mapping[str, np.ndarray]) -> PhaseDecoder | None:
        """The decoder stored in a reference archive, or None if it has none."""
        mine = {k[len(_PREFIX):]: v for k, v in members.items() if k.startswith(_PREFIX)}
        if not mine:
            return None
        lookahead = mine.pop("lookahead", np.array(0))
        if np.shape(lookahead) != () or not np.issubdtype(np.asarray(lookahead).dtype,
                                                          np.integer):
            raise PhaseDecoderError(f"phase decoder: lookahead: expected one integer, "
                                    f"found {np.asarray(lookahead)!r}")
        return cls(mine, int(lookahead))

    # -- inference -------------------------------------------------------------------------

    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.layers, self.hidden), dtype=np.float32)

    def step(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame of ``B`` streams: inputs ``(B, D)``, state ``(B, L, H)`` ->
        log-probabilities ``(B, P)`` and the new state (a new array)."""
        e = np.maximum(x @ self.w1.T + self.b1, 0.0) @ self.w2.T + self.b2
        new = np.empty_like(state)
        h_in = e
        for i, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.gru):
            h = state[:, i]
            new[:, i] = h_in = _gru_cell(h_in @ w_ih.T + b_ih, h @ w_hh.T + b_hh, h)
        return _log_softmax(h_in @ self.wo.T + self.bo).astype(np.float32), new

    def run(self, x: np.ndarray) -> np.ndarray:
        """A whole stream ``(T, D)`` from a fresh state -> ``(T, P)`` log-probabilities."""
        return _run(self, x)


class DecoderStack:
    """K decoders of one shape (input size, hidden, layers) stepped together.

    The same equations as ``PhaseDecoder.step``, with a leading reference axis on every
    weight; the first layer, whose input all K share, is one product. Decoders with fewer
    phases than the largest are padded with phases of log-probability -inf.
    """

    # Streams x decoders up to which one stacked pass runs; beyond, each decoder steps on
    # its own. The pass saves Python and call overhead, which dominates small batches
    # (6 decoders, H 64: 0.15 against 0.45 ms for 1 stream, 0.7 against 1.3 ms for 16), but
    # its (K, B, 3H) temporaries outgrow the cache: at 256 streams it took 19 ms against
    # 11 ms one by one, and splitting it into passes of <= 256 rows did not close the gap
    # (benchmarks/decoder_stack.py).
    max_rows = 256

    def __init__(self, decoders: list[PhaseDecoder]) -> None:
        if not decoders:
            raise PhaseDecoderError("DecoderStack: no decoder")
        shapes = {(d.input_dim, d.hidden, d.layers) for d in decoders}
        if len(shapes) > 1:
            raise PhaseDecoderError(f"DecoderStack: decoders of different shapes {shapes} "
                                    "(input, hidden, layers)")
        self.input_dim, self.hidden, self.layers = shapes.pop()
        self.k = len(decoders)
        self.decoders = list(decoders)
        self.num_phases = [d.num_phases for d in decoders]
        p_max = max(self.num_phases)
        # Weights transposed once, so every product is (rows, in) @ (in, out).
        self.w1 = np.concatenate([d.w1 for d in decoders]).T.copy()  # (D, K*H)
        self.b1 = np.concatenate([d.b1 for d in decoders])  # (K*H,)
        self.w2 = np.stack([d.w2.T for d in decoders])  # (K, H, H)
        self.b2 = np.stack([d.b2 for d in decoders])[:, None]  # (K, 1, H)
        self.gru = []  # per layer: w_ih^T, w_hh^T (K, H, 3H) and b_ih, b_hh (K, 1, 3H)
        for i in range(self.layers):
            w_ih, w_hh, b_ih, b_hh = zip(*(d.gru[i] for d in decoders), strict=True)
            self.gru.append((np.stack([w.T for w in w_ih]), np.stack([w.T for w in w_hh]),
                             np.stack(b_ih)[:, None], np.stack(b_hh)[:, None]))
        self.wo = np.zeros((self.k, self.hidden, p_max), dtype=np.float32)
        self.bo = np.full((self.k, 1, p_max), -np.inf, dtype=np.float32)
        for i, d in enumerate(decoders):
            self.wo[i, :, :d.num_phases], self.bo[i, 0, :d.num_phases] = d.wo.T, d.bo

    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.k, self.layers, self.hidden), dtype=np.float32)

    def step(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame of ``B`` streams through all K decoders: inputs ``(B, D)``, state
        ``(B, K, L, H)`` -> log-probabilities ``(B, K, P_max)`` (-inf on padded phases) and
        the new state (a new array)."""
        if len(x) * self.k > self.max_rows:
            return self._step_each(x, state)
        b, h = len(x), self.hidden
        e = np.maximum(x @ self.w1 + self.b1, 0.0).reshape(b, self.k, h).transpose(1, 0, 2)
        h_in = e @ self.w2 + self.b2  # (K, B, H)
        new = np.empty((self.k, b, self.layers, h), dtype=np.float32)
        for i, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.gru):
            h_old = state[:, :, i].transpose(1, 0, 2)
            new[:, :, i] = h_in = _gru_cell(h_in @ w_ih + b_ih, h_old @ w_hh + b_hh, h_old)
        logp = _log_softmax(h_in @ self.wo + self.bo)  # (K, B, P_max)
        return (logp.transpose(1, 0, 2).astype(np.float32),
                new.transpose(1, 0, 2, 3).copy())

    def _step_each(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``step`` for large batches: K ``PhaseDecoder.step`` calls, same outputs."""
        logp = np.full((len(x), self.k, self.wo.shape[2]), -np.inf, dtype=np.float32)
        new = np.empty_like(state)
        for i, d in enumerate(self.decoders):
            logp[:, i, :d.num_phases], new[:, i] = d.step(x, state[:, i])
        return logp, new


def mean_log_probs(logp: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """Members' log-probabilities ``(B, M, P)`` -> the ensemble's ``(B, P)``: their mean,
    renormalised (log of the normalised geometric mean of the probabilities). With
    ``starts`` (the first member of each of G ensembles laid end to end along axis 1),
    ``(B, G, P)``. -inf phases (padding) stay -inf."""
    if starts is None:
        mean = logp.mean(axis=1)
    else:
        counts = np.diff(np.append(starts, logp.shape[1]))
        mean = np.add.reduceat(logp, starts, axis=1) / counts[:, None]
    return _log_softmax(mean)


class DecoderEnsemble:
    """M phase decoders of one shape, phases and lookahead whose log-probabilities are
    averaged (``mean_log_probs``). What a reference carries; one member is one decoder,
    stored and stepped exactly as before."""

    def __init__(self, members: list[PhaseDecoder] | tuple[PhaseDecoder, ...]) -> None:
        self.members = tuple(members)
        if not self.members:
            raise PhaseDecoderError("DecoderEnsemble: no decoder")
        first = self.members[0]
        for i, d in enumerate(self.members[1:], 1):
            mine = (d.input_dim, d.hidden, d.layers, d.num_phases, d.lookahead)
            want = (first.input_dim, first.hidden, first.layers, first.num_phases,
                    first.lookahead)
            if mine != want:
                raise PhaseDecoderError(
                    f"DecoderEnsemble: member {i} has (input, hidden, layers, phases, "
                    f"lookahead) {mine}, member 0 {want}; an ensemble's decoders share "
                    "them")
        # What every member shares, so an ensemble reads as one decoder.
        self.size = len(self.members)
        self.input_dim, self.hidden, self.layers = first.input_dim, first.hidden, first.layers
        self.num_phases, self.lookahead = first.num_phases, first.lookahead
        # Steps every member at once; one member steps alone (bit for bit the decoder).
        self._stack = DecoderStack(list(self.members)) if self.size > 1 else None

    # -- file members ----------------------------------------------------------------------

    def to_npz_members(self) -> dict[str, np.ndarray]:
        """One member: exactly ``PhaseDecoder.to_npz_members`` (readable by servers that
        predate ensembles); M > 1: each array stacked on a leading axis of M, and
        ``decoder.members``."""
        if self.size == 1:
            return self.members[0].to_npz_members()
        per = [d.to_npz_members() for d in self.members]
        out = {k: np.stack([p[k] for p in per]) for k in per[0] if k != _LOOKAHEAD}
        if _LOOKAHEAD in per[0]:  # one value for all: the members share it
            out[_LOOKAHEAD] = per[0][_LOOKAHEAD]
        out[_MEMBERS] = np.array(self.size, dtype=np.int64)
        return out

    @classmethod
    def from_npz_members(cls, members: Mapping[str, np.ndarray]) -> DecoderEnsemble | None:
        """The decoder(s) stored in a reference archive, or None if it has none."""
        count = members.get(_MEMBERS)
        if count is None:
            one = PhaseDecoder.from_npz_members(members)
            return None if one is None else cls([one])
        if np.shape(count) != () or not np.issubdtype(np.asarray(count).dtype, np.integer) \
                or int(count) < 2:
            raise PhaseDecoderError(f"phase decoder: members: expected one integer >= 2, "
                                    f"found {np.asarray(count)!r}")
        m = int(count)
        stacked = {k: v for k, v in members.items()
                   if k.startswith(_PREFIX) and k not in (_MEMBERS, _LOOKAHEAD)}
        for k, v in stacked.items():
            if np.ndim(v) < 1 or len(v) != m:
                raise PhaseDecoderError(f"phase decoder: {k[len(_PREFIX):]}: expected "
                                        f"{m} members on its first axis, found shape "
                                        f"{np.shape(v)}")
        extra = {_LOOKAHEAD: members[_LOOKAHEAD]} if _LOOKAHEAD in members else {}
        return cls([PhaseDecoder.from_npz_members({k: v[i] for k, v in stacked.items()}
                                                  | extra) for i in range(m)])

    # -- inference -------------------------------------------------------------------------

    def initial_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.size, self.layers, self.hidden), dtype=np.float32)

    def step(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame of ``B`` streams: inputs ``(B, D)``, state ``(B, M, L, H)`` ->
        the ensemble's log-probabilities ``(B, P)`` and the new state."""
        if self.size == 1:  # the decoder itself: bit for bit what one decoder gives
            logp, new = self.members[0].step(x, state[:, 0])
            return logp, new[:, None]
        logp, new = self._stack.step(x, state)
        return mean_log_probs(logp).astype(np.float32), new

    def run(self, x: np.ndarray) -> np.ndarray:
        """A whole stream ``(T, D)`` from a fresh state -> ``(T, P)`` log-probabilities."""
        return _run(self, x)

"""The reference phase decoder: numpy inference = torch training twin, file format, its
training, and how the aligner uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masa_rt.align import Aligner, AlignerBank, AlignerConfig, Reference, ReferenceFormatError
from masa_rt.phase_decoder import PhaseDecoder, PhaseDecoderError
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.synth.generate import generate
from trainer.phase_decoder import DecoderConfig, DecoderNet, train_phase_decoder

D_IN, PHASES = 12, 3
LENGTHS = (20, 25, 20)


def random_decoder(seed: int = 0, d_in: int = D_IN, phases: int = PHASES,
                   hidden: int = 8) -> PhaseDecoder:
    torch.manual_seed(seed)
    return DecoderNet(d_in, phases, hidden=hidden, layers=2).to_numpy()


def make_reference(decoder: PhaseDecoder | None = None, dim: int = 6) -> Reference:
    rng = np.random.default_rng(0)
    n = sum(LENGTHS)
    # A smooth path on the sphere: neighbouring frames similar, distant ones not.
    t = np.linspace(0, 3 * np.pi, n)
    emb = np.stack([np.cos(t + k) for k in range(dim)], axis=1) + 0.05 * rng.standard_normal(
        (n, dim))
    return Reference(name="demo", activity="act", embeddings=emb,
                     phases=np.repeat(np.arange(PHASES), LENGTHS),
                     phase_names=[f"p{i}" for i in range(PHASES)],
                     times=np.arange(n) / 30.0, fps=30.0, model_fingerprint="m",
                     decoder=decoder)


def test_numpy_step_equals_torch_gru() -> None:
    torch.manual_seed(1)
    net = DecoderNet(D_IN, PHASES, hidden=16, layers=2)
    x = np.random.default_rng(0).standard_normal((50, D_IN)).astype(np.float32)
    with torch.no_grad():
        want = torch.log_softmax(net(torch.from_numpy(x)[None])[0], -1).numpy()
    got = net.to_numpy().run(x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batched_step_equals_one_stream_at_a_time() -> None:
    dec = random_decoder()
    x = np.random.default_rng(1).standard_normal((4, 10, D_IN)).astype(np.float32)
    state = dec.initial_state(4)
    for t in range(10):
        logp, state = dec.step(x[:, t], state)
    for b in range(4):
        np.testing.assert_allclose(dec.run(x[b])[-1], logp[b], atol=1e-6)


def test_decoder_weights_are_checked() -> None:
    arrays = random_decoder().arrays()
    with pytest.raises(PhaseDecoderError, match="missing array"):
        PhaseDecoder({k: v for k, v in arrays.items() if k != "wo"})
    with pytest.raises(PhaseDecoderError, match="w_hh1: expected shape"):
        PhaseDecoder(arrays | {"w_hh1": arrays["w_hh1"][:, :3]})
    with pytest.raises(PhaseDecoderError, match="NaN"):
        PhaseDecoder(arrays | {"bo": np.full(PHASES, np.nan, np.float32)})


def test_reference_round_trip_with_and_without_decoder(tmp_path) -> None:
    dec = random_decoder()
    with_dec, without = make_reference(dec), make_reference()
    with_dec.save(tmp_path / "a.npz")
    without.save(tmp_path / "b.npz")
    back = Reference.load(tmp_path / "a.npz")
    for k, v in dec.arrays().items():
        np.testing.assert_array_equal(back.decoder.arrays()[k], v)
    assert Reference.load(tmp_path / "b.npz").decoder is None


def test_reference_refuses_decoder_of_other_phase_count(tmp_path) -> None:
    with pytest.raises(ReferenceFormatError, match="decoder: expected 3 phases"):
        make_reference(random_decoder(phases=4))
    ref = make_reference(random_decoder())
    ref.save(tmp_path / "r.npz")
    data = dict(np.load(tmp_path / "r.npz"))
    data["decoder.wo"] = data["decoder.wo"][:, :2]  # corrupt one member
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ReferenceFormatError, match="bad.npz: phase decoder: wo"):
        Reference.load(tmp_path / "bad.npz")


def _query(ref: Reference, n: int) -> np.ndarray:
    """The reference's own first ``n`` frames: the embeddings say phase 0."""
    return ref.embeddings[:n]


def _confident(phase: int) -> PhaseDecoder:
    """A decoder that always says ``phase`` (output weights 0, bias 10 on that phase)."""
    arrays = random_decoder().arrays()
    arrays["wo"] = np.zeros_like(arrays["wo"])
    arrays["bo"] = np.where(np.arange(PHASES) == phase, 10.0, 0.0).astype(np.float32)
    return PhaseDecoder(arrays)


def test_confident_decoder_pulls_the_phase_and_weight_zero_ignores_it() -> None:
    ref = make_reference(_confident(2))
    q = _query(ref, 15)
    x = np.zeros((len(q), D_IN), np.float32)
    al = Aligner(ref, AlignerConfig(decoder_weight=1.0))
    pulled = [al.step(q[t], t / 30.0, inputs=x[t]) for t in range(len(q))]
    ignored = Aligner(ref, AlignerConfig(decoder_weight=0.0)).run(q)
    plain = Aligner(make_reference(), AlignerConfig()).run(q)
    assert pulled[-1].phase_id == 2
    assert [e.phase_id for e in ignored] == [e.phase_id for e in plain]
    assert ignored[-1].phase_id == 0


def test_aligner_needs_inputs_when_a_reference_has_a_decoder() -> None:
    al = Aligner(make_reference(random_decoder()))
    q = _query(al.references[0], 1)[0]
    with pytest.raises(ValueError, match="phase decoders, which need"):
        al.step(q, 0.0)
    with pytest.raises(ValueError, match="inputs of size 12, found 5"):
        al.step(q, 0.0, inputs=np.zeros(5))


def test_bank_with_decoders_equals_single_aligners_and_lost_frames_hold_state() -> None:
    ref = make_reference(random_decoder(3))
    cfg = AlignerConfig(decoder_weight=0.05)
    rng = np.random.default_rng(2)
    n, b = 30, 3
    q = ref.embeddings[rng.integers(0, len(ref), (b, n))]
    x = rng.standard_normal((b, n, D_IN)).astype(np.float32)
    valid = rng.random((b, n)) > 0.2
    bank = AlignerBank(ref, cfg)
    singles = [Aligner(ref, cfg) for _ in range(b)]
    for t in range(n):
        out = bank.step_many(list(range(b)), q[:, t], np.full(b, t / 30.0), valid[:, t], x[:, t])
        for i, al in enumerate(singles):
            e = al.step(q[i, t], t / 30.0, bool(valid[i, t]), inputs=x[i, t])
            assert (out[i].phase_id, out[i].ref_index) == (e.phase_id, e.ref_index)
    # The decoder state after the stream equals the state of its valid frames alone.
    dec = ref.decoder
    for i in range(b):
        state = dec.initial_state(1)
        for t in np.flatnonzero(valid[i]):
            _, state = dec.step(x[i, t][None], state)
        np.testing.assert_allclose(bank._sessions.dec[bank._slot[i]], state.reshape(-1),
                                   atol=1e-6)


def test_training_learns_the_demo_labels() -> None:
    spec = InputSpec(layout="h2o_hands", fps=30.0)
    demo = generate("pour_milk", np.random.default_rng(0), clean=True)
    losses = []
    cfg = DecoderConfig(steps=80, hidden=32, batch_size=4)
    dec = train_phase_decoder([(demo.joints, demo.phases)], spec, len(demo.phase_names), cfg,
                              progress=lambda step, loss: losses.append(loss))
    assert dec.num_phases == len(demo.phase_names) and dec.input_dim == spec.input_dim
    assert losses[-1] < 0.7 * losses[0]
    pred = dec.run(frame_features(demo.joints, spec)).argmax(1)
    chance = np.bincount(demo.phases).max() / len(demo.phases)
    assert np.mean(pred == demo.phases) > chance + 0.1


def test_training_refuses_bad_demos() -> None:
    spec = InputSpec(layout="h2o_hands", fps=30.0)
    demo = generate("pour_milk", np.random.default_rng(0), clean=True)
    with pytest.raises(ValueError, match="labels outside"):
        train_phase_decoder([(demo.joints, demo.phases)], spec, 2, DecoderConfig(steps=1))
    with pytest.raises(ValueError, match="frames and"):
        train_phase_decoder([(demo.joints, demo.phases[:-1])], spec, 8, DecoderConfig(steps=1))
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        train_phase_decoder([(demo.joints, demo.phases)], spec, 8, DecoderConfig(steps=0))

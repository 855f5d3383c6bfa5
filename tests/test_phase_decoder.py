"""The reference phase decoder: numpy inference = torch training twin, file format, its
training, and how the aligner uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt.align import Aligner, AlignerBank, AlignerConfig, Reference, ReferenceFormatError
from masa_rt.phase_decoder import (
    DecoderEnsemble,
    DecoderStack,
    PhaseDecoder,
    PhaseDecoderError,
    mean_log_probs,
)
from masa_rt.preprocess import InputSpec, frame_features
from masa_rt.synth.generate import generate
from trainer.demo_replay import EDITS, RetimeConfig, retime_demo, scripted_edit, vary_bones
from trainer.phase_decoder import (
    DecoderConfig,
    DecoderNet,
    _batch,
    decoder_config,
    train_phase_decoder,
)

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
        np.testing.assert_array_equal(back.decoder.members[0].arrays()[k], v)
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


@pytest.mark.parametrize("max_rows", [1 << 20, 1])  # the stacked pass, one by one
def test_stack_equals_its_decoders_one_by_one(max_rows: int) -> None:
    decs = [random_decoder(k, phases=p) for k, p in enumerate((3, 5, 2))]
    stack = DecoderStack(decs)
    stack.max_rows = max_rows
    x = np.random.default_rng(4).standard_normal((12, 4, D_IN)).astype(np.float32)
    state, states = stack.initial_state(4), [d.initial_state(4) for d in decs]
    for t in range(12):
        logp, state = stack.step(x[t], state)
        for k, d in enumerate(decs):
            want, states[k] = d.step(x[t], states[k])
            np.testing.assert_allclose(logp[:, k, :d.num_phases], want, atol=1e-5)
            assert np.isneginf(logp[:, k, d.num_phases:]).all()  # padding: never chosen
            np.testing.assert_allclose(state[:, k], states[k], atol=1e-5)
    with pytest.raises(PhaseDecoderError, match="different shapes"):
        DecoderStack([random_decoder(0), random_decoder(1, hidden=4)])


def test_aligner_adds_every_references_decoder_term_to_its_own_columns() -> None:
    """Decoders of two shapes (two stacks) and a reference without one, in one aligner."""
    decs = [random_decoder(0), random_decoder(1, hidden=4), None, random_decoder(2)]
    refs = [make_reference(d) for d in decs]
    for k, r in enumerate(refs):
        r.name = r.activity = f"act{k}"
    w = 0.05
    al = Aligner(refs, AlignerConfig(decoder_weight=w, decoder_stickiness=0.0))
    model = al._model
    assert len(model.decoders) == 2  # hidden 8 (two references) and hidden 4
    x = np.random.default_rng(5).standard_normal((8, D_IN)).astype(np.float32)
    states = [d.initial_state(1) if d is not None else None for d in decs]
    for t in range(8):
        al.step(refs[0].embeddings[t], t / 30.0, inputs=x[t])
        added = al._sessions.dec_added[0]
        for k, d in enumerate(decs):
            cols = model.ref_cols[k]
            if d is None:
                assert not added[cols].any()
                continue
            logp, states[k] = d.step(x[t][None], states[k])
            # -w log(p / max p): relative to the decoder's best phase, never below 0.
            rel = logp[0] - logp[0].max()
            np.testing.assert_allclose(added[cols], -w * rel[refs[k].phases], atol=1e-5)
            assert added[cols].min() == pytest.approx(0.0, abs=1e-6)


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


def _uniform() -> PhaseDecoder:
    """A decoder that cannot tell the phases apart (p = 1/P everywhere)."""
    arrays = random_decoder().arrays()
    arrays["wo"] = np.zeros_like(arrays["wo"])
    arrays["bo"] = np.zeros_like(arrays["bo"])
    return PhaseDecoder(arrays)


def test_a_confident_decoder_does_not_pull_the_activity_choice() -> None:
    """The decoder term is relative to each decoder's best phase, so the stream's own
    activity (an unsure decoder) still wins over another activity whose decoder is sure
    of something: only the embeddings choose between references."""
    own = make_reference(_uniform())
    other = make_reference(_confident(1))
    other.embeddings = -other.embeddings  # another activity: far from the stream
    own.name = own.activity = "own"
    other.name = other.activity = "other"
    q = _query(own, 40)
    x = np.zeros((len(q), D_IN), np.float32)
    # No stickiness: a uniform decoder would name phase 0 for good, and its bonus would
    # make the stream's own later phases cost decoder_weight x it more (test below).
    al = Aligner([own, other], AlignerConfig(decoder_weight=1.0, decoder_stickiness=0.0))
    est = [al.step(q[t], t / 30.0, inputs=x[t]) for t in range(len(q))]
    assert {e.activity for e in est} == {"own"}


def test_aligner_needs_inputs_when_a_reference_has_a_decoder() -> None:
    al = Aligner(make_reference(random_decoder()))
    q = _query(al.references[0], 1)[0]
    with pytest.raises(ValueError, match="phase decoders, which need"):
        al.step(q, 0.0)
    with pytest.raises(ValueError, match="inputs of size 12, found 5"):
        al.step(q, 0.0, inputs=np.zeros(5))


@pytest.mark.parametrize("swinging", [False, True])
def test_bank_with_decoders_equals_single_aligners_and_lost_frames_hold_state(
        swinging: bool) -> None:
    """Also with a decoder whose phase changes from frame to frame, which the default
    stickiness (hysteresis) then holds."""
    ref = make_reference(_swinging(8) if swinging else random_decoder(3))
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
        # So is the phase the hysteresis holds on to.
        live = np.flatnonzero(valid[i])
        want = _sticky_argmax(dec.run(x[i, live]), cfg.decoder_stickiness)[-1]
        assert bank._sessions.dec_last[bank._slot[i], 0] == want


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


def _ramp_demo(durations: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A demo whose every joint coordinate is its frame index: edits show as index maps."""
    phases = np.repeat(np.arange(len(durations)), durations)
    joints = np.arange(len(phases), dtype=np.float32)[:, None, None] * np.ones((1, 2, 3))
    return joints.astype(np.float32), phases


@settings(max_examples=60, deadline=None)
@given(durations=st.lists(st.integers(1, 9), min_size=1, max_size=8),
       kind=st.sampled_from(EDITS), seed=st.integers(0, 2**16))
def test_scripted_edit_labels_follow_the_frames(durations, kind, seed) -> None:
    joints, phases = _ramp_demo(durations)
    out_j, out_p = scripted_edit(joints, phases, kind, np.random.default_rng(seed))
    k = len(durations)
    assert len(out_j) == len(out_p) and out_j.shape[1:] == joints.shape[1:]
    if k < 3 or (kind == "skip" and k < 4):
        assert out_p is phases and out_j is joints
        return
    runs = [int(r) for r in np.flatnonzero(np.diff(out_p) != 0)]
    order = [int(out_p[0])] + [int(out_p[i + 1]) for i in runs]  # phases in play order
    assert out_p[-1] == k - 1 and out_j[-1, 0, 0] == len(phases) - 1  # ends as the demo
    if kind == "skip":  # one inner phase missing, the others in order
        assert len(order) == k - 1 and order == sorted(order)
        missing = sorted(set(range(k)) - set(order))
        assert len(missing) == 1 and 0 < missing[0] < k - 1
    elif kind == "repeat":  # p, p+1 (started), back through p, p again
        assert set(order) == set(range(k)) and len(order) == k + 2
        # Reverse playback and redo are the demo's own frames with its labels.
        src = out_j[:, 0, 0].astype(np.int64)
        assert np.array_equal(out_p, phases[src])
    else:  # restart: phases 0 .. r-1, then the whole demo from phase 0 again
        assert any(np.array_equal(out_p, np.concatenate([phases[phases < r], phases]))
                   for r in range(1, k - 1))


def test_scripted_edit_rebases_the_moved_phase() -> None:
    joints, phases = _ramp_demo([3, 4, 5, 3, 4])
    out_j, out_p = scripted_edit(joints, phases, "skip", np.random.default_rng(1))
    first = np.flatnonzero(np.diff(out_p))[0] + 1  # first frame after phase 0
    skipped = int(out_p[first]) - 1
    # The next phase starts where the skipped one would have (the end of the one before)
    # and still ends at its own key pose.
    start = np.flatnonzero(phases == skipped)[0]
    assert out_j[first, 0, 0] == start
    end = np.flatnonzero(out_p == out_p[first])[-1]
    assert out_j[end, 0, 0] == np.flatnonzero(phases == out_p[first])[-1]
    with pytest.raises(ValueError, match="kind expected"):
        scripted_edit(joints, phases, "shuffle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="edit_prob"):
        train_phase_decoder([(joints, phases)], InputSpec(layout="h2o_hands", fps=30.0), 5,
                            DecoderConfig(steps=1, edit_prob=1.5))


@settings(max_examples=60, deadline=None)
@given(durations=st.lists(st.integers(1, 12), min_size=1, max_size=8),
       pause_prob=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_retime_labels_follow_the_frames(durations, pause_prob, seed) -> None:
    joints, phases = _ramp_demo(durations)
    cfg = RetimeConfig(pause_prob=pause_prob, pause_frames=(2, 5))
    out_j, out_p = retime_demo(joints, phases, np.random.default_rng(seed), cfg)
    assert len(out_j) == len(out_p) and out_j.shape[1:] == joints.shape[1:]
    src = out_j[:, 0, 0]  # the demo position each frame plays (interpolated)
    # In play order, never backwards, starting at the demo's first frame and reaching its
    # last phase; each frame labelled with the phase of the demo frame it starts from.
    assert src[0] == 0 and np.all(np.diff(src) >= -1e-4) and np.all(np.diff(out_p) >= 0)
    assert np.array_equal(out_p, phases[np.floor(src + 1e-4).astype(np.int64)])
    assert np.array_equal(np.unique(out_p), np.arange(len(durations)))


def test_retime_pauses_ease_in_and_hold_inside_their_phase() -> None:
    joints, phases = _ramp_demo([30, 30, 30])
    cfg = RetimeConfig(speed=(1.0, 1.0), pause_prob=1.0, pause_frames=(10, 10))
    out_j, out_p = retime_demo(joints, phases, np.random.default_rng(0), cfg)
    src = out_j[:, 0, 0]
    assert len(src) == 3 * (30 + 10)  # speed 1: every phase's frames, plus its pause
    for k in range(3):
        mine = src[out_p == k]
        step = np.diff(mine)
        still = np.flatnonzero(step < 1e-6)
        still = still[:np.argmax(np.diff(still, append=-1) != 1) + 1]  # the first still run
        assert len(still) == 10  # the hold: 10 more frames of the pose it eased into
        u = (mine[still[0]] - 30 * k) / 30
        assert cfg.pause_at[0] - 0.05 <= u <= cfg.pause_at[1] + 0.05  # partway, not at a change
        # Eased: the move slows into the stop and out of it again.
        assert step[still[0] - 1] < 0.5 * step.max() and step[still[-1] + 1] < 0.5 * step.max()
    # No pause and speed 1: the demo itself.
    plain = RetimeConfig(speed=(1.0, 1.0), pause_prob=0.0)
    same_j, same_p = retime_demo(joints, phases, np.random.default_rng(0), plain)
    assert np.array_equal(same_j, joints) and np.array_equal(same_p, phases)


def test_retime_config_is_checked_and_reaches_the_batches() -> None:
    for bad in [{"speed": (0.0, 1.0)}, {"pause_prob": 1.5}, {"pause_frames": (0, 3)},
                {"pause_at": (0.5, 1.0)}]:
        with pytest.raises(ValueError, match="RetimeConfig"):
            RetimeConfig(**bad)
    assert decoder_config({"retime": True}).retime == RetimeConfig()
    # On by default; False (--no-decoder-retime) turns it off.
    assert decoder_config({"retime": None}).retime == RetimeConfig() == DecoderConfig().retime
    assert decoder_config({"retime": False}).retime is None
    assert DecoderConfig(retime=None).view_augment == DecoderConfig().augment
    spec = InputSpec(layout="h2o_hands", fps=30.0)
    demo = generate("screw_lid", np.random.default_rng(0), clean=True)
    cfg = DecoderConfig(batch_size=4, edit_prob=0.0,
                        retime=RetimeConfig(speed=(0.5, 0.5), pause_prob=0.0))
    x, y = _batch([(demo.joints, demo.phases)], spec, cfg, np.random.default_rng(3))
    # At half speed every view is about twice the demo before its crop; labels stay in
    # the demo's phases.
    assert x.shape[1] > 1.5 * len(demo.phases)
    live = y[y >= 0]
    assert live.numel() > 0 and int(live.max()) < len(demo.phase_names)


def test_vary_bones_scales_each_bone_and_keeps_the_pose() -> None:
    from masa_rt.skeleton import get_layout

    parents = get_layout("h2o_hands").parents
    joints = generate("pour_milk", np.random.default_rng(0), clean=True).joints[:20]
    out = vary_bones(joints, parents, np.random.default_rng(1), 0.08)
    roots = [j for j, p in enumerate(parents) if p < 0]
    np.testing.assert_array_equal(out[:, roots], joints[:, roots])
    bones = [(j, p) for j, p in enumerate(parents) if p >= 0]
    before = np.stack([joints[:, j] - joints[:, p] for j, p in bones], axis=1)
    after = np.stack([out[:, j] - out[:, p] for j, p in bones], axis=1)
    ratio = np.linalg.norm(after, axis=-1) / np.linalg.norm(before, axis=-1)  # (T, bones)
    # One factor per bone for the whole replay, inside 1 +- 0.08, and not all the same.
    np.testing.assert_allclose(ratio, ratio[:1].repeat(len(ratio), 0), rtol=1e-4)
    assert np.all(np.abs(ratio - 1) <= 0.08 + 1e-4) and np.ptp(ratio[0]) > 0.02
    cos = (after * before).sum(-1) / np.linalg.norm(after, axis=-1) / np.linalg.norm(
        before, axis=-1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)  # every bone keeps its direction
    np.testing.assert_allclose(vary_bones(joints, parents, np.random.default_rng(1), 0.0),
                               joints, atol=1e-6)


def test_decoder_config_applies_and_checks_options() -> None:
    cfg = decoder_config({"steps": 10, "hidden": 128, "edit_prob": None})
    assert (cfg.steps, cfg.hidden, cfg.edit_prob) == (10, 128, DecoderConfig().edit_prob)
    assert decoder_config(None) == DecoderConfig() == decoder_config({"steps": None})
    assert decoder_config({"steps": 0}).steps == 0  # no decoder: allowed here
    for bad, match in [({"stpes": 5}, "unknown option.*stpes"), ({"steps": -1}, "steps"),
                       ({"hidden": 0}, "hidden"), ({"edit_prob": -0.1}, "edit_prob"),
                       ({"bone_jitter": 1.0}, "bone_jitter"), ({"members": 0}, "members")]:
        with pytest.raises(ValueError, match=match):
            decoder_config(bad)


def test_default_config_follows_the_references() -> None:
    """Tuned with decoders (the class defaults) when a reference has one; the values tuned
    for embeddings alone when none has; an explicit config always wins."""
    from masa_rt.align import DECODER_FREE

    with_dec, plain = make_reference(random_decoder()), make_reference()
    assert AlignerConfig.for_references([plain, with_dec]) == AlignerConfig()
    free = AlignerConfig.for_references(plain)
    assert all(getattr(free, k) == v for k, v in DECODER_FREE.items())
    assert free != AlignerConfig()
    assert Aligner(plain)._model.cfg == free
    assert AlignerBank(with_dec)._model.cfg == AlignerConfig()
    assert Aligner(plain, AlignerConfig(band=7))._model.cfg.band == 7


# -- lookahead: the decoder names the phase L frames back, the aligner runs L frames behind


def _with_lookahead(dec: PhaseDecoder, lookahead: int) -> PhaseDecoder:
    return PhaseDecoder(dec.arrays(), lookahead)


def test_lookahead_round_trips_and_raises_the_file_version(tmp_path) -> None:
    make_reference(_with_lookahead(random_decoder(), 3)).save(tmp_path / "la.npz")
    make_reference(random_decoder()).save(tmp_path / "causal.npz")
    assert Reference.load(tmp_path / "la.npz").decoder.lookahead == 3
    assert Reference.load(tmp_path / "causal.npz").decoder.lookahead == 0
    with np.load(tmp_path / "la.npz") as f:
        assert int(f["format_version"]) == 2  # version-1 readers refuse it, never misread it
    with np.load(tmp_path / "causal.npz") as f:
        assert int(f["format_version"]) == 1 and "decoder.lookahead" not in f.files
    with pytest.raises(PhaseDecoderError, match="lookahead"):
        PhaseDecoder(random_decoder().arrays(), -1)


@pytest.mark.parametrize("lookahead", [1, 3])
def test_lookahead_aligner_steps_the_frame_lookahead_steps_back(lookahead: int) -> None:
    """With a decoder that adds nothing (uniform), the lookahead aligner's estimate at step
    k + L is the causal aligner's at step k: the delay line carries the embedding, its
    validity and its time, lost frames included."""
    ref = make_reference(_with_lookahead(_uniform(), lookahead))
    cfg = AlignerConfig(decoder_weight=1.0, decoder_stickiness=0.0)  # a term of 0
    causal = Aligner(make_reference(_uniform()), cfg)
    late = Aligner(ref, cfg)
    assert late.lookahead == lookahead and causal.lookahead == 0
    rng = np.random.default_rng(4)
    n = 50
    q = ref.embeddings[np.minimum(np.arange(n) + rng.integers(0, 3, n), len(ref) - 1)]
    valid = rng.random(n) > 0.2
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    want = [causal.step(q[k], k / 30.0, bool(valid[k]), inputs=x[k]) for k in range(n)]
    got = [late.step(q[k], k / 30.0, bool(valid[k]), inputs=x[k]) for k in range(n)]
    assert all(e.state == "waiting" for e in got[:lookahead])
    for k in range(n - lookahead):
        a, b = want[k], got[k + lookahead]
        assert (b.phase_id, b.ref_index, b.state, b.t) == (a.phase_id, a.ref_index, a.state,
                                                            a.t)


def test_lookahead_decoder_reads_every_frame_and_reset_clears_the_line() -> None:
    ref = make_reference(_with_lookahead(random_decoder(5), 2))
    bank = AlignerBank(ref, AlignerConfig(decoder_weight=0.1))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, D_IN)).astype(np.float32)
    for k in range(6):
        bank.step_many(["s"], ref.embeddings[k][None], np.array([k / 30.0]), None, x[k][None])
    state = ref.decoder.initial_state(1)
    for k in range(6):  # the decoder read all six frames, not the four the aligner stepped
        _, state = ref.decoder.step(x[k][None], state)
    np.testing.assert_allclose(bank._sessions.dec[bank._slot["s"]], state.reshape(-1),
                               atol=1e-6)
    bank.reset("s")
    out = bank.step_many(["s"], ref.embeddings[0][None], np.array([1.0]), None, x[0][None])
    assert out[0].state == "waiting"  # the line refills after a reset


def test_references_with_different_lookaheads_are_refused() -> None:
    a = make_reference(_with_lookahead(random_decoder(), 2))
    b = make_reference(random_decoder(1))
    b.name = b.activity = "other"
    with pytest.raises(ValueError, match="different lookaheads"):
        Aligner([a, b])


def test_lookahead_training_targets_are_the_labels_lookahead_frames_back() -> None:
    spec = InputSpec(layout="h2o_hands", fps=30.0)
    demo = generate("screw_lid", np.random.default_rng(0), clean=True)
    demos = [(demo.joints, demo.phases)]
    x0, y0 = _batch(demos, spec, DecoderConfig(batch_size=3), np.random.default_rng(7))
    x3, y3 = _batch(demos, spec, DecoderConfig(batch_size=3, lookahead=3),
                    np.random.default_rng(7))
    torch.testing.assert_close(x3, x0)  # the same views
    assert (y3[:, :3] == -100).all()
    live = y0[:, 3:] >= 0  # input frame i is a real frame: its target is frame i - 3's label
    torch.testing.assert_close(y3[:, 3:][live], y0[:, :-3][live])
    assert (y3[:, 3:][~live] == -100).all()
    with pytest.raises(ValueError, match="lookahead"):
        decoder_config({"lookahead": -1})


def test_lookahead_bank_equals_single_aligners_when_sessions_step_apart() -> None:
    """Random subsets of sessions, in random order, step each round (the bank's gathered
    and in-place paths): each session's estimates are its own aligner's."""
    ref = make_reference(_with_lookahead(random_decoder(3), 2))
    cfg = AlignerConfig(decoder_weight=0.05)
    rng = np.random.default_rng(8)
    b, n = 4, 40
    bank = AlignerBank(ref, cfg)
    singles = [Aligner(ref, cfg) for _ in range(b)]
    for k in range(n):
        ids = rng.permutation(b)[:rng.integers(1, b + 1)].tolist()
        q = ref.embeddings[rng.integers(0, len(ref), len(ids))]
        x = rng.standard_normal((len(ids), D_IN)).astype(np.float32)
        valid = rng.random(len(ids)) > 0.2
        out = bank.step_many(ids, q, np.full(len(ids), k / 30.0), valid, x)
        for j, i in enumerate(ids):
            e = singles[i].step(q[j], k / 30.0, bool(valid[j]), inputs=x[j])
            np.testing.assert_equal(  # NaN t (waiting) equals NaN here
                (out[j].phase_id, out[j].ref_index, out[j].state, out[j].t),
                (e.phase_id, e.ref_index, e.state, e.t))


# -- the reported position follows a confident decoder's phase


def test_report_moves_into_a_confident_decoders_phase_and_the_tracker_stays() -> None:
    """The decoder is sure of phase 1 while the embeddings say phase 0: the reported
    position moves to phase 1's first frame (its cost term is negligible here, so the
    tracker does not move); nothing moves at decoder_phase_confidence 1, nor for a phase
    two away (the relocaliser's to judge)."""
    q = _query(make_reference(), 10)
    x = np.zeros((len(q), D_IN), np.float32)
    start = LENGTHS[0]  # phase 1's first frame
    moved = Aligner(make_reference(_confident(1)), AlignerConfig(decoder_weight=1e-6))
    kept = Aligner(make_reference(_confident(1)),
                   AlignerConfig(decoder_weight=1e-6, decoder_phase_confidence=1.0))
    far = Aligner(make_reference(_confident(2)), AlignerConfig(decoder_weight=1e-6))
    for t in range(len(q)):
        a = moved.step(q[t], t / 30.0, inputs=x[t])
        b = kept.step(q[t], t / 30.0, inputs=x[t])
        c = far.step(q[t], t / 30.0, inputs=x[t])
        assert (a.phase_id, a.ref_index, a.phase_progress) == (1, start, 0.0)
        assert b.phase_id == c.phase_id == 0 and b.ref_index < LENGTHS[0]
    # A lost frame holds the report where it was.
    held = moved.step(None, 1.0, inputs=x[0])
    assert (held.ref_index, held.state) == (start, "tracking_lost")
    with pytest.raises(ValueError, match="decoder_phase_confidence"):
        AlignerConfig(decoder_phase_confidence=1.5)


def test_report_stays_when_the_decoder_is_unsure_or_its_phase_comes_back() -> None:
    q = _query(make_reference(), 30)
    x = np.zeros((len(q), D_IN), np.float32)
    # the tracker alone (a reference with a decoder never runs the phase filter)
    plain = [e.ref_index for e in Aligner(make_reference(), AlignerConfig(phase_filter=False)
                                          ).run(q)]
    unsure = Aligner(make_reference(_uniform()), AlignerConfig(decoder_weight=1e-6))
    assert [unsure.step(q[t], t / 30.0, inputs=x[t]).ref_index
            for t in range(len(q))] == plain  # p = 1/3 everywhere: below 0.5
    twice = make_reference(_confident(1))  # phase 1 runs twice: no single range to move to
    twice.phases = np.repeat([0, 1, 2, 1], [20, 25, 10, 10])
    twice = Reference(**{f: getattr(twice, f) for f in (
        "name", "activity", "embeddings", "phases", "phase_names", "times", "fps",
        "model_fingerprint", "decoder")})
    al = Aligner(twice, AlignerConfig(decoder_weight=1e-6))
    est = [al.step(q[t], t / 30.0, inputs=x[t]) for t in range(10)]
    assert {e.phase_id for e in est} == {0}


def test_lookahead_decoder_term_waits_out_a_lost_frame() -> None:
    """With lookahead 2, the decoder's output names the frame two *read* frames back; while
    a lost frame is among the last two steps that is not the frame the aligner steps, so
    neither its cost term nor the reported phase is used (a decoder sure of phase 1
    against embeddings of phase 0 shows which)."""
    ref = make_reference(_with_lookahead(_confident(1), 2))
    q = _query(ref, 12)
    x = np.zeros((len(q), D_IN), np.float32)
    valid = np.ones(len(q), dtype=bool)
    valid[5] = False
    al = Aligner(ref, AlignerConfig(decoder_weight=1e-6))
    phases = [al.step(q[k], k / 30.0, bool(valid[k]), inputs=x[k]).phase_id
              for k in range(len(q))]
    # steps 0-1 describe no frame; 5: the newest frame is lost (no decoder output);
    # 6: frame 5 is in the line; 7: the frame stepped (5) is lost, the report holds.
    assert phases == [-1, -1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]


# -- ensembles of decoders -------------------------------------------------------------------


def test_ensemble_is_the_renormalised_mean_of_its_members_log_probabilities() -> None:
    members = [random_decoder(s) for s in (0, 1, 2)]
    ens = DecoderEnsemble(members)
    x = np.random.default_rng(3).standard_normal((30, D_IN)).astype(np.float32)
    mean = np.mean([d.run(x) for d in members], axis=0)
    want = mean - np.log(np.exp(mean).sum(axis=1, keepdims=True))
    got = ens.run(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
    # One member is the decoder itself, bit for bit.
    np.testing.assert_array_equal(DecoderEnsemble(members[:1]).run(x), members[0].run(x))


def test_mean_log_probs_of_ensembles_laid_end_to_end() -> None:
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(4), size=(5, 6))).astype(np.float32)  # (B, 6, P)
    logp[:, 5, 3] = -np.inf  # a padded phase stays impossible where every member says so
    starts = np.array([0, 1, 4])  # ensembles of 1, 3 and 2 members
    got = mean_log_probs(logp, starts)
    assert got.shape == (5, 3, 4)
    np.testing.assert_allclose(got[:, 0], logp[:, 0], atol=1e-6)
    np.testing.assert_allclose(got[:, 1], mean_log_probs(logp[:, 1:4]), atol=1e-6)
    assert np.isfinite(got[:, 2, :3]).all() and (got[:, 2, 3] == -np.inf).all()


def test_ensemble_members_must_agree() -> None:
    with pytest.raises(PhaseDecoderError, match="no decoder"):
        DecoderEnsemble([])
    with pytest.raises(PhaseDecoderError, match="member 1 has"):
        DecoderEnsemble([random_decoder(0), random_decoder(1, hidden=4)])
    with pytest.raises(PhaseDecoderError, match="member 1 has"):
        DecoderEnsemble([random_decoder(0), random_decoder(1, phases=4)])
    with pytest.raises(PhaseDecoderError, match="member 1 has"):
        DecoderEnsemble([random_decoder(0), _with_lookahead(random_decoder(1), 2)])


def test_ensemble_round_trips_as_format_3_and_one_member_as_before(tmp_path) -> None:
    members = [_with_lookahead(random_decoder(s), 2) for s in (0, 1)]
    make_reference(DecoderEnsemble(members)).save(tmp_path / "e.npz")
    back = Reference.load(tmp_path / "e.npz").decoder
    assert back.size == 2 and back.lookahead == 2
    for got, want in zip(back.members, members, strict=True):
        for k, v in want.arrays().items():
            np.testing.assert_array_equal(got.arrays()[k], v)
    with np.load(tmp_path / "e.npz") as f:
        assert int(f["format_version"]) == 3 and int(f["decoder.members"]) == 2
        assert f["decoder.w1"].shape == (2, *members[0].w1.shape)
        stored = dict(f)
    # One member is written exactly as a lone decoder (older servers read it).
    make_reference(DecoderEnsemble(members[:1])).save(tmp_path / "one.npz")
    make_reference(members[0]).save(tmp_path / "lone.npz")
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "lone.npz") as b:
        assert sorted(a.files) == sorted(b.files) and int(a["format_version"]) == 2
    for bad, said in [({"decoder.members": np.array(1)}, "members: expected one integer >= 2"),
                      ({"decoder.members": np.array(3)}, "expected 3 members")]:
        with pytest.raises(PhaseDecoderError, match=said):
            DecoderEnsemble.from_npz_members(stored | bad)


def test_aligner_runs_an_ensemble_as_the_mean_of_its_members() -> None:
    """An ensemble of two copies of one decoder is that decoder; an ensemble next to a
    lone decoder in one stack gets its own mean."""
    dec = random_decoder(3)
    cfg = AlignerConfig(decoder_weight=0.05, decoder_stickiness=0.0)
    twice = make_reference(DecoderEnsemble([dec, dec]))
    once = make_reference(dec)
    rng = np.random.default_rng(4)
    q = once.embeddings[rng.integers(0, len(once), 40)]
    x = rng.standard_normal((40, D_IN)).astype(np.float32)
    a, b = Aligner(twice, cfg), Aligner(once, cfg)
    for t in range(40):
        ea, eb = a.step(q[t], t / 30.0, inputs=x[t]), b.step(q[t], t / 30.0, inputs=x[t])
        assert (ea.phase_id, ea.state) == (eb.phase_id, eb.state)
        assert ea.progress == pytest.approx(eb.progress, abs=1e-6)
        np.testing.assert_allclose(a._sessions.dec_added[0], b._sessions.dec_added[0],
                                   atol=1e-5)
    other = random_decoder(4)
    refs = [make_reference(DecoderEnsemble([dec, other])), make_reference(dec)]
    refs[1].name = refs[1].activity = "second"
    al = Aligner(refs, cfg)
    assert len(al._model.decoders) == 1 and al._model.decoders[0].k == 3
    ens = refs[0].decoder
    state = ens.initial_state(1)
    for t in range(8):
        al.step(refs[0].embeddings[t], t / 30.0, inputs=x[t])
        logp, state = ens.step(x[t][None], state)
        rel = logp[0] - logp[0].max()
        cols = al._model.ref_cols[0]
        np.testing.assert_allclose(al._sessions.dec_added[0][cols],
                                   -0.05 * rel[refs[0].phases], atol=1e-5)


def _sticky_argmax(logp: np.ndarray, stick: float) -> list[int]:
    """Each frame's phase with ``stick`` added to the phase named on the frame before."""
    out: list[int] = []
    for row in logp:
        row = row.copy()
        if out:
            row[out[-1]] += stick
        out.append(int(row.argmax()))
    return out


def _swinging(seed: int) -> PhaseDecoder:
    """A random decoder with its input and output layers amplified: its phase changes
    with the input from frame to frame."""
    arrays = random_decoder(seed).arrays()
    arrays["w1"], arrays["wo"] = 5.0 * arrays["w1"], 20.0 * arrays["wo"]
    return PhaseDecoder(arrays)


def test_stickiness_keeps_the_decoders_phase_until_another_is_that_much_likelier() -> None:
    dec = _swinging(6)
    ref = make_reference(dec)
    rng = np.random.default_rng(6)
    n = 60
    x = rng.standard_normal((n, D_IN)).astype(np.float32)
    q = ref.embeddings[rng.integers(0, len(ref), n)]
    logp = dec.run(x)
    want = _sticky_argmax(logp, 0.7)
    assert want != logp.argmax(axis=1).tolist()  # the hysteresis changes the phases here
    w = 0.1
    al = Aligner(ref, AlignerConfig(decoder_weight=w, decoder_stickiness=0.7))
    sessions = al._sessions
    for t in range(n):
        al.step(q[t], t / 30.0, inputs=x[t])
        assert sessions.dec_best[0, 0] == want[t]
        # The phase's confidence is its own probability, without the bonus ...
        assert sessions.dec_top[0, 0] == pytest.approx(logp[t, want[t]], abs=1e-5)
        # ... and the cost term is relative to the named phase, bonus included: 0 on
        # it, at most w x 0.7 more elsewhere than without stickiness.
        sticky = logp[t].copy()
        if t:
            sticky[want[t - 1]] += 0.7
        np.testing.assert_allclose(sessions.dec_added[0][al._model.ref_cols[0]],
                                   -w * (sticky - sticky.max())[ref.phases], atol=1e-5)
    al.reset()
    assert sessions.dec_last[0, 0] == -1  # a reset forgets the last phase
    plain = Aligner(ref, AlignerConfig())
    for t in range(5):
        plain.step(q[t], t / 30.0, inputs=x[t])
        assert plain._sessions.dec_best[0, 0] == logp[t].argmax()
    with pytest.raises(ValueError, match="decoder_stickiness"):
        AlignerConfig(decoder_stickiness=-0.1)

"""Reference building: the stored embeddings are what the engine computes live."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.reference import (  # noqa: E402
    ReferenceBuildError,
    average_demos,
    build_reference,
    decoder_members_meta,
    reference_from_demos,
)
from masa_rt.align import Reference  # noqa: E402
from masa_rt.checkpoint import load_model, save_checkpoint  # noqa: E402
from masa_rt.cli import main  # noqa: E402
from masa_rt.model import MasaConfig, MasaModel  # noqa: E402
from masa_rt.preprocess import InputSpec, frame_features  # noqa: E402
from masa_rt.sequence import Sequence, save_sequence  # noqa: E402
from trainer.phase_decoder import DecoderConfig  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = MasaConfig(num_joints=21, joint_dims=3, d_model=32, n_heads=4, ffn_dim=64,
                     n_layers=2, window=8, proj_dim=32, proj_layers=2)
    path = tmp_path_factory.mktemp("ref") / "m.pt"
    save_checkpoint(path, MasaModel(cfg).eval(), cfg,
                    InputSpec(layout="mediapipe_hand21", fps=30.0))
    return path


def _demo(path, n: int, fps: float, seed: int, phases: bool = True,
          activity: str = "pour_milk"):
    rng = np.random.default_rng(seed)
    joints = np.cumsum(rng.normal(0, 0.05, (n, 21, 3)), axis=0).astype(np.float32)
    extra = dict(phases=(np.arange(n) * 3 // n).astype(np.int32),
                 phase_names=("reach", "pour", "place")) if phases else {}
    save_sequence(path, Sequence(joints=joints, layout="mediapipe_hand21", fps=fps,
                                 activity=activity, **extra))
    return joints


def test_reference_holds_the_offline_causal_embeddings(ckpt, tmp_path):
    joints = _demo(tmp_path / "d1.npz", 45, 30.0, 1)
    _demo(tmp_path / "d2.npz", 100, 60.0, 2)  # another rate: resampled to the model's 30 Hz
    ref = build_reference([tmp_path / "d1.npz", tmp_path / "d2.npz"], ckpt,
                          tmp_path / "pour.npz", policy="first", decoder={"steps": 0})
    loaded = Reference.load(tmp_path / "pour.npz")
    model, _cfg, spec, meta = load_model(ckpt)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(frame_features(joints, spec))[None])[0].numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.embeddings, want, atol=1e-5)
    assert loaded.model_fingerprint == meta["model_fingerprint"] == ref.model_fingerprint
    assert (loaded.activity, loaded.phase_names, loaded.fps) == (
        "pour_milk", ["reach", "pour", "place"], 30.0)
    np.testing.assert_array_equal(loaded.phases, np.arange(45) * 3 // 45)
    np.testing.assert_allclose(loaded.times, np.arange(45) / 30.0)
    (other,) = loaded.meta["other_demos"]
    assert other["frames"] == 50 and other["dtw_cost_to_first"] >= 0.0
    assert loaded.meta["policy"] == "first demo"


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_medoid_average_of_identical_demos_is_the_demo(ckpt, tmp_path):
    joints = _demo(tmp_path / "a.npz", 40, 30.0, 5)
    _demo(tmp_path / "b.npz", 40, 30.0, 5)  # the same recording twice
    ref = build_reference([tmp_path / "a.npz", tmp_path / "b.npz"], ckpt, tmp_path / "r.npz",
                          decoder={"steps": 0})
    loaded = Reference.load(tmp_path / "r.npz")
    model, _cfg, spec, _meta = load_model(ckpt)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(frame_features(joints, spec))[None])[0].numpy()
    np.testing.assert_allclose(loaded.embeddings, _unit(want), atol=1e-5)
    np.testing.assert_array_equal(loaded.phases, np.arange(40) * 3 // 40)
    np.testing.assert_allclose(loaded.times, np.arange(40) / 30.0)
    meta = loaded.meta
    assert meta["policy"] == ref.meta["policy"] == "medoid average"
    assert [d["medoid"] for d in meta["demos"]] == [True, False]
    for d in meta["demos"]:
        assert abs(d["dtw_cost_to_medoid"]) < 1e-6 and abs(d["dtw_cost_to_average"]) < 1e-6


def _warp(x, n, power):
    """``x`` resampled to ``n`` frames along the monotonic warp ``u ** power``."""
    u = (np.linspace(0, 1, n) ** power) * (len(x) - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, len(x) - 1)
    f = (u - lo)[:, None]
    return _unit((1 - f) * x[lo] + f * x[hi])


@pytest.mark.parametrize("refine", [0, 1, 2])
def test_time_warped_copies_average_onto_the_medoid_timeline(refine):
    rng = np.random.default_rng(0)
    base = np.cumsum(rng.normal(size=(80, 16)), axis=0) + 5 * rng.normal(size=(1, 16))
    base = _unit(base)
    slow, fast = _warp(base, 110, 1.4), _warp(base, 60, 0.7)  # 1.4x longer, 0.75x shorter
    avg, medoid, info = average_demos([slow, base, fast], refine=refine)
    assert medoid == 1 and avg.shape == base.shape  # the unwarped one is in the middle
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1.0, atol=1e-5)
    assert np.sum(avg * base, axis=1).min() > 0.99
    assert info["refine"] == refine and len(info["cost_to_average"]) == 3
    # forcing the timeline: the average lives on the slow copy's 110 frames
    avg_slow, medoid, _ = average_demos([slow, base, fast], refine=refine, medoid=0)
    assert medoid == 0 and avg_slow.shape == slow.shape
    assert np.sum(avg_slow * slow, axis=1).min() > 0.99


def test_reference_from_demos_keeps_the_medoid_labels():
    rng = np.random.default_rng(1)
    base = _unit(np.cumsum(rng.normal(size=(50, 8)), axis=0) + 4 * rng.normal(size=(1, 8)))
    demos = []
    for n, power in ((70, 1.3), (50, 1.0), (40, 0.8)):
        demos.append({"embeddings": _warp(base, n, power),
                      "phases": (np.arange(n) * 2 // n).astype(np.int32),
                      "times": np.arange(n) / 30.0})
    ref = reference_from_demos(demos, ["a", "b"], activity="act", name="act", fps=30.0,
                               labels=["slow", "mid", "fast"])
    assert ref.meta["demo"] == "mid" and ref.meta["medoid_index"] == 1 and len(ref) == 50
    np.testing.assert_array_equal(ref.phases, demos[1]["phases"])
    np.testing.assert_allclose(ref.times, demos[1]["times"])
    with pytest.raises(ValueError, match="policy"):
        reference_from_demos(demos, ["a", "b"], activity="act", name="act", fps=30.0,
                             labels=["slow", "mid", "fast"], policy="mean")


def test_demos_of_different_activities_are_refused(ckpt, tmp_path):
    _demo(tmp_path / "a.npz", 30, 30.0, 6)
    _demo(tmp_path / "b.npz", 30, 30.0, 7, activity="stir_cup")
    for policy in ("medoid", "first"):
        with pytest.raises(ReferenceBuildError, match="one reference per activity"):
            build_reference([tmp_path / "a.npz", tmp_path / "b.npz"], ckpt,
                            tmp_path / "r.npz", policy=policy, decoder={"steps": 0})
    assert not (tmp_path / "r.npz").exists()


def test_demo_without_phases_is_refused(ckpt, tmp_path):
    _demo(tmp_path / "d.npz", 20, 30.0, 3, phases=False)
    with pytest.raises(ReferenceBuildError, match="no phase labels"):
        build_reference([tmp_path / "d.npz"], ckpt, tmp_path / "r.npz", decoder={"steps": 0})
    assert not (tmp_path / "r.npz").exists()


def test_cli_reference_build(ckpt, tmp_path, capsys):
    _demo(tmp_path / "d.npz", 20, 30.0, 4)
    assert main(["reference", "build", str(tmp_path / "d.npz"), "--checkpoint", str(ckpt),
                 "-o", str(tmp_path / "r.npz"), "--decoder-steps", "3",
                 "--decoder-edit-prob", "0.5", "--decoder-hidden", "8",
                 "--no-decoder-retime", "--decoder-bone-jitter", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "pour_milk, 20 frames, 3 phases" in out
    assert "one demo: record and label one or two more" in out  # no estimate from one
    ref = Reference.load(tmp_path / "r.npz")
    assert len(ref) == 20 and "leave_one_out" not in ref.meta
    assert ref.decoder is not None and ref.decoder.num_phases == 3
    assert ref.meta["phase_decoder"]["steps"] == 3
    assert ref.meta["phase_decoder"]["edit_prob"] == 0.5
    assert ref.meta["phase_decoder"]["hidden"] == 8 == ref.decoder.hidden
    assert ref.meta["phase_decoder"]["retime"] is False  # on by default, off by flag
    assert ref.meta["phase_decoder"]["bone_jitter"] == 0.05
    assert ref.meta["phase_decoder"]["finger_jitter"] == 0.0
    # Finger jitter reads two MANO hands; this model's single hand is refused, by name.
    assert main(["reference", "build", str(tmp_path / "d.npz"), "--checkpoint", str(ckpt),
                 "-o", str(tmp_path / "f.npz"), "--decoder-steps", "3",
                 "--decoder-finger-jitter", "0.05"]) != 0
    assert "finger_jitter needs a h2o_hands model" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()


def test_cli_reference_build_ensemble_and_combine(ckpt, tmp_path, capsys):
    """--decoder-members M trains M seeds; `reference ensemble` combines references built
    apart into the same ensemble, and refuses references of another demo."""
    _demo(tmp_path / "d.npz", 20, 30.0, 4)
    common = ["--checkpoint", str(ckpt), "--decoder-steps", "2", "--decoder-hidden", "8"]
    assert main(["reference", "build", str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "two.npz"), "--decoder-members", "2", *common]) == 0
    two = Reference.load(tmp_path / "two.npz")
    assert two.decoder.size == 2
    assert [m["seed"] for m in decoder_members_meta(two)] == [0, 1]
    assert main(["reference", "build", str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "one.npz"), *common]) == 0
    one = Reference.load(tmp_path / "one.npz")
    assert one.decoder.size == 1 and decoder_members_meta(one)[0]["seed"] == 0
    assert main(["reference", "build", str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "s1.npz"), "--decoder-seed", "1", *common]) == 0
    capsys.readouterr()
    # Built apart and combined = built together: the same members, bit for bit.
    assert main(["reference", "ensemble", str(tmp_path / "one.npz"), str(tmp_path / "s1.npz"),
                 str(tmp_path / "two.npz"), "-o", str(tmp_path / "four.npz")]) == 0
    assert "an ensemble of 4 phase decoders" in capsys.readouterr().out
    four = Reference.load(tmp_path / "four.npz")
    assert [m["seed"] for m in decoder_members_meta(four)] == [0, 1, 0, 1]
    for got, want in zip(four.decoder.members, two.decoder.members * 2, strict=True):
        for k, v in want.arrays().items():
            np.testing.assert_array_equal(got.arrays()[k], v)
    _demo(tmp_path / "e.npz", 24, 30.0, 5)
    build_reference([tmp_path / "e.npz"], ckpt, tmp_path / "other.npz",
                    decoder={"steps": 2, "hidden": 8})
    build_reference([tmp_path / "d.npz"], ckpt, tmp_path / "bare.npz", decoder={"steps": 0})
    for refs, said in [(["one.npz", "other.npz"], "not the same reference as"),
                       (["one.npz", "bare.npz"], "no phase decoder in"),
                       (["one.npz"], "two or more")]:
        assert main(["reference", "ensemble", *(str(tmp_path / r) for r in refs),
                     "-o", str(tmp_path / "x.npz")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_cli_reference_build_several_demos(ckpt, tmp_path, capsys):
    _demo(tmp_path / "a.npz", 30, 30.0, 8)
    _demo(tmp_path / "b.npz", 36, 30.0, 9)
    _demo(tmp_path / "c.npz", 24, 30.0, 10)
    assert main(["reference", "build", *(str(tmp_path / f"{k}.npz") for k in "abc"),
                 "--checkpoint", str(ckpt), "-o", str(tmp_path / "r.npz"),
                 "--refine", "2", "--decoder-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "medoid average of 3 demos" in out
    ref = Reference.load(tmp_path / "r.npz")
    assert len(ref) in (30, 36, 24) and ref.meta["demo"] in out
    assert "2 refinement rounds" in ref.meta["policy_detail"]
    assert len(ref.meta["demos"]) == 3 and sum(d["medoid"] for d in ref.meta["demos"]) == 1
    # the estimate on the user's own takes: printed and kept
    check = ref.meta["leave_one_out"]
    assert [d["file"] for d in check["per_demo"]] == [str(tmp_path / f"{k}.npz") for k in "abc"]
    assert f"leave-one-out on your 3 demos: {check['phase_acc_pct']:.1f} %" in out


def test_output_that_is_an_input_or_a_folder_is_refused(ckpt, tmp_path, monkeypatch, capsys):
    _demo(tmp_path / "d.npz", 30, 30.0, 4)
    before = (tmp_path / "d.npz").read_bytes()
    monkeypatch.chdir(tmp_path)
    for out, said in [("./d.npz", "output d.npz is also an input (d.npz)"),
                      (str(ckpt), "is also an input"), (".", "is a directory")]:
        assert main(["reference", "build", "d.npz", "--checkpoint", str(ckpt), "-o", out]) == 2
        assert said in capsys.readouterr().err
    assert (tmp_path / "d.npz").read_bytes() == before
    _demo(tmp_path / "other.npz", 30, 30.0, 4)  # another recording: not replaced either
    assert main(["reference", "build", "d.npz", "--checkpoint", str(ckpt), "-o",
                 "other.npz"]) == 2
    assert "exists and is not a reference" in capsys.readouterr().err
    with pytest.raises(ValueError, match="refine: expected >= 0"):
        build_reference([tmp_path / "d.npz"], ckpt, tmp_path / "r.npz", refine=-2)


@pytest.mark.parametrize("flag, value, said", [
    ("--refine", "-2", "expected an integer >= 0, found '-2'"),
    ("--decoder-steps", "-1", "expected an integer >= 0"),
    ("--decoder-edit-prob", "1.5", "expected a finite number >= 0 and <= 1"),
    ("--decoder-hidden", "0", "expected an integer >= 1"),
])
def test_reference_build_refuses_bad_numbers(tmp_path, capsys, flag, value, said):
    with pytest.raises(SystemExit) as info:
        main(["reference", "build", "d.npz", "-o", "r.npz", flag, value])
    assert info.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err


def test_a_reference_given_as_a_demo_says_what_it_is(ckpt, tmp_path):
    _demo(tmp_path / "d.npz", 30, 30.0, 4)
    build_reference([tmp_path / "d.npz"], ckpt, tmp_path / "r.npz", decoder={"steps": 0})
    with pytest.raises(ValueError, match="found a built reference"):
        build_reference([tmp_path / "r.npz"], ckpt, tmp_path / "r2.npz", decoder={"steps": 0})


def test_shipped_references_belong_to_the_shipped_model():
    """examples/*.npz and examples/lookahead3/*.npz: built by the shipped model from the same
    demos (same embeddings), the second set's decoders with 3 frames of lookahead; each an
    ensemble of decoders as scripts/build_shipped_model.sh builds them (three causal, two
    with lookahead)."""
    from pathlib import Path

    from masa_rt.checkpoint import default_model_path, model_fingerprint

    root = Path(__file__).resolve().parents[1] / "examples"
    fingerprint = model_fingerprint(default_model_path())
    causal = sorted(root.glob("*.npz"))
    assert len(causal) == 6
    for path in causal:
        ref, late = Reference.load(path), Reference.load(root / "lookahead3" / path.name)
        assert ref.model_fingerprint == late.model_fingerprint == fingerprint
        assert ref.decoder.lookahead == 0 and late.decoder.lookahead == 3
        # Trained as today's defaults train them (the retimed replays), but for the flags
        # the script gives: (bone jitter, finger jitter, steps, seed) of each member (a
        # member built before finger jitter and seeds were recorded had none and seed 0).
        default = DecoderConfig()
        recipes = [(ref, [(0.08, 0.05, default.steps, 0), (0.0, 0.0, 8000, 0),
                          (0.08, 0.05, default.steps, 1)]),
                   (late, [(0.08, 0.05, default.steps, 0), (0.0, 0.0, default.steps, 0)])]
        for shipped, recipe in recipes:
            members = decoder_members_meta(shipped)
            assert shipped.decoder.size == len(members) == len(recipe)
            assert [(m["bone_jitter"], m.get("finger_jitter") or 0.0, m["steps"],
                     m.get("seed", 0)) for m in members] == recipe
            assert all(m["retime"] is True and m["hidden"] == default.hidden
                       and m["edit_prob"] == default.edit_prob for m in members)
        np.testing.assert_allclose(late.embeddings, ref.embeddings, atol=1e-5)  # other builds
        np.testing.assert_array_equal(late.phases, ref.phases)

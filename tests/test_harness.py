"""Streaming accuracy harness: complete report, values in range, a known answer."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine import harness_commands  # noqa: E402
from engine.harness import (  # noqa: E402
    METHODS,
    SCENARIOS,
    Scenario,
    embed_learned,
    embed_raw,
    make_references,
    markdown_table,
    run_engine_check,
    run_harness,
    write_outputs,
)
from masa_rt.checkpoint import model_fingerprint, save_checkpoint  # noqa: E402
from masa_rt.model import MasaConfig, MasaModel  # noqa: E402
from masa_rt.preprocess import InputSpec  # noqa: E402

ACTIVITY = "screw_lid"  # the shortest hand activity
SPEC = InputSpec(layout="h2o_hands", fps=30.0)


def _tiny():
    torch.manual_seed(0)
    cfg = MasaConfig(num_joints=42, joint_dims=3, d_model=16, n_heads=2, ffn_dim=32,
                     n_layers=2, window=8, proj_dim=16, proj_layers=1)
    return MasaModel(cfg).eval(), cfg


@pytest.fixture(scope="module")
def report():
    model, _ = _tiny()
    return run_harness(model, SPEC, activities=[ACTIVITY], per_activity=2, seed=3,
                       keep_streams=True)


def test_report_has_every_scenario_and_method_in_range(report):
    res = report["results"]
    assert set(res) == set(SCENARIOS)
    for scen, by_method in res.items():
        assert set(by_method) == set(METHODS), scen
        for method, r in by_method.items():
            assert r["streams"] == 2
            assert 0.0 <= r["phase_acc_pct"] <= 100.0
            lo, hi = r["phase_acc_ci95_pct"]  # two streams: an interval around the estimate
            assert 0.0 <= lo <= r["phase_acc_pct"] <= hi <= 100.0, (scen, method)
            assert 0.0 <= r["progress_mae_pct"] <= 100.0
            assert math.isnan(r["delay_frames"]) or r["delay_frames"] >= 0.0
            assert 0.0 <= r["missed_changes_pct"] <= 100.0
            # one reference loaded: activity identification is trivially right
            assert r["activity_frame_acc_pct"] == 100.0, (scen, method)
            assert r["activity_final_acc_pct"] == 100.0
    # built as a user builds one: from an ordinary training performance, not the clean demo
    assert not report["canonical"] and "ordinary" in report["reference"]
    assert report["reference_medoid"][ACTIVITY].startswith("train seed 0 ")
    assert "reference_canonical_time_vs_frame_max_abs" not in report


def test_the_canonical_reference_is_an_option_labelled_as_such():
    rep = run_harness(None, SPEC, activities=[ACTIVITY], per_activity=1, seed=3,
                      scenarios=[SCENARIOS["clean"]], canonical=True)
    assert rep["canonical"] and "canonical demonstration" in rep["reference"]
    # the reference is the clean demo: canonical time == frame / (T - 1)
    assert max(rep["reference_canonical_time_vs_frame_max_abs"].values()) < 1e-6
    with pytest.raises(ValueError, match="canonical reference is one demo"):
        run_harness(None, SPEC, activities=[ACTIVITY], scenarios=[SCENARIOS["clean"]],
                    canonical=True, reference_demos=2)


def test_scenarios_do_what_they_say(report):
    streams = {s.scenario: [] for s in report["_streams"]}
    for s in report["_streams"]:
        streams[s.scenario].append(s)
    for s in streams["nan_joints"]:
        assert s.lost.sum() >= 29  # the 1 s burst (30 frames, minus what the edge clips)
        assert np.isnan(s.joints[~s.lost]).mean() > 0.05
    clean_len = np.mean([len(s) for s in streams["clean"]])
    for s in streams["dropped"]:
        gaps = np.diff(s.times) * SPEC.fps
        assert gaps.max() > 1.5  # frames are missing, times are the true ones
        assert len(s) < 0.9 * (s.times[-1] * SPEC.fps + 1)
    for s in streams["restart"]:
        assert (np.diff(s.phases) < 0).any() and len(s) > 0.8 * clean_len
    for s in streams["skip"]:
        assert (np.diff(s.phases) > 1).any()
    for s in streams["repeat"]:
        assert (np.diff(s.progress) < 0).any()
    for s in report["_streams"]:
        assert 0.0 <= s.progress.min() and s.progress.max() <= 1.0


def test_known_answer_identical_stream_with_raw_keypoints():
    """A clean stream is the reference itself: streaming is near perfect, DTW exact."""
    identical = Scenario("identical", "the clean demo itself", clean=True)
    rep = run_harness(None, SPEC, activities=[ACTIVITY], per_activity=2,
                      scenarios=[identical], canonical=True)
    raw, dtw = rep["results"]["identical"]["raw"], rep["results"]["identical"]["offline_dtw"]
    assert raw["phase_acc_pct"] >= 95.0
    assert raw["progress_mae_pct"] <= 1.0
    assert raw["missed_changes_pct"] == 0.0
    assert dtw["phase_acc_pct"] >= 99.0
    assert dtw["progress_mae_pct"] <= 0.1
    assert set(rep["results"]["identical"]) == {"raw", "offline_dtw"}  # no model, no learned


def test_aligner_changes_reach_every_method():
    """``aligner`` changes the settings the methods run with (here a tracker that may
    not move on: the identical stream is then scored badly)."""
    identical = Scenario("identical", "the clean demo itself", clean=True)
    kwargs = dict(activities=[ACTIVITY], per_activity=1, scenarios=[identical], canonical=True)
    base = run_harness(None, SPEC, **kwargs)["results"]["identical"]["raw"]
    stuck = run_harness(None, SPEC, aligner={"max_step": 1, "stay_penalty": 0.0,
                                             "relocalise_cost_margin": 1.0, "band": 1,
                                             "back": 0}, **kwargs)
    assert stuck["aligner_changes"] == {"max_step": 1, "stay_penalty": 0.0,
                                        "relocalise_cost_margin": 1.0, "band": 1, "back": 0}
    assert stuck["results"]["identical"]["raw"]["phase_acc_pct"] != base["phase_acc_pct"]


def test_outputs_are_strict_json_and_a_table(report, tmp_path):
    json_path, md_path = write_outputs(report, tmp_path, "masa-rt harness", "tiny")
    data = json.loads(json_path.read_text())  # allow_nan=False on write: strict JSON
    assert "_streams" not in data and set(data["results"]) == set(SCENARIOS)
    table = markdown_table(report)
    assert len(table.splitlines()) == 2 + len(SCENARIOS) * len(METHODS)
    text = md_path.read_text()
    assert table in text and "phase acc %" in text


def test_cli(tmp_path, capsys):
    model, cfg = _tiny()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, cfg, SPEC)
    parser = argparse.ArgumentParser(prog="masa-rt")
    harness_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["harness", "--checkpoint", str(ckpt), "--per-activity", "1",
                              "--activities", ACTIVITY, "--scenarios", "clean", "skip",
                              "--out", str(tmp_path / "out"), "--decoder-steps", "2",
                              "--engine", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| clean | learned |" in out and "| skip | offline_dtw |" in out
    data = json.loads((tmp_path / "out" / "streaming_results.json").read_text())
    assert set(data["results"]) == {"clean", "skip"}
    assert data["model"]["fingerprint"]
    # The references carried phase decoders, and the ONNX serving path agreed with them.
    assert data["engine_check"]["phase_equal_pct"] == 100.0
    bad = parser.parse_args(["harness", "--checkpoint", str(ckpt), "--scenarios", "nope"])
    with pytest.raises(ValueError, match="unknown"):
        bad.func(bad)


def test_multi_demo_reference_from_training_demos(tmp_path):
    """--reference-demos K: the medoid average of K train-split demos, the CLI's build path,
    one timeline (and one ground truth) for every method."""
    model, cfg = _tiny()
    rep = run_harness(model, SPEC, activities=[ACTIVITY], per_activity=1, seed=3,
                      scenarios=[SCENARIOS["clean"]], reference_demos=3, keep_streams=True)
    assert rep["reference_demos"] == 3 and "medoid average of 3" in rep["reference"]
    learned, raw = rep["_refs"]["learned"][ACTIVITY], rep["_refs"]["raw"][ACTIVITY]
    assert learned.meta["policy"] == raw.meta["policy"] == "medoid average"
    assert learned.meta["demo"] == raw.meta["demo"] == rep["reference_medoid"][ACTIVITY]
    assert learned.meta["demo"].startswith("train seed 0 ")  # never the val namespace
    assert len(learned.meta["demos"]) == 3 and len(learned) == len(raw)
    for r in rep["results"]["clean"].values():
        assert 0.0 <= r["phase_acc_pct"] <= 100.0 and 0.0 <= r["progress_mae_pct"] <= 100.0
    s = rep["_streams"][0]
    assert 0.0 <= s.progress.min() and s.progress.max() <= 1.0
    write_outputs(rep, tmp_path, "masa-rt harness --reference-demos 3", "tiny")
    md = (tmp_path / "streaming_results.md").read_text()
    assert "medoid average of 3 ordinary training demos" in md
    with pytest.raises(ValueError, match="reference_demos"):
        run_harness(None, SPEC, activities=[ACTIVITY], per_activity=1,
                    scenarios=[SCENARIOS["clean"]], reference_demos=31)


def test_decoder_demos_train_the_decoder_on_more_labelled_demos():
    """--decoder-demos K: the reference stays the clean demo; its decoder also learns from
    training demos 0..K-2 (as `reference build CLEAN D0 .. --policy first`)."""
    model, _cfg = _tiny()
    embedders = {"learned": embed_learned(model), "raw": embed_raw}
    one, canon_one = make_references([ACTIVITY], SPEC, embedders, decoder={"steps": 2},
                                     canonical=True)
    three, canon_three = make_references([ACTIVITY], SPEC, embedders, decoder={"steps": 2},
                                         decoder_demos=3, canonical=True)
    assert one["learned"][ACTIVITY].meta["phase_decoder"]["demos"] == 1
    assert three["learned"][ACTIVITY].meta["phase_decoder"]["demos"] == 3
    np.testing.assert_array_equal(three["learned"][ACTIVITY].embeddings,
                                  one["learned"][ACTIVITY].embeddings)
    np.testing.assert_array_equal(canon_three[ACTIVITY], canon_one[ACTIVITY])
    with pytest.raises(ValueError, match="decoder_demos"):
        make_references([ACTIVITY], SPEC, embedders, decoder={"steps": 2}, decoder_demos=2)


def test_cli_scores_prebuilt_references(tmp_path, capsys):
    """--references DIR: the built references (decoders included) are scored as they are,
    no decoder trained; another demo's or another model's reference is refused."""
    model, cfg = _tiny()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, cfg, SPEC)
    embedders = {"learned": embed_learned(model)}
    built, _ = make_references([ACTIVITY], SPEC, embedders, model_fingerprint(ckpt),
                               decoder={"steps": 2}, canonical=True)
    (tmp_path / "refs").mkdir()
    built["learned"][ACTIVITY].save(tmp_path / "refs" / f"{ACTIVITY}.npz")
    parser = argparse.ArgumentParser(prog="masa-rt")
    harness_commands.register(parser.add_subparsers(dest="command"))
    common = ["harness", "--checkpoint", str(ckpt), "--per-activity", "1", "--activities",
              ACTIVITY, "--scenarios", "clean", "--out", str(tmp_path / "out")]
    args = parser.parse_args([*common, "--references", str(tmp_path / "refs"), "--engine", "1"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "out" / "streaming_results.json").read_text())
    assert "prebuilt (--references)" in data["reference"] and '"steps": 2' in data["reference"]
    assert data["engine_check"]["phase_equal_pct"] == 100.0  # the decoder was served too
    capsys.readouterr()
    # The same decoder scored through run_harness equals the CLI's run.
    rep = run_harness(model, SPEC, activities=[ACTIVITY], per_activity=1,
                      scenarios=[SCENARIOS["clean"]], references=built["learned"])
    assert rep["results"]["clean"]["learned"]["phase_acc_pct"] == pytest.approx(
        data["results"]["clean"]["learned"]["phase_acc_pct"])
    # Another model's embeddings of the demo: refused, the truth would not map onto it.
    other = MasaModel(cfg).eval()
    foreign, _ = make_references([ACTIVITY], SPEC, {"learned": embed_learned(other)},
                                 canonical=True)
    with pytest.raises(ValueError, match="not the harness's reference"):
        run_harness(model, SPEC, activities=[ACTIVITY], per_activity=1,
                    scenarios=[SCENARIOS["clean"]], references=foreign["learned"])
    with pytest.raises(ValueError, match="none given"):
        run_harness(model, SPEC, activities=[ACTIVITY], per_activity=1,
                    scenarios=[SCENARIOS["clean"]], references={})
    mixed = parser.parse_args([*common, "--references", str(tmp_path / "refs"),
                               "--decoder-steps", "5"])
    with pytest.raises(ValueError, match="no --decoder-"):
        mixed.func(mixed)
    missing = parser.parse_args([*common, "--references", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=f"{ACTIVITY}.npz"):
        missing.func(missing)


def test_lookahead_decoders_through_the_harness_and_the_serving_path(tmp_path):
    """Decoders with lookahead 2: every frame still gets a prediction (the last two from
    the end-of-stream steps), and the ONNX + Pipeline path answers frame k with the
    harness's estimate of frame k - 2."""
    model, cfg = _tiny()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, cfg, SPEC)
    rep = run_harness(model, SPEC, activities=[ACTIVITY], per_activity=1, seed=3,
                      scenarios=[SCENARIOS["clean"]], keep_streams=True,
                      fingerprint=model_fingerprint(ckpt),
                      decoder={"steps": 2, "lookahead": 2})
    ref = rep["_refs"]["learned"][ACTIVITY]
    assert ref.decoder.lookahead == 2 and ref.meta["phase_decoder"]["lookahead"] == 2
    stream, pred = rep["_streams"][0], rep["_preds"]["learned"][0]
    assert len(pred.phase) == len(stream) and (pred.phase >= 0).all()
    check = run_engine_check(ckpt, [stream], rep["_refs"]["learned"], [pred])
    # The lag comes from each session's welcome (lookahead_s), as clients are told it.
    assert check["lookahead"] == 2 and check["answered"] == len(stream) - 2
    assert rep["lookahead"] == 2
    write_outputs(rep, tmp_path, "masa-rt harness --decoder-lookahead 2", "tiny")
    assert "- lookahead: 2 frames" in (tmp_path / "streaming_results.md").read_text()
    assert check["phase_equal_pct"] == 100.0 and check["progress_max_abs_diff"] < 1e-3

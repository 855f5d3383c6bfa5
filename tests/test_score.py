"""``masa-rt score``: known answers of the one scorer, and a real run through the serving
pipeline with the shipped model on labelled synthetic recordings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.score import Recording, _described_truth, true_progress
from masa_rt.align import Reference
from masa_rt.metrics import paired_accuracy_difference_ci, streaming_summary


def _truth() -> np.ndarray:
    return np.repeat([0, 1, 2, 3], 25)  # 100 frames, 3 phase changes


def test_a_perfect_prediction_scores_100_with_no_delay():
    t = _truth()
    s = streaming_summary([t, t], [t.copy(), t.copy()])
    assert s["phase_acc_pct"] == 100.0
    assert s["delay_frames"] == 0.0 and s["missed_changes_pct"] == 0.0
    assert s["phase_changes"] == 6 and s["frames"] == 200


def test_a_prediction_late_by_k_frames_loses_k_per_change_and_is_k_late():
    t = _truth()
    for k in (1, 3, 7):
        late = np.concatenate([np.full(k, -1), t[:-k]])  # the first k frames: no answer
        s = streaming_summary([t], [late])
        # wrong: the first k frames (waiting) and k frames after each of the 3 changes
        assert s["phase_acc_pct"] == pytest.approx(100.0 * (100 - 4 * k) / 100)
        assert s["delay_frames"] == k and s["missed_changes_pct"] == 0.0


def test_a_skipped_phase_counts_as_missed():
    t = _truth()
    pred = np.where(t == 2, 1, t)  # never reports phase 2
    s = streaming_summary([t], [pred])
    assert s["missed_changes_pct"] == pytest.approx(100 / 3)
    assert s["phase_acc_pct"] == 75.0


def test_progress_error_ignores_undefined_frames():
    t = _truth()
    true_p = np.linspace(0, 1, 100)
    pred_p = true_p + 0.1
    pred_p[:10] = np.nan  # no answer yet
    s = streaming_summary([t], [t], [true_p], [pred_p])
    assert s["progress_mae_pct"] == pytest.approx(10.0)
    assert s["progress_frames"] == 90


def test_the_paired_difference_of_a_method_with_itself_is_zero():
    rng = np.random.default_rng(0)
    truths = [_truth() for _ in range(8)]
    preds = [np.where(rng.random(100) < 0.8, t, -1) for t in truths]
    lo, hi = paired_accuracy_difference_ci(truths, preds, preds)
    assert lo == hi == 0.0
    better = [t.copy() for t in truths]
    lo, hi = paired_accuracy_difference_ci(truths, better, preds)
    assert 0.0 < lo <= hi  # perfect against ~80 %: clearly better on every resample


def _reference(phases: np.ndarray) -> Reference:
    t = len(phases)
    return Reference(name="r", activity="a", embeddings=np.eye(t, 4, dtype=np.float32) + 1,
                     phases=phases, phase_names=["p0", "p1", "p2"],
                     times=np.arange(t) / 30.0, fps=30.0)


def test_true_progress_maps_each_phase_run_onto_the_reference_run():
    ref = _reference(np.repeat([0, 1, 2], [10, 20, 10]))  # 40 frames
    q = np.repeat([0, 1, 2], [5, 5, 30])
    p = true_progress(q, ref)
    assert p[0] == 0.0 and p[-1] == 1.0
    assert p[4] == pytest.approx(9 / 39) and p[5] == pytest.approx(10 / 39)
    assert p[9] == pytest.approx(29 / 39) and p[10] == pytest.approx(30 / 39)
    assert np.all(np.diff(p) > 0)
    # another number of runs (a repetition more): progress is undefined, not guessed
    assert np.isnan(true_progress(np.repeat([0, 1, 2, 1, 2], 8), ref)).all()


def test_a_lookahead_answer_is_scored_against_the_frame_it_describes():
    phases = np.repeat([0, 1, 2], 10)
    rec = Recording("r", "a", np.arange(30) / 30.0, np.zeros((30, 1, 3)), phases, "x", 30.0)
    ref = _reference(np.repeat([0, 1, 2], 10))
    truth, _ = _described_truth(rec, 3 / 30.0, ref)
    assert (truth[:3] < 0).all()  # describing a moment before the recording: never right
    np.testing.assert_array_equal(truth[3:], phases[:-3])


# ---------------------------------------------------------------------------------------
# A real run: shipped model, references built from ordinary synthetic performances
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("torch")
    from engine.reference import build_reference
    from masa_rt.synth import write_dataset

    root = tmp_path_factory.mktemp("score")
    data = root / "synth"
    write_dataset(data, seed=3, activities=["pour_milk", "stir_cup"], per_activity=4)
    manifest = json.loads((data / "manifest.json").read_text())
    refs = []
    for act in ("pour_milk", "stir_cup"):
        first = next(f["file"] for f in manifest["files"]
                     if f["activity"] == act and f["split"] == "train")
        refs.append(root / f"{act}.npz")
        build_reference([data / first], None, refs[-1], decoder={"steps": 0})
    return data, refs, manifest


def test_score_streams_every_labelled_val_recording_through_the_pipeline(world):
    from engine.score import run_score

    data, refs, manifest = world
    report = run_score(refs, [data], concurrency=3)
    val = [f for f in manifest["files"] if f["split"] == "val"]
    assert report["recordings"] == len(val)
    r = report["results"]
    assert list(r) == ["engine", "no_decoder", "raw", "online_dtw_learned", "online_dtw_raw",
                       "offline_dtw_learned", "offline_dtw_raw"]
    total = sum(len(np.load(data / f["file"])["phases"]) for f in val)
    assert all(m["frames"] == total for m in r.values())  # every frame scored, every method
    # These references have no phase decoder: the baseline without one replays the
    # engine's own frames through the same aligner and must agree with it exactly.
    assert r["no_decoder"]["phase_acc_pct"] == r["engine"]["phase_acc_pct"]
    assert r["no_decoder"]["minus_engine_pts_ci95"] == [0.0, 0.0]
    assert r["engine"]["phase_acc_pct"] > 50.0  # a trained model on its own kind of data
    assert report["activity_id"]["frame_acc_pct"] > 50.0  # two references: identified
    assert report["latency"]["rounds"] > 0 and report["latency"]["step_ms_p50"] > 0
    per = report["per_recording"]
    assert len(per) == len(val) and set(per[0]["phase_acc_pct"]) == set(r)
    frames = np.array([p["frames"] for p in per])
    pooled = np.array([p["phase_acc_pct"]["engine"] for p in per]) @ frames / frames.sum()
    assert pooled == pytest.approx(r["engine"]["phase_acc_pct"])


def test_a_recording_scored_against_its_own_reference_is_right_offline(world, tmp_path):
    import shutil

    from engine.score import run_score

    data, refs, manifest = world
    first = next(f["file"] for f in manifest["files"]
                 if f["activity"] == "pour_milk" and f["split"] == "train")
    # The demo itself is no held-out query: skipped, said why.
    with pytest.raises(ValueError, match="a reference was built from it"):
        run_score(refs[:1], [data / first])
    copy = tmp_path / "copy.npz"  # the same frames under another name: the known answer
    shutil.copy(data / first, copy)
    report = run_score(refs[:1], [copy])
    assert report["results"]["offline_dtw_learned"]["phase_acc_pct"] > 99.0
    assert report["results"]["offline_dtw_raw"]["phase_acc_pct"] > 99.0
    # online DTW of a copy finds the diagonal too (zero cost there, from the first frame)
    assert report["results"]["online_dtw_learned"]["phase_acc_pct"] > 99.0
    assert report["results"]["online_dtw_raw"]["phase_acc_pct"] > 99.0
    assert report["results"]["engine"]["phase_acc_pct"] > 90.0
    assert report["activity_id"] is None  # one reference: nothing to identify


def test_cli_prints_the_table_and_writes_only_where_asked(world, tmp_path, capsys,
                                                          monkeypatch):
    from masa_rt.cli import main

    data, refs, _ = world
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--reference", *map(str, refs), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "| engine |" in out and "| raw |" in out and "skipped: 4 no phase" not in out
    assert list(tmp_path.iterdir()) == []  # nothing written without --out
    assert main(["score", "--reference", str(refs[0]), "--data", str(data),
                 "--split", "all", "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "score.json").read_text())
    assert report["skipped"] == {"no reference for activity stir_cup": 4,
                                 "a reference was built from it": 1}
    assert "| engine |" in (tmp_path / "o" / "score.md").read_text()


def test_no_labelled_recording_is_one_clear_error(world, tmp_path, capsys):
    from masa_rt.cli import main

    _, refs, _ = world
    seq = np.load(Path(__file__).resolve().parents[1] / "examples" / "demos" / "pour_milk.npz")
    unlabelled = {k: seq[k] for k in seq.files if k not in ("phases", "phase_names")}
    np.savez(tmp_path / "u.npz", **unlabelled)
    assert main(["score", "--reference", str(refs[0]), "--data", str(tmp_path / "u.npz")]) != 0
    err = capsys.readouterr().err
    assert "no labelled recording" in err and "no phase labels" in err
    assert "Traceback" not in err

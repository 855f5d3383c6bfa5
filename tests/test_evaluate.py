"""trainer.evaluate / baselines / eval_commands on a tiny synthetic dataset."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from masa_rt.checkpoint import save_checkpoint
from masa_rt.model import MasaConfig
from masa_rt.preprocess import InputSpec
from masa_rt.sequence import Dataset, Sequence, write_dataset_files
from masa_rt.synth import generate, sequence_rng
from trainer import eval_commands
from trainer.baselines import (
    ClockEmbedder,
    ModelEmbedder,
    RandomEncoderEmbedder,
    RawKeypointsEmbedder,
)
from trainer.evaluate import crop_sequence, evaluate, reverse_sequence, select_entries

ACTIVITIES = ("pour_milk", "stir_cup")
ALL_METRICS = {"phase_classification", "phase_progress", "kendalls_tau", "reversed_clip_tau",
               "crop_error", "frame_retrieval", "action_recognition", "activity_separation"}
SMALL = dict(num_joints=42, joint_dims=3, d_model=16, n_heads=2, ffn_dim=32, n_layers=2,
             proj_dim=16, proj_layers=2, window=8)


def _short(seq: Sequence, step: int = 6) -> Sequence:
    """Every ``step``-th frame: keeps the tests fast (t-SNE, lbfgs) with all phases."""
    fields = ("joints", "timestamps", "phases", "canonical_time")
    return replace(seq, **{f: getattr(seq, f)[::step] for f in fields})


def _write(root, activities=ACTIVITIES, per_activity=4, labels=True) -> Dataset:
    items = []
    for act in activities:
        for i in range(per_activity):
            seq = _short(generate(act, sequence_rng(0, act, i)))
            if not labels:
                seq = replace(seq, phases=None, phase_names=None, canonical_time=None)
            items.append((f"{act}_{i}.npz", seq, "val" if i >= per_activity // 2 else "train"))
    write_dataset_files(root, items)
    return Dataset(root)


@pytest.fixture(scope="module")
def hands(tmp_path_factory) -> Dataset:
    return _write(tmp_path_factory.mktemp("hands"))


def _spec(ds: Dataset) -> InputSpec:
    return InputSpec(ds.manifest.layout, ds.manifest.fps)


def test_raw_keypoints_report_has_every_metric(hands, tmp_path):
    report = evaluate(RawKeypointsEmbedder(_spec(hands)), hands.root, tmp_path)
    assert set(report["metrics"]) == ALL_METRICS
    assert report["skipped"] == {}
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["metrics"].keys() == report["metrics"].keys()
    m = report["metrics"]
    assert set(m["phase_classification"]) == {"10%", "50%", "100%", "per_activity"}
    assert set(m["phase_classification"]["per_activity"]) == set(ACTIVITIES)
    assert set(m["frame_retrieval"]) == {"ap@5", "ap@10", "ap@15"}
    # Per-frame normalised keypoints of a cropped clip are the full clip's frames: exact.
    assert m["crop_error"]["error"] == 0.0
    assert m["crop_error"]["clock"] > 0.05
    assert m["kendalls_tau"]["pairs"] == 4  # 2 val videos per activity, ordered pairs
    assert -1 <= m["kendalls_tau"]["tau"] <= 1 and m["kendalls_tau"]["clock"] > 0.9
    assert m["action_recognition"]["pool"] == "concat"
    assert set(report["timings_s"]) >= ALL_METRICS | {"embed", "total"}
    assert (tmp_path / "tsne.png").stat().st_size > 0
    assert (tmp_path / "alignment.png").stat().st_size > 0
    md = (tmp_path / "metrics.md").read_text()
    assert "| Kendall's tau |" in md and "clock [t/T]" in md


def test_unlabelled_single_activity_lists_what_was_skipped(tmp_path):
    ds = _write(tmp_path / "data", activities=("stir_cup",), per_activity=4, labels=False)
    embedder = RandomEncoderEmbedder(MasaConfig(**SMALL), _spec(ds), seed=1)
    report = evaluate(embedder, ds.root, tmp_path / "out", tsne=False)
    skipped = report["skipped"]
    for name in ("phase_classification", "phase_progress", "frame_retrieval"):
        assert skipped[name] == "no phase labels in the dataset"
    assert skipped["action_recognition"] == "needs >= 2 activities, found 1"
    assert skipped["activity_separation"] == "needs >= 2 activities, found 1"
    assert skipped["tsne"] == "disabled (--no-tsne)"
    assert set(report["metrics"]) == {"kendalls_tau", "reversed_clip_tau", "crop_error"}
    assert (tmp_path / "out" / "alignment.png").exists()
    assert "Skipped:" in (tmp_path / "out" / "metrics.md").read_text()


def test_model_embedder_reproduces_the_saved_model(hands, tmp_path):
    cfg, spec = MasaConfig(**SMALL), _spec(hands)
    random = RandomEncoderEmbedder(cfg, spec, seed=3)
    save_checkpoint(tmp_path / "run" / "last.pt", random.model, cfg, spec)
    seq = hands.load(hands.entries("val")[0])
    from_run = ModelEmbedder(tmp_path / "run").embed(seq)  # a run folder means its last.pt
    np.testing.assert_allclose(from_run, random.embed(seq), atol=1e-6)
    assert from_run.shape == (seq.num_frames, cfg.d_model)
    again = RandomEncoderEmbedder(cfg, spec, seed=3).embed(seq)
    np.testing.assert_array_equal(again, random.embed(seq))  # seeded: reproducible
    assert not np.allclose(RandomEncoderEmbedder(cfg, spec, seed=4).embed(seq), again)


def test_reverse_and_crop_keep_the_format(hands):
    seq = hands.load(hands.entries()[0])
    rev = reverse_sequence(seq)
    rev.validate()
    np.testing.assert_array_equal(rev.phases, seq.phases[::-1])
    np.testing.assert_array_equal(rev.joints[0], seq.joints[-1])
    crop = crop_sequence(seq)
    crop.validate()
    assert crop.num_frames == seq.num_frames - int(0.25 * seq.num_frames)
    np.testing.assert_array_equal(crop.joints[-1], seq.joints[-1])


def test_select_entries_keeps_the_first_per_activity_and_split(hands):
    chosen = select_entries(hands, max_videos=1)
    assert [e.file for e in chosen] == ["pour_milk_0.npz", "pour_milk_2.npz",
                                        "stir_cup_0.npz", "stir_cup_2.npz"]
    assert len(select_entries(hands, None)) == len(hands)


def test_eval_command_with_the_clock_baseline(hands, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_commands.register(parser.add_subparsers())
    out = tmp_path / "report"
    args = parser.parse_args(["eval", "--data", str(hands.root), "--baseline", "clock",
                              "--out", str(out), "--no-tsne"])
    assert args.func(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["embedder"] == ClockEmbedder().describe()
    # The clock embedder *is* the clock: its tau equals the clock column.
    tau = report["metrics"]["kendalls_tau"]
    assert tau["tau"] == pytest.approx(tau["clock"])
    assert "eval: report in" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--max-videos", "0"), ("--max-videos", "-1"),
                                         ("--stride", "0")])
def test_eval_refuses_counts_below_one(hands, flag, value, capsys):
    from masa_rt.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", "--data", str(hands.root), "--baseline", "clock", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, found '{value}'" in capsys.readouterr().err


def test_evaluate_refuses_max_videos_zero(hands, tmp_path):
    with pytest.raises(ValueError, match="max_videos: expected >= 1"):
        evaluate(ClockEmbedder(), hands.root, tmp_path / "r", max_videos=0)
    assert not (tmp_path / "r").exists()

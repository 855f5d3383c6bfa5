"""inspect: summaries of sequences and datasets, and the skeleton/phase pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from masa_rt.cli import main
from masa_rt.inspect import format_summary, plot, summarise
from masa_rt.sequence import Sequence, save_sequence, write_dataset_files
from masa_rt.skeleton import get_layout

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def penn_sequence(t: int = 12, activity: str = "squat") -> Sequence:
    """A 2D penn13 sequence in pixels with two missing joints."""
    rng = np.random.default_rng(0)
    joints = (rng.uniform(50, 300, (t, 13, 2))).astype(np.float32)
    joints[min(3, t - 1), [5, 6]] = np.nan
    return Sequence(joints=joints, layout="penn13", fps=30.0, activity=activity,
                    source="test/penn")


def hand_sequence(t: int = 20) -> Sequence:
    """A 3D two-hand sequence with every optional field, three phases 5/10/5 frames."""
    layout = get_layout("h2o_hands")
    rng = np.random.default_rng(1)
    joints = rng.normal(0, 0.05, (t, layout.num_joints, 3)).astype(np.float32)
    joints[:, 21:, 0] += 0.3  # right hand to the right
    return Sequence(
        joints=joints, layout="h2o_hands", fps=30.0,
        timestamps=np.arange(t) / 30.0,
        features=np.zeros((t, 8), np.float32),
        phases=np.repeat([0, 1, 2], [5, 10, 5]).astype(np.int32),
        phase_names=("reach", "pour", "return"),
        canonical_time=np.linspace(0, 1, t, dtype=np.float32),
        activity="pour_milk", subject="s1", source="synthetic",
    )


@pytest.fixture
def dataset(tmp_path) -> Path:
    items = [("a.npz", penn_sequence(10, "squat"), "train"),
             ("b.npz", penn_sequence(14, "squat"), "val"),
             ("c.npz", penn_sequence(12, "pushup"), "train")]
    write_dataset_files(tmp_path / "ds", items)
    return tmp_path / "ds"


def test_summarise_sequence_with_everything(tmp_path):
    save_sequence(tmp_path / "h.npz", hand_sequence())
    d = summarise(tmp_path / "h.npz")
    assert (d["kind"], d["frames"], d["layout"], d["joints"], d["dims"]) == (
        "sequence", 20, "h2o_hands", 42, 3)
    assert d["duration_s"] == pytest.approx(20 / 30)
    assert d["phases"] == [{"name": "reach", "frames": 5}, {"name": "pour", "frames": 10},
                           {"name": "return", "frames": 5}]
    assert d["has_features"] and d["feature_dim"] == 8
    assert d["has_timestamps"] and d["has_canonical_time"]
    assert d["activity"] == "pour_milk" and d["nan_ratio"] == 0.0
    text = format_summary(d)
    assert "pour 10" in text and "42 x 3 (h2o_hands)" in text


def test_summarise_sequence_counts_missing_joints(tmp_path):
    save_sequence(tmp_path / "p.npz", penn_sequence())
    d = summarise(tmp_path / "p.npz")
    assert d["nan_ratio"] == pytest.approx(2 / (12 * 13))
    assert d["phases"] == [] and not d["has_features"] and not d["has_timestamps"]
    assert "phases    none" in format_summary(d)


def test_summarise_dataset(dataset):
    d = summarise(dataset)
    assert d["kind"] == "dataset" and d["layout"] == "penn13" and d["fps"] == 30.0
    assert d["files"] == 3 and d["files_per_split"] == {"train": 2, "val": 1}
    assert d["per_activity"] == {"pushup": {"train": 1}, "squat": {"train": 1, "val": 1}}
    assert d["total_frames"] == 36 and d["mean_frames"] == pytest.approx(12.0)
    assert d["nan_ratio"] == pytest.approx(6 / (36 * 13))
    assert "files     3 (train 2, val 1)" in format_summary(d)


@pytest.mark.parametrize("make", [penn_sequence, hand_sequence])
def test_plot_writes_png_for_2d_and_3d(tmp_path, make):
    save_sequence(tmp_path / "s.npz", make())
    out = plot(tmp_path / "s.npz", tmp_path / "pics" / "s.png", n_frames=4)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["s.png"]  # no temp file left behind


def test_plot_dataset_draws_its_first_sequence(dataset, tmp_path):
    out = plot(dataset, tmp_path / "ds.png", n_frames=2)
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_more_frames_than_the_sequence_has(tmp_path):
    save_sequence(tmp_path / "s.npz", penn_sequence(t=2))
    assert plot(tmp_path / "s.npz", tmp_path / "s.png", n_frames=6).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("fn", [summarise, lambda p: plot(p, p.with_suffix(".png"))])
def test_missing_path_is_one_line_error(tmp_path, fn):
    with pytest.raises(FileNotFoundError, match="no such sequence or dataset") as err:
        fn(tmp_path / "nope.npz")
    assert "\n" not in str(err.value)


def test_folder_without_manifest_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        summarise(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a .npz sequence or a dataset folder"):
        summarise(tmp_path / "x.txt")


def test_cli_prints_summary_and_plots(tmp_path, capsys):
    save_sequence(tmp_path / "h.npz", hand_sequence())
    out = tmp_path / "h.png"
    assert main(["inspect", str(tmp_path / "h.npz"), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "frames    20" in text and f"wrote {out}" in text and out.is_file()
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masa-rt inspect: error: no such") and "\n" not in err


def test_a_reference_is_named_as_such(tmp_path, capsys):
    """A built reference (masa_rt.align.Reference.save's keys) is not a recording."""
    np.savez(tmp_path / "ref.npz", format_version=np.int64(1), name=np.str_("r"),
             embeddings=np.zeros((4, 8), np.float32), model_fingerprint=np.str_("ab"))
    assert main(["inspect", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert "found a built reference (embeddings, no joints)" in err
    assert "field 'joints'" not in err and "\n" not in err.strip()

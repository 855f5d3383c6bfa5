"""Penn Action import: synthetic .mat files (always) and the real labels (when present)."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from masa_rt.cli import main
from masa_rt.penn import (
    PENN_FPS,
    NothingVisibleError,
    PennFormatError,
    PennImportError,
    import_penn,
    read_penn_mat,
)
from masa_rt.sequence import load_manifest, load_sequence

ROOT = Path(__file__).resolve().parents[1]
PENN_DIR = Path(os.environ.get("MASA_PENN_DIR", ROOT.parent / "shared" / "data" / "pennaction"))


def write_mat(path: Path, t: int = 5, action: str = "squat", train: int = 1, **override) -> Path:
    """A tiny Penn-Action-shaped .mat; ``override`` replaces or (with None) drops fields."""
    rng = np.random.default_rng(t)
    fields = {
        "action": action,
        "pose": "front",
        "x": rng.uniform(0, 480, (t, 13)),
        "y": rng.uniform(0, 360, (t, 13)),
        "visibility": np.ones((t, 13), np.uint8),
        "bbox": np.zeros((t, 4)),
        "dimensions": np.array([[360, 480, t]], np.uint16),
        "nframes": np.array([[t]], np.uint8),
        "train": np.array([[train]], np.int32),
    }
    fields.update(override)
    scipy.io.savemat(path, {k: v for k, v in fields.items() if v is not None})
    return path


def penn_index() -> list[dict[str, str]]:
    with open(PENN_DIR / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def penn_labels() -> Path:
    labels = PENN_DIR / "labels"
    if not labels.is_dir():
        pytest.skip(f"Penn Action labels not found at {labels} (set MASA_PENN_DIR)")
    return labels


# ---------------------------------------------------------------------------------------
# Synthetic .mat files
# ---------------------------------------------------------------------------------------

def test_read_keeps_pixels_and_hides_invisible_joints(tmp_path):
    vis = np.ones((5, 13), np.uint8)
    vis[2, [0, 7]] = 0
    x = np.arange(65, dtype=float).reshape(5, 13)
    video = read_penn_mat(write_mat(tmp_path / "0042.mat", x=x, visibility=vis, train=-1))
    assert video.video_id == "0042" and video.action == "squat" and video.split == "val"
    assert video.joints.shape == (5, 13, 2) and video.joints.dtype == np.float32
    assert np.isnan(video.joints[2, [0, 7]]).all()
    assert np.isfinite(np.delete(video.joints[2], [0, 7], axis=0)).all()
    np.testing.assert_array_equal(video.joints[0, :, 0], x[0])  # raw pixels, not normalised


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"x": None}, "x: missing field"),
        ({"y": np.zeros((4, 13))}, "y: shape"),
        ({"visibility": np.ones((5, 12))}, "visibility: expected"),
        ({"nframes": np.array([[9]])}, "nframes: says 9"),
        ({"train": np.array([[0]])}, "train: expected +1 or -1"),
        ({"action": np.zeros(3)}, "action: expected a non-empty string"),
    ],
)
def test_malformed_field_is_one_line_naming_file_and_field(tmp_path, override, field):
    path = write_mat(tmp_path / "0007.mat", **override)
    with pytest.raises(PennFormatError) as err:
        read_penn_mat(path)
    msg = str(err.value)
    assert msg.startswith("0007.mat: ") and field in msg and "\n" not in msg


def test_corrupt_file_is_one_line(tmp_path):
    path = tmp_path / "0003.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, but then garbage" + bytes(range(256)))
    with pytest.raises(PennFormatError, match=r"^0003\.mat: not a readable \.mat file") as err:
        read_penn_mat(path)
    assert "\n" not in str(err.value)


def test_video_with_nothing_visible_is_skipped_with_a_warning(tmp_path, caplog):
    labels = tmp_path / "labels"
    labels.mkdir()
    write_mat(labels / "0001.mat")
    write_mat(labels / "0002.mat", visibility=np.zeros((5, 13), np.uint8))
    with pytest.raises(NothingVisibleError, match=r"^0002\.mat: visibility: "):
        read_penn_mat(labels / "0002.mat")
    manifest = import_penn(labels, tmp_path / "out", progress=False)
    assert [e.file for e in manifest.files] == ["0001.npz"]
    assert "skipped 0002.mat: visibility" in caplog.text
    assert not (tmp_path / "out" / "0002.npz").exists()


def make_labels(folder: Path, corrupt: bool) -> Path:
    folder.mkdir()
    write_mat(folder / "0001.mat", t=4, action="squat", train=1)
    write_mat(folder / "0002.mat", t=6, action="squat", train=-1)
    write_mat(folder / "0003.mat", t=5, action="pushup", train=1)
    if corrupt:
        (folder / "0004.mat").write_bytes(b"not a mat file")
    return folder


def test_import_writes_sequences_and_manifest(tmp_path):
    manifest = import_penn(make_labels(tmp_path / "labels", False), tmp_path / "out",
                           progress=False)
    assert [(e.file, e.activity, e.split) for e in manifest.files] == [
        ("0001.npz", "squat", "train"), ("0002.npz", "squat", "val"),
        ("0003.npz", "pushup", "train")]
    loaded = load_manifest(tmp_path / "out")
    assert loaded.layout == "penn13" and loaded.fps == PENN_FPS
    assert sorted(loaded.activities) == ["pushup", "squat"]
    seq = load_sequence(tmp_path / "out" / "0002.npz")
    assert seq.layout == "penn13" and seq.fps == 30 and seq.joints.shape == (6, 13, 2)
    assert seq.activity == "squat" and seq.source == "pennaction/0002"
    assert seq.subject == "pennaction/0002" and seq.phases is None


def test_import_collects_failures_and_still_writes_the_rest(tmp_path):
    with pytest.raises(PennImportError) as err:
        import_penn(make_labels(tmp_path / "labels", True), tmp_path / "out", progress=False)
    assert len(err.value.failures) == 1 and err.value.failures[0].startswith("0004.mat: ")
    assert len(err.value.manifest.files) == 3
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["file"] for f in on_disk["files"]] == ["0001.npz", "0002.npz", "0003.npz"]


def test_two_workers_give_the_same_dataset(tmp_path):
    labels = make_labels(tmp_path / "labels", False)
    one = import_penn(labels, tmp_path / "a", workers=1, progress=False)
    two = import_penn(labels, tmp_path / "b", workers=2, progress=False)
    assert one.files == two.files
    np.testing.assert_array_equal(load_sequence(tmp_path / "a" / "0003.npz").joints,
                                  load_sequence(tmp_path / "b" / "0003.npz").joints)


def test_cli_reports_counts_and_exits_nonzero_on_failure(tmp_path, capsys):
    labels = make_labels(tmp_path / "labels", True)
    assert main(["import-penn", str(labels), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "squat" in out and "failed: 0004.mat: " in out and "1 file(s) failed" in out
    (labels / "0004.mat").unlink()
    assert main(["import-penn", str(labels), "--out", str(tmp_path / "out")]) == 0


def test_cli_missing_folder_is_one_line_error(tmp_path, capsys):
    assert main(["import-penn", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "labels folder not found" in err and "\n" not in err


# ---------------------------------------------------------------------------------------
# Real Penn Action labels
# ---------------------------------------------------------------------------------------

# The one official video whose every joint is marked invisible (a single placeholder pose
# repeated in all 68 frames); import_penn skips it.
NOTHING_VISIBLE = {"1516"}


def check_against_index(manifest, rows: list[dict[str, str]]) -> None:
    """Every converted video agrees with index.csv on action and split."""
    by_file = {e.file: e for e in manifest.files}
    rows = [r for r in rows if r["video_id"] not in NOTHING_VISIBLE]
    assert len(by_file) == len(rows)
    for row in rows:
        entry = by_file[f"{row['video_id']}.npz"]
        split = {"train": "train", "test": "val"}[row["official_split"]]
        assert (entry.activity, entry.split) == (row["action"], split), row["video_id"]


def test_real_first_20_videos(penn_labels, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for mat in sorted(penn_labels.glob("*.mat"))[:20]:
        (labels / mat.name).symlink_to(mat)  # never copy the data, only point at it
    manifest = import_penn(labels, tmp_path / "out", progress=False)
    rows = [r for r in penn_index() if (labels / f"{r['video_id']}.mat").exists()]
    check_against_index(manifest, rows)
    for row in rows:
        seq = load_sequence(tmp_path / "out" / f"{row['video_id']}.npz")
        assert seq.joints.shape == (int(row["nframes"]), 13, 2)
        # pixel coordinates stay inside the frame (with a small margin for annotator slop)
        assert np.nanmax(seq.joints[..., 0]) < 1.1 * int(row["width"])
        assert np.nanmax(seq.joints[..., 1]) < 1.1 * int(row["height"])


@pytest.mark.slow
def test_real_full_import_matches_index(penn_labels, tmp_path):
    manifest = import_penn(penn_labels, tmp_path / "out", workers=2, progress=False)
    rows = penn_index()
    assert len(rows) == 2326 and len(manifest.files) == 2326 - len(NOTHING_VISIBLE)
    check_against_index(manifest, rows)
    expected = Counter(r["action"] for r in rows)
    expected["pushup"] -= 1  # video 1516
    assert Counter(e.activity for e in manifest.files) == expected
    assert len(manifest.activities) == 15
    frames = sum(load_sequence(tmp_path / "out" / e.file).num_frames for e in manifest.files)
    assert frames == 163_841 - 68  # the README's total, less the skipped video

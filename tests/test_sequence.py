"""Tests for masa_rt.sequence: the v1 file format, its errors, and datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masa_rt import sequence as sq
from masa_rt.sequence import Sequence, SequenceFormatError


def full_sequence(t: int = 6, seed: int = 0) -> Sequence:
    """A penn13 sequence with every optional field set."""
    rng = np.random.default_rng(seed)
    joints = rng.normal(size=(t, 13, 2)).astype(np.float32)
    joints[min(1, t - 1), 3] = np.nan
    return Sequence(
        joints=joints, layout="penn13", fps=30.0,
        timestamps=np.arange(t) / 30.0 + 100.0,
        features=rng.normal(size=(t, 4)).astype(np.float32),
        phases=np.minimum(np.arange(t) // 2, 2).astype(np.int32),
        phase_names=("start", "middle", "end"),
        canonical_time=np.linspace(0, 1, t, dtype=np.float32),
        activity="jump", subject="s01", source="unit test",
    )


def raw_fields(seq: Sequence) -> dict[str, np.ndarray]:
    """What save_sequence would write, as a mutable dict (for crafting bad files)."""
    return sq._to_disk(sq._Checker("x").check({"format_version": 1, **seq._fields()}))


def assert_same(a: Sequence, b: Sequence) -> None:
    for field in vars(a):
        va, vb = getattr(a, field), getattr(b, field)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb)
            assert va.dtype == vb.dtype, field
        else:
            assert va == vb, field


# --- round trip ----------------------------------------------------------------------------

def test_round_trip_every_field(tmp_path: Path) -> None:
    seq = full_sequence()
    path = tmp_path / "s.npz"
    sq.save_sequence(path, seq)
    back = sq.load_sequence(path)
    assert_same(seq, back)
    assert back.joints.dtype == np.float32 and back.timestamps.dtype == np.float64
    assert back.phases.dtype == np.int32 and isinstance(back.phase_names, tuple)
    assert back.num_frames == 6 and back.layout_obj.name == "penn13"
    with np.load(path, allow_pickle=False) as z:  # strings are numpy unicode, not pickles
        assert z["layout"].dtype.kind == "U" and z["phase_names"].dtype.kind == "U"
        assert int(z["format_version"]) == sq.FORMAT_VERSION


def test_round_trip_required_only_and_cast(tmp_path: Path) -> None:
    joints = np.random.default_rng(1).normal(size=(3, 42, 3))  # float64 in memory
    path = tmp_path / "min.npz"
    sq.save_sequence(path, Sequence(joints, "h2o_hands", 60))
    back = sq.load_sequence(path)
    assert back.joints.dtype == np.float32 and back.fps == 60.0
    np.testing.assert_allclose(back.joints, joints, rtol=1e-6)
    assert back.timestamps is None and back.phases is None and back.activity is None


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=st.integers(1, 20), seed=st.integers(0, 2**16), nan_frac=st.floats(0, 0.9))
def test_round_trip_property(tmp_path: Path, t: int, seed: int, nan_frac: float) -> None:
    seq = full_sequence(t, seed)
    rng = np.random.default_rng(seed)
    seq.joints[rng.random(seq.joints.shape[:2]) < nan_frac] = np.nan
    seq.joints[0, 0] = 0.5  # at least one observed joint
    path = tmp_path / f"p{seed}_{t}.npz"
    sq.save_sequence(path, seq)
    assert_same(seq, sq.load_sequence(path))


# --- malformed files -----------------------------------------------------------------------

def _drop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, value)


def _map(key: str, fn) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, fn(d[key]))


MALFORMED = [
    ("missing joints", _drop("joints"), "joints"),
    ("missing layout", _drop("layout"), "layout"),
    ("missing fps", _drop("fps"), "fps"),
    ("missing version", _drop("format_version"), "format_version"),
    ("int joints", _map("joints", lambda j: np.zeros(j.shape, np.int32)), "joints"),
    ("2-d joints", _map("joints", lambda j: j[:, :, 0]), "joints"),
    ("wrong J", _map("joints", lambda j: j[:, :12]), "joints"),
    ("wrong C", _map("joints", lambda j: np.concatenate([j, j[..., :1]], -1)), "joints"),
    ("T = 0", _map("joints", lambda j: j[:0]), "joints"),
    ("all NaN", _map("joints", lambda j: np.full_like(j, np.nan)), "joints"),
    ("inf joint", _map("joints", lambda j: np.where(np.isnan(j), np.inf, j)), "joints"),
    ("unknown layout", _set("layout", np.array("penn15")), "layout"),
    ("numeric layout", _set("layout", np.array(3)), "layout"),
    ("fps zero", _set("fps", np.array(0.0)), "fps"),
    ("fps negative", _set("fps", np.array(-30.0)), "fps"),
    ("fps nan", _set("fps", np.array(np.nan)), "fps"),
    ("fps inf", _set("fps", np.array(np.inf)), "fps"),
    ("fps array", _set("fps", np.array([30.0, 30.0])), "fps"),
    ("timestamps length", _map("timestamps", lambda t: t[:-1]), "timestamps"),
    ("timestamps decrease", _map("timestamps", lambda t: t[::-1].copy()), "timestamps"),
    ("features length", _map("features", lambda f: f[1:]), "features"),
    ("features 1-d", _map("features", lambda f: f[:, 0]), "features"),
    ("phase too big", _map("phases", lambda p: p + 1), "phases"),
    ("phase negative", _map("phases", lambda p: p - 1), "phases"),
    ("phases length", _map("phases", lambda p: p[:-2]), "phases"),
    ("phases float", _map("phases", lambda p: p.astype(np.float32)), "phases"),
    ("phases no names", _drop("phase_names"), "phase_names"),
    ("canonical time range", _map("canonical_time", lambda c: c * 2), "canonical_time"),
    ("newer version", _set("format_version", np.array(2)), "format_version"),
    ("float version", _set("format_version", np.array(1.0)), "format_version"),
    ("pickled field", _set("activity", np.array([{"a": 1}], dtype=object)), "activity"),
]


@pytest.mark.parametrize("label,mutate,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_field_gives_one_line_error(tmp_path: Path, label: str, mutate, field: str
                                              ) -> None:
    fields = raw_fields(full_sequence())
    mutate(fields)
    path = tmp_path / "bad_file.npz"
    np.savez(path, **fields)
    with pytest.raises(SequenceFormatError) as info:
        sq.load_sequence(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: field '{field}': expected ")
    assert ", found " in msg
    assert info.value.field == field


def test_newer_version_message_says_upgrade(tmp_path: Path) -> None:
    fields = raw_fields(full_sequence())
    fields["format_version"] = np.array(7)
    np.savez(tmp_path / "v7.npz", **fields)
    with pytest.raises(SequenceFormatError, match="upgrade masa-rt.*found 7"):
        sq.load_sequence(tmp_path / "v7.npz")


@pytest.mark.parametrize("content", [b"", b"not a zip at all" * 10, b"PK\x03\x04broken",
                                     b"\x93NUMPY garbage"])
def test_corrupted_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(content)
    with pytest.raises(SequenceFormatError) as info:
        sq.load_sequence(path)
    assert str(info.value).startswith(f"{path}: expected ") and "\n" not in str(info.value)


def test_truncated_archive_and_npy_file(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    sq.save_sequence(good, full_sequence(50))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SequenceFormatError, match="cut.npz"):
        sq.load_sequence(cut)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(SequenceFormatError, match="plain.npy: expected a .npz archive"):
        sq.load_sequence(npy)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sq.load_sequence(tmp_path / "nope.npz")


def test_validate_in_memory_names_memory() -> None:
    seq = full_sequence()
    seq.validate()
    seq.fps = -1
    with pytest.raises(SequenceFormatError, match=r"^<memory>: field 'fps'"):
        seq.validate()
    with pytest.raises(SequenceFormatError, match=r"^take3: field 'fps'"):
        seq.validate("take3")


# --- atomic saving -------------------------------------------------------------------------

def test_invalid_save_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    sq.save_sequence(path, full_sequence())
    before = path.read_bytes()
    bad = full_sequence()
    bad.phases = bad.phases + 10
    with pytest.raises(SequenceFormatError, match="phases"):
        sq.save_sequence(path, bad)
    assert path.read_bytes() == before


def test_crash_during_write_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.npz"
    sq.save_sequence(path, full_sequence())
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="disk full"):
        sq.save_sequence(path, full_sequence(seed=1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


# --- datasets ------------------------------------------------------------------------------

def make_dataset(root: Path) -> sq.Manifest:
    items = []
    for i in range(4):
        seq = full_sequence(seed=i)
        seq.activity = "jump" if i % 2 else "squat"
        items.append((f"seq_{i}.npz", seq, "val" if i == 3 else "train"))
    return sq.write_dataset_files(root, items)


def test_dataset_round_trip(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    assert manifest.activities == ["squat", "jump"]
    ds = sq.Dataset(tmp_path)
    assert len(ds) == 4 and ds.manifest == manifest
    assert ds.files("val") == ["seq_3.npz"]
    assert [e.file for e in ds.entries("train")] == ["seq_0.npz", "seq_1.npz", "seq_2.npz"]
    assert ds.load("seq_1.npz").activity == "jump"
    assert [s.activity for s in ds.sequences("train")] == ["squat", "jump", "squat"]
    with pytest.raises(ValueError, match="split"):
        ds.entries("test")
    with pytest.raises(KeyError, match="nope.npz"):
        ds.load("nope.npz")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["files"][0] == {
        "file": "seq_0.npz", "activity": "squat", "split": "train"}


def test_fingerprint_tracks_content_not_timestamps(tmp_path: Path) -> None:
    make_dataset(tmp_path / "a")
    make_dataset(tmp_path / "b")
    fp = sq.Dataset(tmp_path / "a").fingerprint()
    assert len(fp) == 16 and fp == sq.Dataset(tmp_path / "b").fingerprint()
    seq = sq.load_sequence(tmp_path / "b" / "seq_2.npz")
    seq.joints[0, 0, 0] += 1.0
    sq.save_sequence(tmp_path / "b" / "seq_2.npz", seq)
    assert sq.Dataset(tmp_path / "b").fingerprint() != fp


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("label,edit,field", [
    ("unknown split", lambda m: m["files"][1].update(split="tset"), "files[1].split"),
    ("missing file", lambda m: m["files"][2].update(file="gone.npz"), "files[2].file"),
    ("escaping path", lambda m: m["files"][0].update(file="../x.npz"), "files[0].file"),
    ("unknown activity", lambda m: m["files"][0].update(activity="fly"), "files[0].activity"),
    ("duplicate file", lambda m: m["files"][1].update(file="seq_0.npz"), "files[1].file"),
    ("bad layout", lambda m: m.update(layout="nope"), "layout"),
    ("bad fps", lambda m: m.update(fps=0), "fps"),
    ("newer version", lambda m: m.update(format_version=9), "format_version"),
    ("no files key", lambda m: m.pop("files"), "files"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_errors(tmp_path: Path, label: str, edit, field: str) -> None:
    make_dataset(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(sq.ManifestError) as info:
        sq.Dataset(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'manifest.json'}: field '{field}': expected ")
    assert "\n" not in msg


def test_missing_and_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(sq.ManifestError, match="manifest.json"):
        sq.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(sq.ManifestError, match="valid JSON"):
        sq.load_manifest(tmp_path)


def test_dataset_load_checks_sequence_against_manifest(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    other = Sequence(np.zeros((2, 25, 3), np.float32), "body25", 30.0, activity="jump")
    sq.save_sequence(tmp_path / "seq_1.npz", other)
    with pytest.raises(SequenceFormatError, match=r"seq_1.npz: field 'layout'"):
        sq.Dataset(tmp_path).load("seq_1.npz")


def test_write_dataset_files_needs_activity_and_one_layout(tmp_path: Path) -> None:
    seq = full_sequence()
    seq.activity = None
    with pytest.raises(SequenceFormatError, match="activity"):
        sq.write_dataset_files(tmp_path, [("a.npz", seq, "train")])
    a, b = full_sequence(), full_sequence()
    b.fps = 15.0
    with pytest.raises(SequenceFormatError, match="layout/fps"):
        sq.write_dataset_files(tmp_path, [("a.npz", a, "train"), ("b.npz", b, "val")])
    assert not (tmp_path / "manifest.json").exists()

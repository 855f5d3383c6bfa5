"""``masa-rt reference propose``: phase boundaries for unlabelled demos (engine.propose)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from engine import propose  # noqa: E402
from engine.propose import (  # noqa: E402
    ProposeError,
    change_points,
    is_phases_csv,
    phases_csv,
    write_phases_csv,
)
from masa_rt.cli import main  # noqa: E402
from masa_rt.sequence import Sequence, save_sequence  # noqa: E402

FPS = 30.0
CHANGES = (40, 80)  # frames where the right hand turns


def run(capsys, *argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``masa-rt ARGV``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _hand(rng: np.random.Generator) -> np.ndarray:
    """(21, 3) a still, hand-like cloud around a wrist at the origin."""
    pts = rng.normal(0.0, 0.04, (21, 3))
    pts[0] = 0.0
    pts[9] = (0.0, 0.09, 0.0)  # middle1 (MCP): the reference bone wrist -> middle1
    return pts


def obvious_demo(path: Path, seed: int = 0, length: int = 120, timestamps: bool = False,
                 changes: tuple[int, ...] = CHANGES) -> Path:
    """Two hands (h2o_hands); the left holds still, the right moves right, then up, then
    left at a constant speed, turning at ``changes``: three phases anyone would name."""
    rng = np.random.default_rng(seed)
    left, right = _hand(rng) + (-0.2, 1.0, -0.3), _hand(rng) + (0.2, 1.0, -0.3)
    directions = np.array([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)]) * 0.006
    phase = np.searchsorted(np.array(changes), np.arange(length), side="right")
    offset = np.cumsum(directions[phase], axis=0)  # (T, 3)
    joints = np.concatenate([np.broadcast_to(left, (length, 21, 3)),
                             right[None] + offset[:, None]], axis=1)
    joints = joints + rng.normal(0.0, 0.0005, joints.shape)  # tracker noise
    extra = {"timestamps": 5.0 + np.arange(length) / FPS} if timestamps else {}
    save_sequence(path, Sequence(joints=joints.astype(np.float32), layout="h2o_hands",
                                 fps=FPS, activity="wave", **extra))
    return path


def read_csv(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    return [tuple(line.split(",")) for line in lines]


# ----------------------------------------------------------------------------- detector

def test_change_points_find_a_piecewise_constant_signal():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros((30, 3)), np.ones((20, 3)), -np.ones((40, 3))])
    x += rng.normal(0.0, 0.3, x.shape)
    assert change_points(x, n_segments=3) == [30, 50]
    assert change_points(x, penalty=5.0) == [30, 50]
    assert change_points(x, n_segments=1) == []
    assert change_points(x, penalty=1e6) == []  # one more phase never pays
    assert change_points(np.zeros((10, 2)), penalty=1.0) == []  # nothing moves


def test_change_points_respect_the_shortest_phase():
    x = np.concatenate([np.zeros((20, 1)), np.ones((2, 1)), np.zeros((20, 1))])
    assert change_points(x, penalty=0.1, min_size=1) == [20, 22]
    starts = change_points(x, penalty=0.1, min_size=5)  # the blip, in a 5-frame phase
    assert np.diff([0, *starts, len(x)]).min() >= 5 and 22 in starts
    with pytest.raises(ProposeError, match="need at least"):
        change_points(x, n_segments=9, min_size=5)  # 9 phases of 5 frames > 42 frames


def test_long_recordings_are_pooled_and_split_as_finely(monkeypatch):
    rng = np.random.default_rng(1)
    levels = rng.permutation(6)[:, None] * np.ones((1, 2)) * 0.5
    x = np.repeat(levels, 100, axis=0) + rng.normal(0.0, 0.3, (600, 2))
    full = change_points(x, penalty=8.0)
    monkeypatch.setattr(propose, "MAX_FRAMES", 100)  # pooled by 6
    pooled = propose._pooled_change_points(x, penalty=8.0, min_size=5)
    assert len(full) == len(pooled) == 5
    assert all(abs(p - c) <= 6 for p, c in zip(pooled, range(100, 600, 100), strict=True))


# ----------------------------------------------------------------------------- command

@pytest.mark.parametrize("signal", ["both", "raw", "learned"])
def test_the_command_finds_the_obvious_turns(capsys, tmp_path, signal):
    demo = obvious_demo(tmp_path / "wave.npz")
    out = tmp_path / "wave.csv"
    code, stdout, err = run(capsys, "reference", "propose", demo, "--signal", signal,
                            "--phases", 3, "-o", out)
    assert code == 0, err
    rows = read_csv(out)
    assert rows[0] == ("frame", "phase") and [r[1] for r in rows[1:]] == [
        "phase_1", "phase_2", "phase_3"]
    starts = [int(r[0]) for r in rows[1:]]
    assert starts[0] == 0
    assert all(abs(s - c) <= 3 for s, c in zip(starts[1:], CHANGES, strict=True)), starts
    assert f"wrote {out}" in stdout and "phase_3" in stdout


def test_the_count_is_chosen_without_phases(capsys, tmp_path):
    demo = obvious_demo(tmp_path / "wave.npz")
    code, stdout, err = run(capsys, "reference", "propose", demo, "--signal", "raw")
    assert code == 0, err
    assert "3 phases, chosen by a penalty of 12 per phase" in stdout
    listed = [line.split() for line in stdout.splitlines() if line.strip().startswith("phase_")]
    frames = [int(f) for _name, f, _t in listed]
    assert frames[0] == 0 and all(abs(f - c) <= 3 for f, c in zip(frames[1:], CHANGES,
                                                                  strict=True))


def test_several_demos_get_one_count_and_a_csv_each(capsys, tmp_path):
    demos = [obvious_demo(tmp_path / "a.npz", 0),
             obvious_demo(tmp_path / "b.npz", 1, length=150, changes=(50, 100)),
             obvious_demo(tmp_path / "c.npz", 2, length=100, changes=(30, 70))]
    folder = tmp_path / "proposals"
    folder.mkdir()
    code, stdout, err = run(capsys, "reference", "propose", *demos, "--signal", "raw",
                            "-o", folder)
    assert code == 0, err
    assert "3 phases in each demo, the median" in stdout
    for d in demos:
        rows = read_csv(folder / f"{d.stem}.phases.csv")
        assert [r[1] for r in rows[1:]] == ["phase_1", "phase_2", "phase_3"]


def test_time_column_counts_from_the_first_frame(capsys, tmp_path):
    demo = obvious_demo(tmp_path / "wave.npz", timestamps=True)  # stamps start at 5 s
    out = tmp_path / "wave.csv"
    code, _stdout, err = run(capsys, "reference", "propose", demo, "--phases", 3,
                             "--unit", "time", "--signal", "raw", "-o", out)
    assert code == 0, err
    rows = read_csv(out)
    assert rows[0] == ("time", "phase") and float(rows[1][0]) == 0.0
    assert all(abs(float(r[0]) - c / FPS) <= 3 / FPS + 1e-6
               for r, c in zip(rows[2:], CHANGES, strict=True))


def test_the_csv_is_what_label_reads(capsys, tmp_path):
    labels = pytest.importorskip("masa_rt.labels")
    demo = obvious_demo(tmp_path / "wave.npz")
    out = tmp_path / "wave.csv"
    assert run(capsys, "reference", "propose", demo, "--phases", 3, "-o", out)[0] == 0
    read = labels.read_boundaries(out)
    assert read.unit == "frame" and read.names == ("phase_1", "phase_2", "phase_3")


# ----------------------------------------------------------------------------- CSV file

def test_the_csv_is_written_atomically(tmp_path, monkeypatch):
    prop = propose.Proposal(name="d", frames=(0, 30), times=(0.0, 1.0), num_frames=60)
    path = tmp_path / "d.csv"
    write_phases_csv(path, prop)
    assert path.read_text() == "frame,phase\n0,phase_1\n30,phase_2\n" == phases_csv(prop)
    before = path.read_text()

    def broken(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(propose, "phases_csv", broken)
    with pytest.raises(RuntimeError):
        write_phases_csv(path, prop, "time")
    assert path.read_text() == before  # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # no temporary litter
    assert is_phases_csv(path)


# ----------------------------------------------------------------------------- errors

def test_bad_input_is_one_line(capsys, tmp_path):
    demo = obvious_demo(tmp_path / "wave.npz")
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    cases = [
        ((tmp_path / "missing.npz",), "missing.npz"),
        ((demo, "--phases", 1000), "--phases 1000 needs at least 5000 frames"),
        ((demo, demo, "-o", tmp_path / "x.csv"), "give an existing folder"),
        ((demo, "-o", tmp_path / "nowhere" / "x.csv"), "does not exist"),
        ((demo, "-o", demo), "also an input"),
        ((demo, "-o", other), "not a phases CSV"),
    ]
    for args, said in cases:
        code, _out, err = run(capsys, "reference", "propose", *args)
        assert code == 2, (args, err)
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert other.read_text() == "my notes\n"
    code, _out, err = run(capsys, "reference", "propose", demo, "--phases", 0)
    assert code == 2 and "expected an integer >= 1" in err
